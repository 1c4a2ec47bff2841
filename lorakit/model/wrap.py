"""`wrap` and `targets`: model surgery as plain functions, executing a Plan.

`make_plan` decides everything and checks every input first, so a mistake
leaves the model as it was. Then, in order: quantize (bitsandbytes), set
`requires_grad` from the plan, and hand LoRA to peft with the plan's explicit
list of full module names (so peft's suffix matching cannot pick up a module
lorakit did not mean, e.g. BERT's `attention.output.dense` for `output.dense`).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import threading
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import AlreadyWrappedError, LorakitError, NothingSelectedError, SpecError
from ..plan.accounting import planned_records
from ..plan.make import make_plan
from ..plan.plan import Plan
from ..plan.state import State, is_quantized, is_wrapped, source_of
from ..plan.targeting import candidates
from ..spec.names import bnb_bits, peft_role
from ..spec.specs import REWRITES_BASE, Lora
from ..spec.zoo import find_block_lists, preset_for
from .fingerprint import fingerprint
from .quantize import dequantize, quantize, require_bitsandbytes

# peft's task wrappers name the text inputs (input_ids, ...) in their forward; a model that takes pixels, audio
# features or waveforms gets peft's plain PeftModel (no task type), which passes every input through.
_PEFT_TASKS = {"causal-lm": "CAUSAL_LM", "image-text-to-text": "CAUSAL_LM", "seq-cls": "SEQ_CLS",
               "seq2seq": "SEQ_2_SEQ_LM", "token-cls": "TOKEN_CLS"}


@dataclass
class Targets:
    """LoRA candidates grouped by kind and name suffix, and what a spec would touch."""

    candidates: dict[str, dict[str, list[str]]]
    selected: list[str] = field(default_factory=list)
    trained_in_full: list[str] = field(default_factory=list)
    preset: str = "default"
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (candidate, why the spec leaves it alone)

    def __str__(self) -> str:
        lines = [f"preset: {self.preset}"]
        for kind, by_suffix in self.candidates.items():
            lines.append(f"{kind}:")
            for suffix, names in by_suffix.items():
                hit = sum(n in set(self.selected) for n in names)
                mark = f"  <- LoRA on {hit}" if hit else ""
                lines.append(f"  {suffix:40s} x{len(names)}{mark}")
        lines.append(f"LoRA would touch {len(self.selected)} modules or tensors; trained in full: "
                     f"{', '.join(self.trained_in_full) or 'none'}")
        by_reason: dict[str, list[str]] = {}
        for name, why in self.left_out:
            by_reason.setdefault(why, []).append(name)
        for why, names in by_reason.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            lines.append(f"left out: {shown}: {why}")
        return "\n".join(lines)


def targets(model: Any, lora: Lora | dict | None = None, *, preset: str | None = None) -> Targets:
    """Dry run: the LoRA candidates of `model`, and which ones `lora` (default: the preset's) would touch."""
    grouped: dict[str, dict[str, list[str]]] = {}
    for name, (kind, suffix) in candidates(model, find_block_lists(model, preset_for(model, preset))).items():
        grouped.setdefault(kind, {}).setdefault(suffix, []).append(name)
    try:
        plan = make_plan(model, Lora.coerce(lora) or Lora(), preset=preset)
    except NothingSelectedError as exc:  # still list what exists: that is what the user needs to choose from
        return Targets(candidates=grouped, preset=preset_for(model, preset).name,
                       left_out=[("(every candidate)", f"{exc.message}; name some of the modules above")])
    return Targets(candidates=grouped, selected=plan.target_names, trained_in_full=list(plan.trained_in_full),
                   preset=plan.preset, left_out=[(n, why) for n, why in plan.skipped if why != "trained in full"])


def lora_config(plan: Plan) -> Any:
    """The `peft.LoraConfig` that carries out a plan's LoRA part. Ranks and alphas that differ from the
    spec's own are passed per module by exact name, so peft applies the plan's values, not its own matching."""
    from peft import LoraConfig

    lora = plan.lora  # resolved: r, alpha, dropout and targets are set
    alpha = lora.alpha
    exact = {t.name: t for t in plan.targets}
    return LoraConfig(
        r=lora.r, lora_alpha=alpha, lora_dropout=lora.dropout, target_modules=plan.target_modules,
        target_parameters=plan.target_parameters or None,
        modules_to_save=list(plan.trained_in_full) or None,
        rank_pattern={re.escape(n): t.r for n, t in exact.items() if t.r != lora.r},
        alpha_pattern={re.escape(n): t.alpha for n, t in exact.items() if t.alpha != alpha},
        use_rslora=lora.use_rslora, use_dora=lora.use_dora, bias=lora.bias,
        # LoftQ: peft's own code needs CUDA; lorakit sets the factors itself once peft has made the layers
        init_lora_weights={"default": True, "loftq": True}.get(lora.init, lora.init),
        fan_in_fan_out=any(t.kind == "Conv1D" for t in plan.targets), task_type=_PEFT_TASKS.get(plan.task))


def written_by_lorakit(plan: dict) -> bool:
    """An adapter whose Plan lorakit saved (the manifest's): its config names the model's own modules."""
    return bool((plan or {}).get("targets"))


_PEFT_CALLS = threading.RLock()  # the rewrite below is switched off process-wide: one peft call at a time


@contextlib.contextmanager
def quiet_peft(as_written: bool = True) -> Iterator[None]:
    """lorakit's own peft calls.

    * peft's PeftModel reads transformers' deprecated `is_gradient_checkpointing`, which warns on every wrap;
      that one warning is silenced.
    * peft rewrites the config of some MoE families (DeepSeek-V2/V3, Qwen3-MoE, Mixtral, OLMoE, ...) from
      transformers-v4 module names to v5 ones, so that adapters trained under v4 still load: any target named
      gate_proj, up_proj, down_proj or gate (w1, w2, w3 on Mixtral) becomes an expert parameter. A config
      lorakit wrote (`as_written`: wrap's, or an adapter with a lorakit Plan) names the v5 model's own modules
      and parameters already, and the rewrite would move DeepSeek's dense and shared-expert adapters onto the
      experts: it is switched off for the call. Another adapter keeps peft's rewrite (it may be a v4 one).
    * peft checks rank_pattern / alpha_pattern keys against target modules only, and says that a key naming an
      expert parameter (`target_parameters`: split expert rank) "was ignored" while it applies it. A config lorakit
      wrote names each target exactly, so that warning is silenced for it."""
    from peft.utils import transformers_weight_conversion as conversion

    with _PEFT_CALLS, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        rewrite = conversion.convert_peft_config_for_transformers
        if as_written:
            warnings.filterwarnings("ignore", message="The following (rank|alpha)_pattern keys did not match",
                                    category=RuntimeWarning)
            conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
        try:
            yield
        finally:
            conversion.convert_peft_config_for_transformers = rewrite


def check_trainable(plan: Plan) -> None:
    if not plan.targets and not plan.trainable:
        raise SpecError("this spec leaves no parameter trainable" + (" (quantized weights cannot be trained "
                        "in full)" if plan.quant is not None else ""),
                        hint="unfreeze something (e.g. fewer first_layers) or add lora=lorakit.Lora()")


def wrap(model: Any, *, lora: Any = None, freeze: Any = None, quant: Any = None, preset: str | None = None) -> Any:
    """Make `model` ready to train: quantize, freeze, add LoRA adapters. Returns the model to train
    (a `peft.PeftModel` when `lora` is given, else `model` itself with `requires_grad` set).
    `lora`: a `Lora`, a dict of its fields or a rank; `freeze`: a `Freeze`, a dict or its short string form;
    `quant`: a `Quant`, "8bit" or "4bit"; `preset`: a preset name from adapters_zoo (default: by model type)."""
    if lora is None and freeze is None and quant is None:
        raise SpecError("wrap() was given nothing to do", hint="pass lora=..., freeze=... and/or quant=...")
    if not hasattr(model, "named_parameters"):
        raise SpecError(f"wrap() takes a model (a torch.nn.Module), got {type(model).__name__}",
                        hint="load one first, e.g. model = lorakit.load(path)")
    if is_wrapped(model):
        raise AlreadyWrappedError("this model is already wrapped (it has adapters or a lorakit spec)",
                                  hint="wrap the original model once, with every spec in one call")
    plan = make_plan(model, lora, freeze, quant, preset)
    check_trainable(plan)
    if plan.quant is not None:
        require_bitsandbytes()
    return execute(model, plan)


def execute(model: Any, plan: Plan) -> Any:
    """Carry out a plan made for this model (`make_plan`); returns the model to train."""
    source = source_of(model)
    base_fingerprint = fingerprint(model)  # of the base as loaded, before any change
    expected = planned_trainable(model, plan) if plan.lora is not None else 0  # from shapes, before quantizing
    loftq: dict = {}
    if plan.quant is not None and not is_quantized(model):  # else it arrived quantized, as the Plan says
        model, loftq = quantize(model, plan)
    dequantize(model, plan.dequantized)
    check_quantized(model, plan)
    trainable = set(plan.trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable and param.is_floating_point())
    if plan.lora is not None:
        from peft import get_peft_model

        try:
            with quiet_peft():
                model = get_peft_model(model, lora_config(plan))
        except (ValueError, TypeError, RuntimeError, KeyError, NotImplementedError) as exc:
            # the Plan was checked, so peft refusing it is a gap in lorakit's rules for this architecture
            raise LorakitError(f"peft refused the Plan for {type(model).__name__}: {exc}",
                               hint="leave the module peft names out of Lora.targets for now, and report this to "
                                    "lorakit with the model's config") from exc
        for name, (lora_a, lora_b) in loftq.items():
            layer = model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.data.copy_(lora_a)
            layer.lora_B["default"].weight.data.copy_(lora_b)
        # peft's classification models append "classifier" and "score" to modules_to_save whatever the model
        # has; the saved config should list what the plan trains, once each.
        for config in model.peft_config.values():
            config.modules_to_save = list(plan.trained_in_full) or None
        _restore_full_training(model, trainable)
        check_applied(model, plan, expected)
    rewrites = plan.lora is not None and plan.lora.init in REWRITES_BASE
    initial = _keep_initial_adapter(model) if rewrites else None
    model.lorakit_state = State(plan=plan, source=source, fingerprint=base_fingerprint, initial_adapter=initial)
    return model


def adapted(peft_model: Any) -> set[str]:
    """What peft put LoRA on, by its own record: layers (target_modules) and tensors (target_parameters)."""
    tuner = peft_model.base_model
    return set(tuner.targeted_module_names) | set(getattr(tuner, "targeted_parameter_names", None) or [])


def planned_trainable(model: Any, plan: Plan) -> int:
    """The number of trainable parameters the Plan promises (counted from layer shapes, before peft)."""
    return sum(r.numel for r in planned_records(model, plan) if r.trainable)


def check_quantized(model: Any, plan: Plan) -> None:
    """The Plan's quantized layers are exactly the model's bitsandbytes layers, however it got them."""
    held = {n for n, m in model.named_modules() if bnb_bits(m)}
    if held != set(plan.quantized):
        extra, missing = sorted(held - set(plan.quantized)), sorted(set(plan.quantized) - held)
        raise LorakitError("the model's 8/4-bit layers are not the Plan's: " + "; ".join(
            part for part in (f"{len(extra)} quantized that the Plan keeps in full precision, e.g. {extra[0]}"
                              if extra else "",
                              f"{len(missing)} in full precision that the Plan quantizes, e.g. {missing[0]}"
                              if missing else "") if part),
            hint="this is a lorakit bug for this architecture; please report it with the model's config")


def check_applied(peft_model: Any, plan: Plan, expected: int) -> None:
    """The Plan is the contract: what peft adapted and what trains must be exactly what it says."""
    applied, planned = adapted(peft_model), set(plan.target_names)
    if applied != planned:
        extra, missing = sorted(applied - planned), sorted(planned - applied)
        raise LorakitError("peft did not apply the Plan: " + "; ".join(
            part for part in (f"it adapted {len(extra)} tensors the Plan leaves alone, e.g. {extra[0]}" if extra else "",
                              f"it left out {len(missing)} the Plan targets, e.g. {missing[0]}" if missing else "")
            if part), hint="this is a lorakit bug for this architecture; please report it with the model's config")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if trainable != expected:
        raise LorakitError(f"the wrapped model trains {trainable:,} parameters, the Plan says {expected:,}",
                           hint="this is a lorakit bug for this architecture; please report it with the model's "
                                "config")


def _keep_initial_adapter(peft_model: Any) -> str:
    """Save the just-initialised adapters to a temporary folder that lives as long as the model."""
    folder = Path(tempfile.mkdtemp(prefix="lorakit-initial-")) / "initial"
    weakref.finalize(peft_model, shutil.rmtree, str(folder.parent), True)
    with quiet_peft():
        peft_model.save_pretrained(str(folder))
    return str(folder)


def _restore_full_training(peft_model: Any, trainable: set[str]) -> None:
    """peft freezes the whole base; give back the parameters the plan trains in full."""
    for name, param in peft_model.named_parameters():
        role, original = peft_role(name)
        # LoRA-wrapped weights stay frozen; heads train as peft's modules_to_save copies
        if role != "base" or ".base_layer." in name or ".original_module." in name:
            continue
        if original in trainable and param.is_floating_point():
            param.requires_grad_(True)
