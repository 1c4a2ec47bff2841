"""The lorakit command: its arguments, its commands, and what it shows besides its results."""

from .commands import main

__all__ = ["main"]
