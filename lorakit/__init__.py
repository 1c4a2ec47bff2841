"""lorakit: wrap any Hugging Face model with LoRA, partial freezing and 8/4-bit
quantization, and see exactly what each choice costs.

peft does the LoRA math, bitsandbytes the quantized layers, transformers the
models. Importing lorakit imports none of peft, bitsandbytes, datasets,
evaluate or matplotlib: each is imported where it is used.
"""

from .errors import (
    AlreadyWrappedError,
    LorakitError,
    ModelNotFoundError,
    QuantizationError,
    SpecError,
    TargetError,
)
from .load import load
from .report import Report, Row, report
from .specs import Freeze, Lora, Quant
from .wrap import Targets, targets, wrap

__version__ = "0.1.0"

__all__ = [
    "AlreadyWrappedError",
    "Freeze",
    "Lora",
    "LorakitError",
    "ModelNotFoundError",
    "Quant",
    "QuantizationError",
    "Report",
    "Row",
    "SpecError",
    "TargetError",
    "Targets",
    "load",
    "report",
    "targets",
    "wrap",
]
