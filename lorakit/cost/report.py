"""Per-layer accounting: parameters and training memory, spec against full fine-tuning.

Counting returns data (`accounting` makes one record per tensor, from a real
model or from a Plan); this module groups records into rows, by layer or by
kind; printing lives in `render.py`. The memory model is in `accounting`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..core.errors import SpecError
from ..model.load import resolve_config
from ..model.tasks import build_from_config
from ..plan.accounting import OPTIMIZERS, Record, optimizer_bytes, planned_records, real_records
from ..plan.make import make_plan
from ..plan.plan import Plan
from ..plan.state import is_quantized, source_of, state_of
from ..spec.specs import Freeze, Lora, Quant, spec_dict
from ..spec.zoo import block_of
from . import per_gpu
from .simulate import Simulation, simulate

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass
class Row:
    name: str
    parameters: int = 0
    trainable_parameters: int = 0
    full_finetune_trainable_parameters: int = 0
    lora_parameters: int = 0
    weight_bytes: int = 0
    gradient_bytes: int = 0
    optimizer_bytes: int = 0
    full_finetune_weight_bytes: int = 0
    full_finetune_gradient_bytes: int = 0
    full_finetune_optimizer_bytes: int = 0

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes

    @property
    def full_finetune_memory_bytes(self) -> int:
        return self.full_finetune_weight_bytes + self.full_finetune_gradient_bytes + self.full_finetune_optimizer_bytes

    def add(self, other: Row) -> None:
        for f in fields(self):
            if f.name != "name":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Report:
    """Rows (one per layer at the chosen depth, or per module kind) and their totals."""

    model: str
    rows: list[Row]
    total: Row
    dtype: str
    optimizer: str
    spec: dict = field(default_factory=dict)
    activation_bytes: int | None = None
    activation_note: str | None = None
    simulation: Simulation | None = None  # peak training memory, when batch_size and seq_len were given

    def ratio(self, what: str) -> float:
        """spec / full fine-tuning for 'trainable_parameters', 'weight_bytes', ..., 'memory_bytes'."""
        full = getattr(self.total, "full_finetune_" + what if what != "trainable_parameters"
                       else "full_finetune_trainable_parameters")
        return getattr(self.total, what) / full if full else float("nan")

    def to_dict(self) -> dict:
        """The stable JSON form (documented in the README)."""
        t = self.total
        memory = {"weights": t.weight_bytes, "gradients": t.gradient_bytes, "optimizer": t.optimizer_bytes,
                  "total": t.memory_bytes, "activations": self.activation_bytes}
        full = {"weights": t.full_finetune_weight_bytes, "gradients": t.full_finetune_gradient_bytes,
                "optimizer": t.full_finetune_optimizer_bytes, "total": t.full_finetune_memory_bytes}
        return {
            "model": self.model, "dtype": self.dtype, "optimizer": self.optimizer, "spec": self.spec,
            "total_parameters": t.parameters, "trainable_parameters": t.trainable_parameters,
            "full_finetune_trainable_parameters": t.full_finetune_trainable_parameters,
            "lora_parameters": t.lora_parameters,
            "memory": dict(memory, full_finetune=full),
            "ratios": {"trainable_parameters": self.ratio("trainable_parameters"),
                       "memory": self.ratio("memory_bytes")},
            "activation_note": self.activation_note,
            "simulation": self.simulation.to_dict() if self.simulation is not None else None,
            "layers": [dict(asdict(r), memory_bytes=r.memory_bytes,
                            full_finetune_memory_bytes=r.full_finetune_memory_bytes) for r in self.rows],
        }


# ---- grouping --------------------------------------------------------------

def _layer_name(module_path: str, plan: Plan, depth: int | None) -> str:
    if depth is not None:
        return ".".join(module_path.split(".")[:depth]) if module_path else "(root)"
    if any(module_path == h or module_path.startswith(h + ".") for h in plan.heads):
        return "head"
    where = block_of(module_path + ".", list(plan.block_lists))
    if where:
        return f"{where[0]}.{where[1]}"
    if any(module_path == e or module_path.startswith(e + ".") for e in plan.embeddings):
        return "embeddings"
    return "other"


def _group(records: list[Record], key: Any, optimizer: str, order: list[str] | None = None) -> list[Row]:
    rows: dict[str, Row] = {}
    for rec in records:
        row = rows.setdefault(key(rec), Row(key(rec)))
        row.parameters += rec.numel
        row.weight_bytes += rec.weight_bytes
        if rec.role == "lora":
            row.lora_parameters += rec.numel
        if rec.trainable:
            row.trainable_parameters += rec.numel
            row.gradient_bytes += rec.numel * rec.element_bytes
            row.optimizer_bytes += optimizer_bytes(rec.numel, optimizer)
        if rec.role == "base":
            row.full_finetune_trainable_parameters += rec.numel
            full_bytes = rec.full_bytes or rec.numel * rec.element_bytes
            row.full_finetune_weight_bytes += full_bytes
            row.full_finetune_gradient_bytes += full_bytes
            row.full_finetune_optimizer_bytes += optimizer_bytes(rec.numel, optimizer)
    if order:
        return sorted(rows.values(), key=lambda r: order.index(r.name) if r.name in order else len(order))
    return list(rows.values())


def report(model_or_config: Any, *, lora: Lora | dict | int | None = None, freeze: Freeze | str | None = None,
           quant: Quant | str | None = None, task: str | None = None, optimizer: str = "adamw",
           by: str | int = "layer", dtype: str | None = None, preset: str | None = None,
           batch_size: int | None = None, seq_len: int | None = None, gradient_checkpointing: bool = False,
           attn: str = "sdpa", trust_remote_code: bool = False, quant_path: str = "load", gpus: int = 1,
           shard: str | None = None) -> Report:
    """Per-layer trainable parameters and training memory, against full fine-tuning.

    `model_or_config`: a model in memory (wrapped by lorakit or not), a
    `PretrainedConfig`, or anything `lorakit.load` accepts (read as a config
    and built on the meta device: no weights, no network for bundled names).
    `by`: "layer" (embeddings, each block, head, other), a number N (the first N
    parts of module names), or "kind" (Linear, Embedding, Norm, Conv).
    `batch_size` and `seq_len` (with `gradient_checkpointing`, `attn`, `quant_path`): also count peak training
    memory by simulating two training steps on fake tensors (`lorakit.cost.simulate`); `Report.simulation` holds it.
    `gpus`, `shard`: that simulation is of one GPU of several (see `simulate`); the rows stay whole-model counts.
    """
    lora, freeze, quant = Lora.coerce(lora), Freeze.coerce(freeze), Quant.coerce(quant)
    if optimizer not in OPTIMIZERS:
        raise SpecError(f"unknown optimizer {optimizer!r}", hint=f"use one of {', '.join(OPTIMIZERS)}")
    depth = by if isinstance(by, int) and not isinstance(by, bool) else None
    if depth is None and by not in ("layer", "kind") or depth is not None and depth < 1:
        raise SpecError(f'by must be "layer", "kind" or a positive number of name parts, got {by!r}')
    if (batch_size is None) != (seq_len is None):
        raise SpecError("the memory simulation needs both batch_size and seq_len", hint="give both, or neither")
    if batch_size is None and (gpus != 1 or shard):
        raise SpecError("gpus and shard are settings of the simulated training step", hint="give batch_size and "
                        "seq_len too (--batch-size, --seq-len)")
    base, plan, records, name = _records(model_or_config, lora, freeze, quant, task, dtype, preset,
                                         trust_remote_code)
    if by == "kind":
        rows = _group(records, lambda r: r.kind, optimizer)
    else:
        modules = dict(base.named_modules())
        order = ["embeddings"] + [f"{s}.{i}" for s in plan.block_lists for i in range(len(modules[s]))] + [
            "head", "other"]
        rows = _group(records, lambda r: _layer_name(r.module, plan, depth), optimizer,
                      order if depth is None else None)
    total = Row("total")
    for row in rows:
        total.add(row)
    param_dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
    result = Report(model=str(name), rows=rows, total=total, dtype=str(param_dtype).removeprefix("torch."),
                    optimizer=optimizer, spec={"lora": spec_dict(plan.lora), "freeze": spec_dict(plan.freeze),
                                               "quant": spec_dict(plan.quant), "preset": plan.preset,
                                               "defaults": [list(d) for d in plan.defaults]})
    if batch_size is not None:  # a model in memory is rebuilt from its config (dtype: the config's)
        in_memory = hasattr(model_or_config, "named_parameters")
        sim = simulate(base if in_memory else base.config, lora=plan.lora, freeze=plan.freeze, quant=plan.quant,
                       preset=plan.preset, task=plan.task, dtype=None if in_memory else result.dtype,
                       optimizer=optimizer, batch_size=batch_size, seq_len=seq_len,
                       gradient_checkpointing=gradient_checkpointing, attn=attn, trust_remote_code=trust_remote_code,
                       quant_path=quant_path, gpus=gpus, shard=shard)
        result.simulation = sim
        result.activation_bytes = sim.breakdown["activations"]
        result.activation_note = (f"saved at the simulated peak of {sim.peak_allocated / 2**30:.2f} GiB allocated "
                                  f"(step {sim.peak_step}, {sim.peak_phase}; {per_gpu.describe(gpus, shard)}; "
                                  f"{sim.settings['attn']} attention, "
                                  f"batch {batch_size}, "
                                  f"sequence {seq_len}, gradient checkpointing "
                                  f"{'on' if gradient_checkpointing else 'off'}; "
                                  f"{'chunked' if sim.settings['chunked_loss'] else 'model'} loss, as LoraTrainer "
                                  "computes it); counted on fake tensors")
    return result


def _records(model_or_config: Any, lora: Lora | None, freeze: Freeze | None, quant: Quant | None,
             task: str | None, dtype: str | None, preset: str | None,
             trust_remote_code: bool) -> tuple[Any, Plan, list[Record], str]:
    """(base model, plan, records, name): counted from a wrapped model, else planned on the model or config."""
    state = state_of(model_or_config)
    if state is not None:
        if lora or freeze or quant:
            raise SpecError("this model is already wrapped; its own spec is reported",
                            hint="pass the unwrapped model (or a config) to compare other specs")
        model = model_or_config
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        name = (state.source.id if state.source else None) or type(base).__name__
        return base, state.plan, real_records(model), name
    if hasattr(model_or_config, "named_parameters"):
        base = model_or_config
        source = source_of(base)
        name = source.id if source else type(base).__name__
        if dtype is not None:
            raise SpecError("dtype applies to configs; a model in memory is reported in its own dtype")
        if quant is not None and is_quantized(base):
            raise SpecError("this model is already quantized", hint="drop quant=...")
    else:
        config, source = resolve_config(model_or_config, trust_remote_code=trust_remote_code)
        base = build_from_config(config, task, meta=True, trust_remote_code=trust_remote_code,
                                 dtype=dtype or _default_dtype(config))
        name = source.id
    plan = make_plan(base, lora, freeze, quant, preset)
    records = planned_records(base, plan)
    if not any(r.trainable for r in records):
        raise SpecError("this spec leaves no parameter trainable", hint="unfreeze something or add a LoRA spec")
    return base, plan, records, name


def _default_dtype(config: Any) -> str:
    value = getattr(config, "dtype", None)
    text = str(value).removeprefix("torch.") if value is not None else "float32"
    return text if text in _DTYPE_BYTES else "float32"
