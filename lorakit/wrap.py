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
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AlreadyWrappedError, SpecError
from .names import peft_role
from .plan import Plan, make_plan
from .targeting import candidates
from .quantize import quantize, require_bitsandbytes
from .specs import REWRITES_BASE, Lora
from .state import State, fingerprint, is_wrapped, source_of
from .zoo import find_block_lists, preset_for

_PEFT_TASKS = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM", "token-cls": "TOKEN_CLS"}


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


def targets(model: Any, lora: Lora | dict | None = None, *, preset: str | None = None) -> Targets:
    """Dry run: the LoRA candidates of `model`, and which ones `lora` (default: the preset's) would touch."""
    plan = make_plan(model, Lora.coerce(lora) or Lora(), preset=preset)
    grouped: dict[str, dict[str, list[str]]] = {}
    for name, (kind, suffix) in candidates(model, find_block_lists(model, preset_for(model, preset))).items():
        grouped.setdefault(kind, {}).setdefault(suffix, []).append(name)
    return Targets(candidates=grouped, selected=plan.target_names, trained_in_full=list(plan.trained_in_full),
                   preset=plan.preset)


def lora_config(plan: Plan) -> Any:
    """The `peft.LoraConfig` that carries out a plan's LoRA part. Ranks and alphas that differ from the
    spec's own are passed per module by exact name, so peft applies the plan's values, not its own matching."""
    from peft import LoraConfig

    lora = plan.lora  # resolved: r, alpha, dropout and targets are set
    alpha = lora.alpha
    exact = {t.name: t for t in plan.targets}
    return LoraConfig(
        r=lora.r, lora_alpha=alpha, lora_dropout=lora.dropout, target_modules=plan.target_names,
        modules_to_save=list(plan.trained_in_full) or None,
        rank_pattern={re.escape(n): t.r for n, t in exact.items() if t.r != lora.r},
        alpha_pattern={re.escape(n): t.alpha for n, t in exact.items() if t.alpha != alpha},
        use_rslora=lora.use_rslora, use_dora=lora.use_dora, bias=lora.bias,
        # LoftQ: peft's own code needs CUDA; lorakit sets the factors itself once peft has made the layers
        init_lora_weights={"default": True, "loftq": True}.get(lora.init, lora.init),
        fan_in_fan_out=any(t.kind == "Conv1D" for t in plan.targets), task_type=_PEFT_TASKS.get(plan.task))


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft's PeftModel reads transformers' deprecated `is_gradient_checkpointing`, which warns on every
    wrap; lorakit silences exactly that warning around its own peft calls."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


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
    loftq: dict = {}
    if plan.quant is not None:
        model, loftq = quantize(model, plan)
    trainable = set(plan.trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable and param.is_floating_point())
    if plan.lora is not None:
        from peft import get_peft_model

        with quiet_peft():
            model = get_peft_model(model, lora_config(plan))
        for name, (lora_a, lora_b) in loftq.items():
            layer = model.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.data.copy_(lora_a)
            layer.lora_B["default"].weight.data.copy_(lora_b)
        # peft's classification models append "classifier" and "score" to modules_to_save whatever the model
        # has; the saved config should list what the plan trains, once each.
        for config in model.peft_config.values():
            config.modules_to_save = list(plan.trained_in_full) or None
        _restore_full_training(model, trainable)
    rewrites = plan.lora is not None and plan.lora.init in REWRITES_BASE
    initial = _keep_initial_adapter(model) if rewrites else None
    model.lorakit_state = State(plan=plan, source=source, fingerprint=base_fingerprint, initial_adapter=initial)
    return model


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
