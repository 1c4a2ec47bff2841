"""The Plan: everything a spec decides, decided once (`make_plan`, in make.py, decides it).

A frozen record of what `lora`, `freeze` and `quant` do to one model: the LoRA targets with their rank and
alpha, the modules trained in full, the base parameters trained in full, the modules bitsandbytes quantizes
(or quantized, for a model loaded so), what is skipped and why, and each default used with its source.
`wrap` executes a Plan, `report` counts one, the memory simulator runs one, and the adapter's manifest saves
one for `merge` to read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..spec.specs import Freeze, Lora, Quant, spec_dict


@dataclass(frozen=True)
class Target:
    """One module, or one parameter tensor, that gets LoRA adapters."""

    name: str
    kind: str      # Linear, Conv1D, Conv2d, Embedding; Experts (a fused 3D expert tensor), Router
    r: int
    alpha: float
    parameter: bool = False    # adapted through peft's target_parameters: `name` is a parameter's
    transposed: bool = False   # an expert tensor stored (experts, in, out), not (experts, out, in)


@dataclass(frozen=True)
class Plan:
    preset: str
    task: str
    lora: Lora | None                     # as resolved: every default filled in (see `defaults`)
    freeze: Freeze | None
    quant: Quant | None
    targets: tuple[Target, ...]
    trained_in_full: tuple[str, ...]      # modules: heads, the head path, Lora.train_fully (peft modules_to_save)
    trainable: tuple[str, ...]            # base parameters trained in full (never a quantized weight)
    quantized: tuple[str, ...]            # modules bitsandbytes replaces (or replaced, in a model loaded quantized)
    quant_skipped: tuple[str, ...]        # module names kept in full precision (bitsandbytes' skip list)
    skipped: tuple[tuple[str, str], ...]  # (module, why) for candidates left out
    defaults: tuple[tuple[str, Any, str], ...]  # (knob, value, where the value came from)
    block_lists: tuple[str, ...]
    heads: tuple[str, ...]                # heads and output embeddings, for grouping a report
    embeddings: tuple[str, ...]
    dequantized: tuple[str, ...] = ()     # 8/4-bit layers of a model loaded quantized that wrap dequantizes

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.targets]

    @property
    def target_modules(self) -> list[str]:
        """The modules peft wraps by name (its target_modules)."""
        return [t.name for t in self.targets if not t.parameter]

    @property
    def target_parameters(self) -> list[str]:
        """The parameter tensors peft adapts in place (its target_parameters): MoE experts, routers."""
        return [t.name for t in self.targets if t.parameter]

    def default(self, knob: str) -> Any:
        """The value used for `knob` ("lora.r", "lora.alpha", "lora.dropout", "lora.targets", "learning_rate"),
        whoever chose it; None when nothing sets it."""
        return next((value for name, value, _ in self.defaults if name == knob), None)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(lora=spec_dict(self.lora), freeze=spec_dict(self.freeze), quant=spec_dict(self.quant))
        return data
