"""The Plan: everything a spec decides, decided once.

`make_plan(model, lora, freeze, quant)` reads a model's structure (a real
model or one on the meta device: only names, classes and shapes) and returns a
frozen `Plan`: the LoRA targets with their rank and alpha, the modules trained
in full, the base parameters trained in full, the modules bitsandbytes will
quantize, what is skipped and why, and each default used with its source.
It changes nothing and imports no peft or bitsandbytes. `wrap` executes a
Plan, `report` counts one, the memory simulator runs one, and the adapter's
manifest saves one for `merge` to read. Every check on user input happens
here, so a refused spec never leaves a model half-changed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from dataclasses import dataclass
from typing import Any

from .errors import QuantizationError, SpecError, TargetError, closest
from .names import (adaptable_kind, is_norm, outermost, output_embedding_names, suffix_match, task_of_class, under)
from .specs import Freeze, Lora, Quant, resolve_blocks, spec_dict
from .state import is_quantized, source_of
from .zoo import Preset, block_of, find_block_lists, preset_for


@dataclass(frozen=True)
class Target:
    """One module that gets LoRA adapters."""

    name: str
    kind: str      # Linear, Conv1D, Conv2d, Embedding
    r: int
    alpha: float


@dataclass(frozen=True)
class Plan:
    preset: str
    task: str
    lora: Lora | None
    freeze: Freeze | None
    quant: Quant | None
    targets: tuple[Target, ...]
    trained_in_full: tuple[str, ...]      # modules: heads, the head path, Lora.train_fully (peft modules_to_save)
    trainable: tuple[str, ...]            # base parameters trained in full (never a quantized weight)
    quantized: tuple[str, ...]            # modules bitsandbytes replaces
    quant_skipped: tuple[str, ...]        # module names kept in full precision (bitsandbytes' skip list)
    skipped: tuple[tuple[str, str], ...]  # (module, why) for candidates left out
    defaults: tuple[tuple[str, Any, str], ...]  # (knob, value, where the value came from)
    block_lists: tuple[str, ...]
    heads: tuple[str, ...]                # heads and output embeddings, for grouping a report
    embeddings: tuple[str, ...]

    @property
    def target_names(self) -> list[str]:
        return [t.name for t in self.targets]

    def default(self, knob: str) -> Any:
        """The value used for `knob` ("lora.alpha", "lora.targets"), whoever chose it."""
        return next(value for name, value, _ in self.defaults if name == knob)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.update(lora=spec_dict(self.lora), freeze=spec_dict(self.freeze), quant=spec_dict(self.quant))
        return data


def model_task(model: Any) -> str:
    source = source_of(model)
    return (source.task if source and source.task else None) or task_of_class(type(model).__name__) or "base"


def head_modules(model: Any, preset: Preset) -> list[str]:
    """Task heads: the preset's head modules present in the model, plus any module whose weights the
    checkpoint did not contain (recorded by `lorakit.load`)."""
    names = [n for n, _ in model.named_modules() if n]
    heads = {n for n in names for h in preset.heads if suffix_match(n, h)}
    source = source_of(model)
    for key in source.missing_keys if source else ():
        module = key.rsplit(".", 1)[0]
        if module in names:
            heads.add(module)
    return outermost(heads)


def _trained_in_full(model: Any, preset: Preset, lora: Lora | None) -> list[str]:
    """Heads, the head path the preset says must learn (only when a head is there), and Lora.train_fully."""
    heads = head_modules(model, preset)
    names = [n for n, _ in model.named_modules() if n]
    extra = [n for n in names for t in preset.train_fully if heads and suffix_match(n, t)]
    for wanted in (lora.train_fully if lora else []):
        found = [n for n in names if suffix_match(n, wanted)]
        if not found:
            raise TargetError(f"Lora.train_fully names {wanted!r}, which is not a module of this model",
                              hint=did_you_mean(wanted, names))
        extra += found
    return outermost(set(heads) | set(extra))


def did_you_mean(wanted: str, names: Any) -> str:
    suffixes = {n.split(".")[-1] for n in names if n} | {n for n in names if n}
    near = closest(wanted, suffixes)
    return f"did you mean {', '.join(near)}?" if near else "see lorakit.targets(model) for the names that exist"


def candidates(model: Any, block_lists: list[str]) -> dict[str, tuple[str, str]]:
    """LoRA-able modules: full name -> (kind, suffix), suffix being the block-relative name inside blocks."""
    found = {}
    for name, module in model.named_modules():
        kind = adaptable_kind(module)
        if kind is None or ".base_layer" in name or "lora_" in name:
            continue
        where = block_of(name, block_lists)
        found[name] = (kind, where[2] if where else name)
    return found


def _resolve_targets(model: Any, lora: Lora, preset: Preset, block_lists: list[str], full: list[str],
                     wanted: Any) -> list[str]:
    found = candidates(model, block_lists)
    output = output_embedding_names(model)
    excluded = set(full) | output
    chosen: set[str] = set()
    for entry in [wanted] if isinstance(wanted, str) else wanted:
        if entry == "all-linear":
            linear = {n for n, (k, _) in found.items() if k in ("Linear", "Conv1D") and not under(n, excluded)}
            hits = {n for n in linear if block_of(n, block_lists)} or linear
        elif entry in preset.groups:
            hits = {n for n, (_, rel) in found.items() if block_of(n, block_lists) and preset.group_matches(entry, rel)}
        elif entry in ("attention", "mlp", "conv"):
            raise TargetError(f'target group "{entry}" is not defined for this model (preset: {preset.name})',
                              hint='use "all-linear" or module names; lorakit.targets(model) lists them')
        else:
            hits = {n for n, (_, rel) in found.items() if suffix_match(n, entry) or fnmatch.fnmatchcase(rel, entry)}
            if not hits:
                suffixes = sorted({rel for _, rel in found.values()})
                near = closest(entry, suffixes)
                raise TargetError(f"no LoRA-able module matches target {entry!r}",
                                  hint=(f"closest: {', '.join(near)}; " if near else "") + "modules that exist: "
                                  f"{', '.join(suffixes[:12])}{' ...' if len(suffixes) > 12 else ''}")
        clash = sorted(n for n in hits if under(n, excluded) and n not in output)
        if clash and entry != "all-linear":
            raise SpecError(f"target {entry!r} hits {', '.join(clash)}, which is trained in full",
                            hint="drop it from Lora.targets; heads are trained in full and saved with the adapter")
        chosen |= {n for n in hits if not under(n, excluded)}
    if lora.layers is not None:
        chosen = _in_blocks(model, chosen, lora.layers, block_lists, "Lora.layers")
    if not chosen:
        raise TargetError("this LoRA spec selects no module",
                          hint="widen Lora.targets or Lora.layers; lorakit.targets(model) lists the candidates")
    return sorted(chosen)


def _in_blocks(model: Any, names: set[str], selection: list, block_lists: list[str], knob: str) -> set[str]:
    if not block_lists:
        raise SpecError(f"{knob} selects blocks, but this model has no repeated blocks",
                        hint="select modules by name or regex instead")
    modules = dict(model.named_modules())
    wanted = {stack: resolve_blocks(selection, len(modules[stack]), knob) for stack in block_lists}
    return {n for n in names if (where := block_of(n, block_lists)) and where[1] in wanted[where[0]]}


def pattern_value(name: str, mapping: dict, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern rule (`get_pattern_key`): the first key, in order, that matches
    the module name as a regex suffix. Kept here so that planning needs no peft import."""
    for key, value in mapping.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _trainable(model: Any, freeze: Freeze | None, preset: Preset, lora: Lora | None, full: list[str],
               block_lists: list[str]) -> dict[str, bool]:
    """Parameter name -> trains in full? (LoRA's own parameters are peft's business.)"""
    params = [n for n, _ in model.named_parameters()]
    trainable = dict.fromkeys(params, freeze is not None or lora is None)
    if freeze is not None:
        modules = dict(model.named_modules())

        def set_all(names: list[str], value: bool, what: str) -> None:
            if not names:
                raise SpecError(f"Freeze.{what} matches no parameter of this model",
                                hint="lorakit.targets(model) and model.named_parameters() show what exists")
            trainable.update(dict.fromkeys(names, value))

        if freeze.embeddings:
            named = {n for n, m in modules.items() if n and (adaptable_kind(m) == "Embedding"
                                                             or any(suffix_match(n, e) for e in preset.embeddings))}
            set_all([p for p in params if under(p.rpartition(".")[0], named)], False, "embeddings")
        for knob, selection in (("first_layers", [f"first:{freeze.first_layers}"] if freeze.first_layers else None),
                                ("last_layers", [f"last:{freeze.last_layers}"] if freeze.last_layers else None),
                                ("layers", freeze.layers)):
            if selection:
                set_all(sorted(_in_blocks(model, set(params), selection, block_lists, f"Freeze.{knob}")), False, knob)
        for regex in freeze.patterns:
            set_all([p for p in params if re.search(regex, p)], False, f"patterns {regex!r}")
        if freeze.backbone:
            trainable = dict.fromkeys(params, False)
        for flag, owned in (("norms", lambda p: is_norm(modules[p.rpartition(".")[0]])),
                            ("biases", lambda p: p.endswith("bias"))):
            value = getattr(freeze, flag)
            if value is not None:
                set_all([p for p in params if owned(p)], not value, flag)
        for regex in freeze.keep:
            set_all([p for p in params if re.search(regex, p)], True, f"keep {regex!r}")
    for p in params:
        if under(p.rpartition(".")[0], full):
            trainable[p] = True
    return trainable


def _quant_skips(model: Any, quant: Quant, full: list[str]) -> dict[str, str]:
    """Modules kept in full precision, with the reason: transformers' own skip list (output embeddings,
    tied weights, the last module), `_keep_in_fp32_modules`, what lorakit trains in full, the user's list."""
    from transformers import PreTrainedModel
    from transformers.quantizers.base import get_keys_to_not_convert

    skips = {}
    if isinstance(model, PreTrainedModel):
        skips.update(dict.fromkeys(get_keys_to_not_convert(model), "transformers keeps it unquantized"))
        skips.update(dict.fromkeys(getattr(model, "_keep_in_fp32_modules", None) or [], "kept in fp32 by the model"))
    skips.update(dict.fromkeys(full, "trained in full"))
    skips.update(dict.fromkeys(quant.skip_modules, "Quant.skip_modules"))
    return skips


def _quantized(model: Any, skip: list[str]) -> list[str]:
    import torch
    from transformers.quantizers.quantizers_utils import should_convert_module

    names = [n for n, m in model.named_modules()
             if (type(m) is torch.nn.Linear or adaptable_kind(m) == "Conv1D") and should_convert_module(n, skip)]
    if not names:
        raise QuantizationError("this model has no Linear layer to quantize outside its heads",
                                hint="quantization applies to Linear/Conv1D layers; drop quant=...")
    return names


def make_plan(model: Any, lora: Lora | dict | int | None = None, freeze: Freeze | str | dict | None = None,
              quant: Quant | str | None = None, preset: str | None = None) -> Plan:
    """Decide what `lora`, `freeze` and `quant` do to `model` (real or on the meta device). Changes nothing."""
    lora, freeze, quant = Lora.coerce(lora), Freeze.coerce(freeze), Quant.coerce(quant)
    chosen = preset_for(model, preset)
    block_lists = find_block_lists(model, chosen)
    defaults: list[tuple[str, Any, str]] = []
    full = _trained_in_full(model, chosen, lora)
    targets: list[Target] = []
    skipped = [(n, "output embedding (tied to the input embedding in many models)")
               for n in sorted(output_embedding_names(model)) if lora]
    if lora:
        wanted, source = ((lora.targets, "Lora.targets") if lora.targets is not None else
                          (chosen.recommended["targets"], f"preset {chosen.name}") if "targets" in chosen.recommended
                          else ("all-linear", "lorakit default"))
        alpha, alpha_source = ((lora.alpha, "Lora.alpha") if lora.alpha is not None else
                               (chosen.recommended["alpha"], f"preset {chosen.name}") if "alpha" in chosen.recommended
                               else (2 * lora.r, "lorakit default: 2*r"))
        defaults += [("lora.targets", wanted, source), ("lora.alpha", alpha, alpha_source)]
        kinds = dict(candidates(model, block_lists))
        for name in _resolve_targets(model, lora, chosen, block_lists, full, wanted):
            targets.append(Target(name, kinds[name][0], pattern_value(name, lora.rank_pattern, lora.r),
                                  pattern_value(name, lora.alpha_pattern, alpha)))
        skipped += [(n, "trained in full") for n in full]
    trainable = _trainable(model, freeze, chosen, lora, full, block_lists)
    quantized: list[str] = []
    quant_skips: dict[str, str] = {}
    if quant is not None:
        if is_quantized(model):
            raise QuantizationError("this model is already quantized",
                                    hint="drop quant=..., or start from the full-precision model")
        quant_skips = _quant_skips(model, quant, full)
        quantized = _quantized(model, sorted(quant_skips))
        skipped += sorted(quant_skips.items())
        quantized_weights = {f"{n}.weight" for n in quantized}
        trainable = {n: t and n not in quantized_weights for n, t in trainable.items()}
    output = output_embedding_names(model)
    modules = [n for n, _ in model.named_modules() if n]
    embeddings = [n for n, m in model.named_modules() if n and (any(suffix_match(n, e) for e in chosen.embeddings)
                                                                 or type(m).__name__ == "Embedding")]
    return Plan(preset=chosen.name, task=model_task(model), lora=lora, freeze=freeze, quant=quant,
                targets=tuple(targets), trained_in_full=tuple(full),
                trainable=tuple(n for n, t in trainable.items() if t), quantized=tuple(quantized),
                quant_skipped=tuple(sorted(quant_skips)), skipped=tuple(skipped), defaults=tuple(defaults),
                block_lists=tuple(block_lists), heads=tuple(sorted(set(full) | (output & set(modules)))),
                embeddings=tuple(embeddings))
