"""`wrap` and `targets`: model surgery as plain functions.

Every check that can fail runs before the model is touched, so a mistake
leaves the model as it was. Then, in order: quantize (bitsandbytes), set
`requires_grad` from the freeze plan, and hand LoRA to peft with an explicit
list of full module names (so peft's suffix matching cannot pick up a module
lorakit did not mean, e.g. BERT's `attention.output.dense` for `output.dense`).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import AlreadyWrappedError, SpecError, TargetError, closest
from .specs import Freeze, Lora, Quant, resolve_blocks
from .zoo import Preset, block_of, find_block_lists, preset_for

_PEFT_TASKS = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM", "token-cls": "TOKEN_CLS"}


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _adaptable_kind(module: Any) -> str | None:
    """The LoRA-able kind of a module (what peft can wrap), or None."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):  # bitsandbytes layers subclass it
        return "Linear"
    if isinstance(module, Conv1D):
        return "Conv1D"
    if isinstance(module, torch.nn.Conv2d):
        return "Conv2d"
    if isinstance(module, torch.nn.Embedding):
        return "Embedding"
    return None


def model_task(model: Any) -> str:
    from .load import _ARCHITECTURE_TASKS

    source = getattr(model, "_lorakit_source", None)
    if source and source.get("task"):
        return source["task"]
    class_name = type(model).__name__
    return next((task for ending, task in _ARCHITECTURE_TASKS if class_name.endswith(ending)), "base")


def head_modules(model: Any, preset: Preset | None = None) -> list[str]:
    """Task heads: the preset's head modules present in the model, plus any module
    whose weights the checkpoint did not contain (recorded by `lorakit.load`)."""
    preset = preset or preset_for(model)
    names = [n for n, _ in model.named_modules() if n]
    heads = {n for n in names for h in preset.heads if _suffix_match(n, h)}
    for key in (getattr(model, "_lorakit_source", None) or {}).get("missing_keys", []):
        module = key.rsplit(".", 1)[0]
        if module in names:
            heads.add(module)
    # Keep outermost modules only (`classifier`, not also `classifier.dense`).
    return sorted(h for h in heads if not any(h.startswith(o + ".") for o in heads))


def trained_in_full(model: Any, preset: Preset, lora: Lora | None) -> list[str]:
    """Heads, the head path the preset says must learn (only when a head is there), and Lora.train_fully."""
    heads = head_modules(model, preset)
    names = dict(model.named_modules())
    extra = [n for n in names for t in preset.train_fully if heads and _suffix_match(n, t)]
    for wanted in (lora.train_fully if lora else []):
        found = [n for n in names if n and _suffix_match(n, wanted)]
        if not found:
            raise TargetError(f"Lora.train_fully names {wanted!r}, which is not a module of this model",
                              hint=_did_you_mean(wanted, names))
        extra += found
    chosen = set(heads) | set(extra)
    return sorted(n for n in chosen if not any(n.startswith(o + ".") for o in chosen))


def _did_you_mean(wanted: str, names: Any) -> str:
    suffixes = {n.split(".")[-1] for n in names if n} | {n for n in names if n}
    near = closest(wanted, suffixes)
    return f"did you mean {', '.join(near)}?" if near else "see lorakit.targets(model) for the names that exist"


@dataclass
class Targets:
    """LoRA candidates grouped by kind and name suffix, and what a spec would touch."""

    candidates: dict[str, dict[str, list[str]]]
    selected: list[str] = field(default_factory=list)
    trained_in_full: list[str] = field(default_factory=list)
    preset: str = "default"

    def __str__(self) -> str:
        lines = [f"preset: {self.preset}"]
        for kind, by_suffix in self.candidates.items():
            lines.append(f"{kind}:")
            for suffix, names in by_suffix.items():
                hit = sum(n in set(self.selected) for n in names)
                mark = f"  <- LoRA on {hit}" if hit else ""
                lines.append(f"  {suffix:40s} x{len(names)}{mark}")
        lines.append(f"LoRA would touch {len(self.selected)} modules; trained in full: "
                     f"{', '.join(self.trained_in_full) or 'none'}")
        return "\n".join(lines)


def _candidates(model: Any, block_lists: list[str]) -> dict[str, tuple[str, str]]:
    """full name -> (kind, suffix), suffix being the block-relative name inside blocks."""
    found = {}
    for name, module in model.named_modules():
        kind = _adaptable_kind(module)
        if kind is None or ".base_layer" in name or "lora_" in name:
            continue
        where = block_of(name, block_lists)
        found[name] = (kind, where[2] if where else name)
    return found


def _output_embedding_names(model: Any) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    output = get() if callable(get) else None
    return {n for n, m in model.named_modules() if output is not None and m is output}


def resolve_targets(model: Any, lora: Lora, preset: Preset) -> list[str]:
    """The full names of the modules `lora` puts adapters on."""
    block_lists = find_block_lists(model, preset)
    candidates = _candidates(model, block_lists)
    excluded = set(trained_in_full(model, preset, lora)) | _output_embedding_names(model)

    def outside(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") for e in excluded)

    wanted = lora.targets if lora.targets is not None else preset.recommended.get("targets", "all-linear")
    chosen: set[str] = set()
    for entry in [wanted] if isinstance(wanted, str) else wanted:
        if entry == "all-linear":
            linear = {n for n, (k, _) in candidates.items() if k in ("Linear", "Conv1D") and not outside(n)}
            in_blocks = {n for n in linear if block_of(n, block_lists)}
            hits = in_blocks or linear
        elif entry in preset.groups:
            hits = {n for n, (k, rel) in candidates.items()
                    if block_of(n, block_lists) and preset.group_matches(entry, rel)}
        elif entry in ("attention", "mlp", "conv"):
            raise TargetError(
                f'target group "{entry}" is not defined for this model (preset: {preset.name})',
                hint='use "all-linear" or module names; lorakit.targets(model) lists them')
        else:
            hits = {n for n, (_, rel) in candidates.items()
                    if _suffix_match(n, entry) or fnmatch.fnmatchcase(rel, entry)}
            if not hits:
                suffixes = sorted({rel for _, rel in candidates.values()})
                near = closest(entry, suffixes)
                raise TargetError(
                    f"no LoRA-able module matches target {entry!r}",
                    hint=(f"closest: {', '.join(near)}; " if near else "")
                    + f"modules that exist: {', '.join(suffixes[:12])}{' ...' if len(suffixes) > 12 else ''}")
        clash = sorted(n for n in hits if outside(n) and n not in _output_embedding_names(model))
        if clash and entry != "all-linear":
            raise SpecError(f"target {entry!r} hits {', '.join(clash)}, which is trained in full",
                            hint="drop it from Lora.targets; heads are trained in full and saved with the adapter")
        chosen |= {n for n in hits if not outside(n)}
    if lora.layers is not None:
        chosen = _in_blocks(model, chosen, lora.layers, block_lists, "Lora.layers")
    if not chosen:
        raise TargetError("this LoRA spec selects no module",
                          hint="widen Lora.targets or Lora.layers; lorakit.targets(model) lists the candidates")
    return sorted(chosen)


def _stacks(model: Any, block_lists: list[str]) -> dict[str, int]:
    modules = dict(model.named_modules())
    return {stack: len(modules[stack]) for stack in block_lists}


def _in_blocks(model: Any, names: set[str], selection: list, block_lists: list[str], knob: str) -> set[str]:
    if not block_lists:
        raise SpecError(f"{knob} selects blocks, but this model has no repeated blocks",
                        hint="select modules by name or regex instead")
    wanted = {stack: resolve_blocks(selection, count, knob) for stack, count in _stacks(model, block_lists).items()}
    kept = set()
    for name in names:
        where = block_of(name, block_lists)
        if where and where[1] in wanted[where[0]]:
            kept.add(name)
    return kept


def _is_norm(module: Any) -> bool:
    return "norm" in type(module).__name__.lower()


def plan_trainable(model: Any, freeze: Freeze | None, preset: Preset, lora: Lora | None) -> dict[str, bool]:
    """Parameter name -> trains in full? (LoRA's own parameters are peft's business.)"""
    params = [n for n, _ in model.named_parameters()]
    trainable = dict.fromkeys(params, freeze is not None or lora is None)
    if freeze is not None:
        modules = dict(model.named_modules())

        def under(prefixes: set[str]) -> list[str]:
            return [p for p in params if any(p.startswith(m + ".") for m in prefixes)]

        def set_all(names: list[str], value: bool, what: str) -> None:
            if not names:
                raise SpecError(f"Freeze.{what} matches no parameter of this model",
                                hint="lorakit.targets(model) and model.named_parameters() show what exists")
            for n in names:
                trainable[n] = value

        block_lists = find_block_lists(model, preset)
        if freeze.embeddings:
            import torch

            named = {n for n in modules for e in preset.embeddings if n and _suffix_match(n, e)}
            named |= {n for n, m in modules.items() if isinstance(m, torch.nn.Embedding)}
            set_all(under(named), False, "embeddings")
        for knob, selection in (("first_layers", [f"first:{freeze.first_layers}"] if freeze.first_layers else None),
                                ("last_layers", [f"last:{freeze.last_layers}"] if freeze.last_layers else None),
                                ("layers", freeze.layers)):
            if selection:
                blocks = _in_blocks(model, set(params), selection, block_lists, f"Freeze.{knob}")
                set_all(sorted(blocks), False, knob)
        for regex in freeze.patterns:
            set_all([p for p in params if re.search(regex, p)], False, f"patterns {regex!r}")
        if freeze.backbone:
            trainable = dict.fromkeys(params, False)
        for flag, owned in (("norms", lambda p: _is_norm(modules[p.rpartition(".")[0]])),
                            ("biases", lambda p: p.endswith("bias"))):
            value = getattr(freeze, flag)
            if value is not None:
                set_all([p for p in params if owned(p)], not value, flag)
        for regex in freeze.keep:
            set_all([p for p in params if re.search(regex, p)], True, f"keep {regex!r}")
    for module in trained_in_full(model, preset, lora):
        for p in params:
            if p.startswith(module + "."):
                trainable[p] = True
    return trainable


def targets(model: Any, lora: Lora | dict | None = None, *, preset: str | None = None) -> Targets:
    """Dry run: the LoRA candidates of `model`, and which ones `lora` (default: the preset's) would touch."""
    chosen_preset = preset_for(model, preset)
    lora = Lora.coerce(lora) or Lora()
    candidates = _candidates(model, find_block_lists(model, chosen_preset))
    grouped: dict[str, dict[str, list[str]]] = {}
    for name, (kind, suffix) in candidates.items():
        grouped.setdefault(kind, {}).setdefault(suffix, []).append(name)
    return Targets(candidates=grouped, selected=resolve_targets(model, lora, chosen_preset),
                   trained_in_full=trained_in_full(model, chosen_preset, lora), preset=chosen_preset.name)


def is_wrapped(model: Any) -> bool:
    return hasattr(model, "peft_config") or getattr(model, "_lorakit", None) is not None or any(
        "lora_A" in n for n, _ in model.named_modules())


def lora_config(model: Any, lora: Lora, preset: Preset, target_names: list[str], full: list[str]) -> Any:
    """The `peft.LoraConfig` for a resolved spec."""
    from peft import LoraConfig

    modules = dict(model.named_modules())
    conv1d = any(_adaptable_kind(modules[n]) == "Conv1D" for n in target_names)
    alpha = lora.alpha if lora.alpha is not None else preset.recommended.get("alpha", 2 * lora.r)
    task = _PEFT_TASKS.get(model_task(model))
    return LoraConfig(
        r=lora.r, lora_alpha=alpha, lora_dropout=lora.dropout, target_modules=target_names,
        modules_to_save=list(full) or None, rank_pattern=dict(lora.rank_pattern), alpha_pattern=dict(lora.alpha_pattern),
        use_rslora=lora.use_rslora, use_dora=lora.use_dora, bias=lora.bias,
        fan_in_fan_out=conv1d, task_type=task)


def wrap(model: Any, *, lora: Lora | dict | int | None = None, freeze: Freeze | str | dict | None = None,
         quant: Quant | str | None = None, preset: str | None = None) -> Any:
    """Make `model` ready to train: quantize, freeze, add LoRA adapters. Returns the model to train
    (a `peft.PeftModel` when `lora` is given, else `model` itself with `requires_grad` set)."""
    lora, freeze, quant = Lora.coerce(lora), Freeze.coerce(freeze), Quant.coerce(quant)
    if lora is None and freeze is None and quant is None:
        raise SpecError("wrap() was given nothing to do", hint="pass lora=..., freeze=... and/or quant=...")
    if is_wrapped(model):
        raise AlreadyWrappedError("this model is already wrapped (it has adapters or a lorakit spec)",
                                  hint="wrap the original model once, with every spec in one call")
    chosen_preset = preset_for(model, preset)
    # Everything that can fail on user input is decided here, before any change.
    target_names = resolve_targets(model, lora, chosen_preset) if lora else []
    full = trained_in_full(model, chosen_preset, lora)
    plan = plan_trainable(model, freeze, chosen_preset, lora)
    if quant is not None:
        from .quantize import check_quantizable, will_quantize

        check_quantizable(model)
        quantized = {f"{name}.weight" for name in will_quantize(model, quant, chosen_preset)}
        plan_after = {n: t and n not in quantized for n, t in plan.items()}
    else:
        plan_after = plan
    if not lora and not any(plan_after.values()):
        raise SpecError("this spec leaves no parameter trainable" + (" (quantized weights cannot be trained "
                        "in full)" if quant is not None else ""),
                        hint="unfreeze something (e.g. fewer first_layers) or add lora=lorakit.Lora()")
    source = getattr(model, "_lorakit_source", None)

    if quant is not None:
        from .quantize import quantize

        model = quantize(model, quant, chosen_preset)
    for name, param in model.named_parameters():
        param.requires_grad_(plan.get(name, False) and param.is_floating_point())
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(model, lora, chosen_preset, target_names, full))
        _restore_full_training(model, plan)
    from .adapter import fingerprint

    model._lorakit = {"lora": lora, "freeze": freeze, "quant": quant, "preset": chosen_preset.name,
                      "source": source, "targets": target_names, "trained_in_full": full,
                      "fingerprint": fingerprint(model)}  # of the base as loaded, before any training
    return model


def _restore_full_training(peft_model: Any, plan: dict[str, bool]) -> None:
    """peft freezes the whole base; give back the parameters the freeze plan trains in full."""
    from .adapter import peft_role

    for name, param in peft_model.named_parameters():
        role, original = peft_role(name)
        # LoRA-wrapped weights stay frozen; heads train as peft's modules_to_save copies
        if role != "base" or ".base_layer." in name or ".original_module." in name:
            continue
        if plan.get(original) and param.is_floating_point():
            param.requires_grad_(True)
