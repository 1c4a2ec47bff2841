"""What every part uses: LorakitError and its kinds, and files written safely (temp file, then rename)."""

from .errors import (AlreadyWrappedError, LorakitError, ModelNotFoundError, NothingSelectedError, QuantizationError,
                     SpecError, TargetError)
from .files import atomic_path, refuse_existing, write_json_atomic, write_text_atomic

__all__ = ["AlreadyWrappedError", "LorakitError", "ModelNotFoundError", "NothingSelectedError", "QuantizationError",
           "SpecError", "TargetError", "atomic_path", "refuse_existing", "write_json_atomic", "write_text_atomic"]
