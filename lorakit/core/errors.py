"""Errors raised for user mistakes.

Every message says what was wrong and what to do about it. The CLI prints
``error: <message>`` (and the hint) without a traceback for these, and only
for these: anything else is a bug in lorakit and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LorakitError(Exception):
    """Base class of every error lorakit raises for a user mistake."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\nhint: {hint}")


class SpecError(LorakitError, ValueError):
    """A `Lora`, `Freeze` or `Quant` spec is invalid in itself."""


class ModelNotFoundError(LorakitError, FileNotFoundError):
    """A model id is neither a local directory, a zoo name, nor reachable."""


class TargetError(LorakitError, KeyError):
    """A module name or block index does not exist in the model."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return Exception.__str__(self)


class NothingSelectedError(TargetError):
    """A LoRA spec whose targets select no module of this model."""


class QuantizationError(LorakitError, RuntimeError):
    """Quantization cannot be applied (bitsandbytes missing, already quantized)."""


class AlreadyWrappedError(LorakitError, RuntimeError):
    """`wrap` was called on a model that lorakit or peft already wrapped."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The few candidates closest to `name`, for "did you mean" hints."""
    return difflib.get_close_matches(name, sorted(set(candidates)), n=n, cutoff=0.4)
