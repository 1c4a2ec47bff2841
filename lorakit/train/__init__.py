"""LoraTrainer, its arguments, classification and chat data, checkpoints sealed with checksums, metrics."""

from .arguments import training_args
from .chat import chat_data
from .data import causal_lm_data, classification_data, collator
from .metrics import classification_metrics, load_metric
from .trainer import LoraTrainer

__all__ = ["LoraTrainer", "causal_lm_data", "chat_data", "classification_data", "classification_metrics", "collator",
           "load_metric", "training_args"]
