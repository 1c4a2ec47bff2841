"""Models in: load (quantized while loading, if asked), GGUF files as checkpoints, wrap, a base's fingerprint."""

from .gguf import gguf_checkpoint
from .tasks import TASKS
from .wrap import Targets, targets

__all__ = ["TASKS", "Targets", "gguf_checkpoint", "targets"]
