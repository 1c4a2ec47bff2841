"""lorakit: wrap any Hugging Face model with LoRA, partial freezing and 8/4-bit
quantization, and see exactly what each choice costs.

peft does the LoRA math, bitsandbytes the quantized layers, transformers the
models. Importing lorakit imports none of peft, bitsandbytes, datasets,
evaluate or matplotlib: each is imported where it is used.
"""

import logging as _logging

# bitsandbytes asks the `kernels` package, on every import on a CPU with AVX-512 BF16, for an optional kernel from
# the Hub, and logs when it cannot have it (offline, or not cached), and `kernels` logs that it skipped the publisher
# check offline; bitsandbytes' own CPU code runs instead. Not a problem of the user's: kept out of their output.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage())
_logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: "Skipping publisher trust check for 'kernels-community/" not in record.getMessage())
# DeepSpeed, imported by transformers as a model loads wherever it is installed, prints to stdout that a machine
# without a GPU gets its CPU accelerator: true of every CPU machine, and nothing to act on.
_logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())

from .core.errors import (AlreadyWrappedError, LorakitError, ModelNotFoundError, QuantizationError, SpecError,
                          TargetError)
from .cost.report import Report, Row, report
from .model.load import load
from .model.wrap import Targets, targets, wrap
from .plan.make import make_plan
from .plan.plan import Plan, Target
from .plan.state import Source, State
from .spec.specs import Freeze, Lora, Quant

__version__ = "0.1.0"

# Imported on first use: they pull in transformers.Trainer, datasets or evaluate.
_LAZY = {
    "LoraTrainer": "train.trainer", "training_args": "train.arguments", "load_adapter": "adapter.format",
    "classification_metrics": "train.metrics", "load_metric": "train.metrics", "classification_data": "train.data",
    "causal_lm_data": "train.data", "collator": "train.data", "merge": "deploy.merge", "chat_data": "train.chat",
    "gguf_checkpoint": "model.gguf",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__ + ["__version__"])


__all__ = [
    "AlreadyWrappedError",
    "LoraTrainer",
    "Freeze",
    "Lora",
    "LorakitError",
    "ModelNotFoundError",
    "Plan",
    "Quant",
    "QuantizationError",
    "Report",
    "Row",
    "Source",
    "SpecError",
    "State",
    "Target",
    "TargetError",
    "Targets",
    "causal_lm_data",
    "chat_data",
    "classification_data",
    "classification_metrics",
    "collator",
    "gguf_checkpoint",
    "load",
    "load_adapter",
    "load_metric",
    "make_plan",
    "merge",
    "report",
    "targets",
    "training_args",
    "wrap",
]
