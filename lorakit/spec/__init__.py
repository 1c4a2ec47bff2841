"""What a user writes (Lora, Freeze, Quant) and the facts a spec is checked against: names, presets, module rules."""

from .blocks import parse_blocks, resolve_blocks
from .specs import Freeze, Lora, Quant
from .zoo import architectures, preset_for, presets

__all__ = ["Freeze", "Lora", "Quant", "architectures", "parse_blocks", "preset_for", "presets", "resolve_blocks"]
