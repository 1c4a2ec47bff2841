"""The adapter format (peft's files, tensors trained in full, the manifest) and the serving checks of a saved one."""

from .format import load_adapter, save_extras
from .serving import serving_breaches

__all__ = ["load_adapter", "save_extras", "serving_breaches"]
