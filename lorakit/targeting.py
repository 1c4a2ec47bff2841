"""Which modules a LoRA spec or a block selection names: the target half of planning.

Only `plan` calls these (and `wrap.targets`, for its listing of candidates); they read module names and
classes, never change anything, and raise `TargetError` / `SpecError` naming what exists.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from .errors import SpecError, TargetError, closest
from .names import adaptable_kind, is_router, output_embedding_names, parameter_targets, suffix_match, under
from .specs import Lora, resolve_blocks
from .zoo import Preset, block_of


def did_you_mean(wanted: str, names: Any) -> str:
    suffixes = {n.split(".")[-1] for n in names if n} | {n for n in names if n}
    near = closest(wanted, suffixes)
    return f"did you mean {', '.join(near)}?" if near else "see lorakit.targets(model) for the names that exist"


# Kinds peft adapts through `target_parameters` (its ParamWrapper): the name of such a target is a parameter's.
PARAMETER_KINDS = ("Experts", "Router")
# Groups every model has: what they select is a kind, not a name.
KIND_GROUPS = {"experts": "Experts", "router": "Router"}


def candidates(model: Any, block_lists: list[str]) -> dict[str, tuple[str, str]]:
    """What LoRA can adapt: full name -> (kind, suffix), suffix being the block-relative name inside blocks.
    Modules (Linear, Conv1D, Conv2d, Embedding) and, by their parameter's name, fused expert tensors
    ("Experts") and MoE routers ("Router", `router.weight`)."""
    found = {}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if ".base_layer" in name or "lora_" in name:
            continue
        kind = adaptable_kind(module)
        if kind == "Linear" and is_router(modules.get(name.rpartition(".")[0], module)):
            entries = [(name, "Router")]  # a router's own Linear layer (DBRX's router.layer)
        elif is_router(module) and getattr(module, "weight", None) is not None:
            # by its weight, through target_parameters, even when it subclasses Linear: Llama 4's router returns
            # a tuple, which peft's Linear wrapper cannot add an update to
            entries = [(f"{name}.weight", "Router")]
        else:
            entries = [(name, kind)] if kind else []
            entries += [(f"{name}.{param}" if name else param, k) for param, k in parameter_targets(module)]
        for full, k in entries:
            where = block_of(full, block_lists)
            found[full] = (k, where[2] if where else full)
    return found


def resolve_targets(model: Any, lora: Lora, preset: Preset, block_lists: list[str], full: list[str],
                     wanted: Any, refused: dict[str, str]) -> list[str]:
    """The full names of the modules `wanted` (a target, a group, "all-linear" or a list) selects; `refused`
    (name -> why) are candidates that cannot take LoRA, left out of every selection and an error to name."""
    found = candidates(model, block_lists)
    output = output_embedding_names(model)
    excluded = set(full) | output | set(refused)
    chosen: set[str] = set()
    for entry in [wanted] if isinstance(wanted, str) else wanted:
        named = next((n for n in refused if n == entry or suffix_match(n, entry)), None)
        if named is not None and entry not in ("all-linear", *preset.groups, *KIND_GROUPS):
            raise TargetError(f"target {entry!r} cannot take LoRA in this model: {refused[named]} ({named})",
                              hint="leave it out of Lora.targets; all-linear does")
        if entry == "all-linear":
            hits = all_linear(found, block_lists, excluded)
        elif entry in preset.groups:  # layers, not embeddings; routers only when named
            hits = {n for n, (k, rel) in found.items() if k not in ("Router", "Embedding") and preset.group_matches(
                entry, rel if block_of(n, block_lists) else None, n)}
        elif entry in KIND_GROUPS:
            hits = {n for n, (k, _) in found.items() if k == KIND_GROUPS[entry]}
            if not hits:
                raise TargetError(f"target group {entry!r}: this model has no {KIND_GROUPS[entry].lower()} tensors",
                                  hint="it is not a mixture-of-experts model; use \"all-linear\" or module names")
        elif entry in ("attention", "mlp", "conv"):
            raise TargetError(f'target group "{entry}" is not defined for this model (preset: {preset.name})',
                              hint='use "all-linear" or module names; lorakit.targets(model) lists them')
        else:  # a parameter target also answers to its module's name ("experts", "mlp.gate")
            hits = {n for n, (k, rel) in found.items() if suffix_match(n, entry) or fnmatch.fnmatchcase(rel, entry)
                    or (k in PARAMETER_KINDS and suffix_match(n.rpartition(".")[0], entry))}
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


def all_linear(found: dict[str, tuple[str, str]], block_lists: list[str], excluded: set[str]) -> set[str]:
    """"all-linear": the Linear (and Conv1D) layers and the fused expert tensors of the repeated blocks (of the
    whole model if it has no blocks). Routers, and Linear layers outside the blocks, only when named."""
    linear = {n for n, (k, _) in found.items() if k in ("Linear", "Conv1D", "Experts") and not under(n, excluded)}
    return {n for n in linear if block_of(n, block_lists)} or linear


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
