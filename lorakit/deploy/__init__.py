"""Adapters folded into their base: streamed tensor by tensor or through peft, verified, written atomically."""

from .adapters import read_adapter

__all__ = ["read_adapter"]
