"""make_plan: everything a spec decides, decided once.

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
import math
import re
from typing import Any

from ..core.errors import QuantizationError, SpecError, TargetError
from ..spec.names import (adaptable_kind, expert_tensors, is_norm, outermost, output_embedding_names, suffix_match,
                          task_of_class, under)
from ..spec.specs import REWRITES_BASE, Freeze, Lora, Quant, spec_dict
from ..spec.zoo import Preset, block_of, find_block_lists, preset_for, ruled_modules
from .plan import Plan, Target
from .quantized import as_loaded, quant_skips, quantized_layers
from .state import loaded_quant, source_of
from .targeting import (candidates, did_you_mean, in_blocks, left_out, parameter_target_rules, pattern_value,
                        resolve_targets, tied_layers)


def model_task(model: Any) -> str:
    source = source_of(model)
    return (source.task if source and source.task else None) or task_of_class(type(model).__name__) or "base"


def head_modules(model: Any, preset: Preset, block_lists: list[str]) -> list[str]:
    """Task heads: the preset's head modules present in the model outside its repeated blocks (a block's
    `router.classifier` is no task head), plus any module whose weights the checkpoint did not contain
    (recorded by `lorakit.load`)."""
    names = [n for n, _ in model.named_modules() if n]
    heads = {n for n in names for h in preset.heads if suffix_match(n, h) and not block_of(n, block_lists)}
    source = source_of(model)
    for key in source.missing_keys if source else ():
        module = key.rsplit(".", 1)[0]
        if module in names:
            heads.add(module)
    return outermost(heads)


def _trained_in_full(model: Any, preset: Preset, lora: Lora | None, block_lists: list[str]) -> list[str]:
    """Heads, the head path the preset says must learn (only when a head is there), and Lora.train_fully."""
    heads = head_modules(model, preset, block_lists)
    names = [n for n, _ in model.named_modules() if n]
    extra = [n for n in names for t in preset.train_fully if heads and suffix_match(n, t)]
    for wanted in (lora.train_fully if lora else []):
        found = [n for n in names if suffix_match(n, wanted)]
        if not found:
            raise TargetError(f"Lora.train_fully names {wanted!r}, which is not a module of this model",
                              hint=did_you_mean(wanted, names))
        extra += found
    return outermost(set(heads) | set(extra))


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
                set_all(sorted(in_blocks(model, set(params), selection, block_lists, f"Freeze.{knob}")), False, knob)
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


def _resolved(lora: Lora, preset: Preset) -> tuple[Lora, list[tuple[str, Any, str]]]:
    """`lora` with every unset knob filled in (the user's value, else the preset's `recommended`, else lorakit's
    fallback), and where each value came from. An alpha from the preset keeps the preset's alpha/r ratio."""
    recommended, where = preset.recommended, f"preset {preset.name}"

    def pick(knob: str, fallback: Any, fallback_source: str) -> tuple[Any, str]:
        if getattr(lora, knob) is not None:
            return getattr(lora, knob), f"Lora.{knob}"
        return (recommended[knob], where) if knob in recommended else (fallback, fallback_source)

    r, r_source = pick("r", 8, "lorakit default")
    dropout, dropout_source = pick("dropout", 0.0, "lorakit default")
    targets, targets_source = pick("targets", "all-linear", "lorakit default")
    if lora.alpha is not None:
        alpha, alpha_source = lora.alpha, "Lora.alpha"
    elif "alpha" in recommended:
        ratio = recommended["alpha"] / recommended.get("r", r)
        alpha, alpha_source = ratio * r, f"{where} (alpha/r = {ratio:g})"
    else:
        alpha, alpha_source = 2 * r, "lorakit default: 2*r"
    resolved = dataclasses.replace(lora, r=r, alpha=alpha, dropout=dropout, targets=targets)
    return resolved, [("lora.r", r, r_source), ("lora.alpha", alpha, alpha_source),
                      ("lora.dropout", dropout, dropout_source), ("lora.targets", targets, targets_source)]


def _is_tensor(model: Any, name: str) -> bool:
    try:
        model.get_submodule(name)
        return False
    except AttributeError:
        return True


def _target(model: Any, name: str, kind: str, lora: Lora) -> Target:
    """A target with its rank and alpha: peft's rank/alpha pattern first, then Lora.expert_rank for experts."""
    r = pattern_value(name, lora.rank_pattern, None)
    alpha = pattern_value(name, lora.alpha_pattern, None)
    parameter = _is_tensor(model, name)  # not a layer: peft adapts it through target_parameters
    owner = model.get_submodule(name.rpartition(".")[0]) if parameter else None
    if r is None and kind == "Experts" and lora.expert_rank is not None:
        experts = model.get_parameter(name).shape[0]
        r = max(1, lora.r // experts) if lora.expert_rank == "split" else lora.expert_rank
        if alpha is None:  # the same scaling as the other targets: alpha/r, or alpha/sqrt(r) with rsLoRA
            alpha = lora.alpha * (math.sqrt(r / lora.r) if lora.use_rslora else r / lora.r)
    return Target(name, kind, r if r is not None else lora.r, alpha if alpha is not None else lora.alpha,
                  parameter=parameter, transposed=bool(getattr(owner, "is_transposed", False)))


def _check_full_names(model: Any, full: list[str], targets: list[str]) -> None:
    """peft finds modules_to_save by plain name ending (`key.endswith(name)`, no dot): a module trained in full
    named `out` would also catch every `dropout` and the adapters' own `lora_dropout`."""
    names = [n for n, _ in model.named_modules() if n]
    names += [f"{t}.{part}" for t in targets for part in ("lora_dropout", "lora_A", "lora_B", "base_layer")]
    for keep in full:
        caught = [n for n in names if n.endswith(keep) and n not in full]
        if caught:
            raise TargetError(f"{keep!r} is trained in full beside LoRA, and peft picks such modules by the end of "
                              f"their name, so it would also catch {caught[0]!r}",
                              hint=f"rename the module {keep!r} (e.g. to {keep + '_head'!r}), or train it without "
                                   "LoRA: freeze=... alone keeps it out of peft")


def check_init(lora: Lora, quant: Quant | None, quantized_already: bool = False) -> None:
    """LoftQ fits a 4-bit base's quantization error, which lorakit computes while it quantizes; PiSSA and
    OLoRA move part of the base weights into the adapters, which a quantized base cannot take back, and
    peft converts them back to a plain LoRA only without DoRA and without rsLoRA with per-module patterns."""
    if lora.init == "default":
        return
    if quantized_already:
        raise SpecError(f"Lora(init={lora.init!r}) needs the full-precision weights, but this model was loaded "
                        "quantized", hint="load it in full precision and let wrap quantize it: "
                                          "wrap(model, lora=Lora(init=...), quant='4bit')")
    if lora.use_dora and lora.init != "gaussian":
        raise SpecError(f"Lora(init={lora.init!r}) cannot be combined with use_dora", hint="choose one of them")
    four_bit = quant is not None and quant.bits == 4
    if lora.init == "loftq" and not four_bit:
        raise SpecError("Lora(init='loftq') fits the adapters to a 4-bit base's quantization error, but this base "
                        f"is {'8-bit' if quant else 'not quantized'}",
                        hint="add quant='4bit', or use init='pissa' or 'olora' on a full-precision base")
    if lora.init in REWRITES_BASE:
        if quant is not None:
            raise SpecError(f"Lora(init={lora.init!r}) rewrites the base weights, which a quantized base cannot "
                            "hold", hint="use init='loftq' with quant='4bit', or drop quant=...")
        if lora.use_rslora and (lora.rank_pattern or lora.alpha_pattern):
            raise SpecError(f"Lora(init={lora.init!r}) with use_rslora and a rank or alpha pattern cannot be "
                            "saved as a plain LoRA (peft)", hint="drop use_rslora or the patterns")


def make_plan(model: Any, lora: Lora | dict | int | None = None, freeze: Freeze | str | dict | None = None,
              quant: Quant | str | None = None, preset: str | None = None) -> Plan:
    """Decide what `lora`, `freeze` and `quant` do to `model` (real or on the meta device). Changes nothing."""
    lora, freeze, quant = Lora.coerce(lora), Freeze.coerce(freeze), Quant.coerce(quant)
    loaded = loaded_quant(model)
    if quant is not None and loaded is not None:
        raise QuantizationError("this model is already quantized",
                                hint="drop quant=... (the Plan takes the model's own 8/4-bit layers as they are), "
                                     "or start from the full-precision model")
    if lora is not None:
        check_init(lora, quant, loaded is not None)
    chosen = preset_for(model, preset)
    block_lists = find_block_lists(model, chosen)
    defaults: list[tuple[str, Any, str]] = []
    full = _trained_in_full(model, chosen, lora, block_lists)
    ruled = ruled_modules(model)  # what cannot take LoRA, or bitsandbytes, where it sits
    targets: list[Target] = []
    skipped = [(n, "output embedding (tied to the input embedding in many models)")
               for n in sorted(output_embedding_names(model)) if lora]
    if lora:
        lora, defaults = _resolved(lora, chosen)
        found = candidates(model, block_lists)
        refused = {n: rule.reason for n, rule in ruled.items() if not rule.lora}
        refused.update({n: why for n, why in tied_layers(model).items() if n in found})
        targets = [_target(model, name, found[name][0], lora)
                   for name in resolve_targets(model, lora, chosen, block_lists, full, lora.targets, refused, found)]
        lora, defaults = parameter_target_rules(lora, defaults, targets)
        skipped += [(n, "trained in full") for n in full]
        skipped += left_out(model, found, chosen, block_lists, lora, targets,
                             set(full) | output_embedding_names(model), refused)
        _check_full_names(model, full, [t.name for t in targets])
        other = [t for t in targets if t.kind not in ("Linear", "Conv1D")]
        if lora.init in REWRITES_BASE and other:
            raise SpecError(f"Lora(init={lora.init!r}) works on Linear layers only (peft), but {other[0].name} is "
                            f"a {other[0].kind}", hint="target Linear layers only, or leave init at 'default'")
    if lora and "learning_rate" in chosen.recommended:  # a LoRA rate: not for full or head-only training
        defaults.append(("learning_rate", chosen.recommended["learning_rate"], f"preset {chosen.name}"))
    trainable = _trainable(model, freeze, chosen, lora, full, block_lists)
    # peft freezes what it wraps (its base_layer), whatever the freeze spec says: a target module, or the whole
    # module holding a target tensor (an MoE layer's experts, biases included)
    adapted = {t.name.rpartition(".")[0] if t.parameter else t.name for t in targets}
    trainable = {n: t and not under(n.rpartition(".")[0], adapted) for n, t in trainable.items()}
    quantized: list[str] = []
    dequantized: list[str] = []
    full_precision: dict[str, str] = {}
    if quant is not None:
        full_precision = quant_skips(model, quant, full, ruled)
        quantized = quantized_layers(model, sorted(full_precision))
    elif loaded is not None:
        quant, quantized, full_precision, dequantized = as_loaded(model, loaded, full, ruled)
        defaults.append(("quant", spec_dict(quant), "the model as loaded (its bitsandbytes layers)"))
    if quant is not None:
        skipped += sorted(full_precision.items())
        skipped += [(f"{n}.{p}", "fused expert tensor: bitsandbytes quantizes Linear layers only, so it stays in "
                                 "full precision (counted so by report and simulate)")
                    for n, m in model.named_modules() for p in expert_tensors(m)]
        quantized_weights = {f"{n}.weight" for n in quantized}
        trainable = {n: t and n not in quantized_weights for n, t in trainable.items()}
    output = output_embedding_names(model)
    modules = [n for n, _ in model.named_modules() if n]
    embeddings = [n for n, m in model.named_modules() if n and (any(suffix_match(n, e) for e in chosen.embeddings)
                                                                 or type(m).__name__ == "Embedding")]
    return Plan(preset=chosen.name, task=model_task(model), lora=lora, freeze=freeze, quant=quant,
                targets=tuple(targets), trained_in_full=tuple(full),
                trainable=tuple(n for n, t in trainable.items() if t), quantized=tuple(quantized),
                quant_skipped=tuple(sorted(full_precision)), skipped=tuple(skipped), defaults=tuple(defaults),
                block_lists=tuple(block_lists), heads=tuple(sorted(set(full) | (output & set(modules)))),
                embeddings=tuple(embeddings), dequantized=tuple(dequantized))
