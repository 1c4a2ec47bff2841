"""Which modules a LoRA spec or a block selection names: the target half of planning.

Only `plan` calls these (and `wrap.targets`, for its listing of candidates); they read module names and
classes, never change anything, and raise `TargetError` / `SpecError` naming what exists.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from typing import Any

from ..core.errors import NothingSelectedError, SpecError, TargetError, closest
from ..spec.blocks import resolve_blocks
from ..spec.names import adaptable_kind, expert_tensors, is_norm, is_router, output_embedding_names, suffix_match, under
from ..spec.specs import Lora
from ..spec.zoo import Preset, block_of
from .plan import Target


def did_you_mean(wanted: str, names: Any) -> str:
    suffixes = {n.split(".")[-1] for n in names if n} | {n for n in names if n}
    near = closest(wanted, suffixes)
    return f"did you mean {', '.join(near)}?" if near else "see lorakit.targets(model) for the names that exist"


# Kinds that are mostly tensors, not layers (peft adapts them through target_parameters): they also answer to
# the name of the module that holds them.
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
            entries += [(f"{name}.{param}" if name else param, "Experts") for param in expert_tensors(module)]
        for full, k in entries:
            where = block_of(full, block_lists)
            found[full] = (k, where[2] if where else full)
    return found


def resolve_targets(model: Any, lora: Lora, preset: Preset, block_lists: list[str], full: list[str],
                     wanted: Any, refused: dict[str, str], found: dict[str, tuple[str, str]]) -> list[str]:
    """The full names of the candidates (`found`, see `candidates`) that `wanted` (a target, a group,
    "all-linear" or a list) selects; `refused` (name -> why) cannot take LoRA: left out of every selection,
    and an error to name."""
    output = output_embedding_names(model)
    excluded = set(full) | output | set(refused)
    chosen: set[str] = set()
    for entry in [wanted] if isinstance(wanted, str) else wanted:
        selection = entry in ("all-linear", *preset.groups, *KIND_GROUPS)
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
        named = sorted(n for n in hits if n in refused)
        if named and (not selection or set(named) == hits):  # else a selection leaves them out, said in skipped
            raise TargetError(f"target {entry!r} cannot take LoRA on {named[0]}: {refused[named[0]]}",
                              hint="leave it out of Lora.targets; all-linear does")
        clash = sorted(n for n in hits if under(n, full))
        if clash and entry != "all-linear":
            raise SpecError(f"target {entry!r} hits {', '.join(clash)}, which is trained in full",
                            hint="drop it from Lora.targets; heads are trained in full and saved with the adapter")
        # the output head joins only when named: a selection leaves it out (its update is vocabulary-wide)
        chosen |= {n for n in hits if not under(n, excluded if selection else excluded - output)}
    if lora.layers is not None:
        chosen = in_blocks(model, chosen, lora.layers, block_lists, "Lora.layers")
    if not chosen:
        raise NothingSelectedError("this LoRA spec selects no module",
                                   hint="widen Lora.targets or Lora.layers; lorakit.targets(model) lists the "
                                        "candidates")
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


def tied_layers(model: Any) -> dict[str, str]:
    """Layers whose weight another layer shares (Zamba's shared transformer block; an embedding tied to the
    output layer): one weight used in two places cannot take two adapters, nor have one folded in alone."""
    users: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and adaptable_kind(module) and weight is not None:
            users.setdefault(id(weight), []).append(name)
    output = output_embedding_names(model)
    why = {}
    for names in (n for n in users.values() if len(n) > 1):
        for name in names:
            other = "input embedding" if name in output else "output layer"
            why[name] = (f"its weight is tied to the {other}: merged, an adapter on it would change the {other} "
                         "too (untie them first: tie_word_embeddings=False and a copy of the weight)"
                         if output & set(names) else "its weight is shared with another layer (tied): a weight "
                         "used in two places cannot take separate adapters, nor be merged with one")
    return why


def parameter_target_rules(lora: Lora, defaults: list, targets: list[Target]) -> tuple[Lora, list]:
    """peft adapts expert tensors and routers in place (its ParamWrapper), which takes no dropout and no DoRA:
    a dropout the user did not choose becomes 0, and the Plan says so; one the user chose is refused."""
    parameters = [t for t in targets if t.parameter]
    if lora.expert_rank is not None and not any(t.kind == "Experts" for t in targets):
        raise SpecError("Lora.expert_rank sets the rank of fused MoE expert tensors, and this spec targets none",
                        hint='drop expert_rank, or target the experts (targets="all-linear" or ["experts"])')
    if not parameters:
        return lora, defaults
    if lora.use_dora:
        raise SpecError(f"Lora(use_dora=True) cannot adapt {parameters[0].name}: peft has no DoRA for MoE expert "
                        "tensors or routers", hint="drop use_dora, or leave the experts out of Lora.targets")
    source = dict((k, s) for k, _, s in defaults)["lora.dropout"]
    if lora.dropout:
        if source == "Lora.dropout":
            raise SpecError(f"Lora.dropout={lora.dropout} cannot apply to {parameters[0].name}: peft adapts MoE "
                            "expert tensors and routers in place (ParamWrapper), with no dropout",
                            hint="set dropout=0, or leave the experts out of Lora.targets")
        defaults = [d if d[0] != "lora.dropout" else ("lora.dropout", 0.0, f"0, not {lora.dropout} ({source}): peft's "
                    "ParamWrapper, which adapts the expert tensors, has no dropout") for d in defaults]
        lora = dataclasses.replace(lora, dropout=0.0)
    return lora, defaults


def left_out(model: Any, found: dict, preset: Preset, block_lists: list[str], lora: Lora, targets: list[Target],
              excluded: set[str], refused: dict[str, str]) -> list[tuple[str, str]]:
    """What the LoRA spec could have adapted but did not, where that is a decision worth stating: routers,
    the preset's groups it leaves out by default, the Linear layers outside the blocks that all-linear
    skips (peft's all-linear takes them), what cannot take LoRA (and why), and the weights inside the blocks
    that are no layer lorakit adapts (XLNet's attention tensors, a 1D convolution, DBRX's 2D experts)."""
    chosen = {t.name for t in targets}
    wanted = [lora.targets] if isinstance(lora.targets, str) else list(lora.targets)
    why: dict[str, str] = {}
    if "all-linear" in wanted:
        inside = all_linear(found, block_lists, excluded)
        for name, (kind, _) in found.items():
            if kind in ("Linear", "Conv1D") and name not in inside and not under(name, excluded):
                why[name] = ("outside the repeated blocks: lorakit's all-linear adapts the blocks (peft's would take "
                             "this too); name it in Lora.targets to adapt it, or in Lora.train_fully to train it")
    for group, reason in (preset.left_out or {}).items():
        if group not in wanted:
            for name, (kind, rel) in found.items():
                if preset.group_matches(group, rel if block_of(name, block_lists) else None, name):
                    why.setdefault(name, reason)
    why.update(refused)
    for name, (kind, _) in found.items():
        if kind == "Router":
            why[name] = "MoE router: adapted only when named (Lora.targets=[..., \"router\"])"
    for name, module in model.named_modules():
        weights = [p for p, v in module.named_parameters(recurse=False) if v.dim() >= 2 and v.is_floating_point()
                   and f"{name}.{p}" not in found]
        if weights and name not in found and block_of(name, block_lists) and not is_norm(module):
            why.setdefault(name, f"a {type(module).__name__} keeps its weights as tensors ({', '.join(weights)}), "
                                 "not in a layer lorakit adapts (Linear, Conv1D, Conv2d, Embedding, MoE experts)")
    return sorted((n, w) for n, w in why.items() if n not in chosen and not under(n, excluded))
