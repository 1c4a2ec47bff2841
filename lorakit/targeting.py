"""Which modules a LoRA spec or a block selection names: the target half of planning.

Only `plan` calls these (and `wrap.targets`, for its listing of candidates); they read module names and
classes, never change anything, and raise `TargetError` / `SpecError` naming what exists.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from .errors import SpecError, TargetError, closest
from .names import adaptable_kind, output_embedding_names, suffix_match, under
from .specs import Lora, resolve_blocks
from .zoo import Preset, block_of


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


def resolve_targets(model: Any, lora: Lora, preset: Preset, block_lists: list[str], full: list[str],
                     wanted: Any) -> list[str]:
    """The full names of the modules `wanted` (a target, a group, "all-linear" or a list) selects."""
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
        chosen = in_blocks(model, chosen, lora.layers, block_lists, "Lora.layers")
    if not chosen:
        raise TargetError("this LoRA spec selects no module",
                          hint="widen Lora.targets or Lora.layers; lorakit.targets(model) lists the candidates")
    return sorted(chosen)


def in_blocks(model: Any, names: set[str], selection: list, block_lists: list[str], knob: str) -> set[str]:
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
