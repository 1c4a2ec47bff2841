"""Per-layer accounting: parameters and training memory, spec against full fine-tuning.

Counting returns data; printing lives in `render.py`. Two sources feed the
same records:

* a model lorakit already wrapped: its real tensors are counted (4-bit
  weights by their real parameter count and real packed bytes);
* anything else (a config, a zoo name, a model in memory plus specs): the
  spec is resolved by the same functions `wrap` uses, on a meta-device model,
  and what peft *would* add is computed from layer shapes, without importing
  peft. Tests prove both equal peft applied for real.

Memory model (bytes):
  weights    real storage: fp32/bf16/fp16 by dtype; int8 = n + 4 per output row (SCB);
             nf4/fp4 = ceil(n/2) + absmax per 64-block (fp32, or uint8 with double
             quantization plus its fp32 nested absmax per 256 blocks and maps).
             As in `wrap`, a quantized model's other parameters are upcast to fp32
             (peft's prepare_model_for_kbit_training), and LoRA weights are fp32.
  gradients  one per trainable parameter, in its dtype.
  optimizer  adamw: two fp32 moments (8 B) per trainable parameter;
             adamw-8bit: two uint8 moments plus an fp32 absmax per 256 (bitsandbytes),
             fp32 moments for tensors under 4096 elements (its min_8bit_size).
Full fine-tuning: every base parameter trainable, unquantized, in the model dtype.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import SpecError
from .simulate import Simulation, simulate
from .specs import Freeze, Lora, Quant, spec_dict

OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")
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


@dataclass
class _Record:
    """One tensor: where it lives, what it costs, and whether it trains."""

    module: str          # module path in base-model names
    kind: str            # module kind for the by-kind view
    numel: int
    weight_bytes: int
    element_bytes: int   # of gradients, when trainable
    trainable: bool
    role: str            # "base" | "lora" | "copy" (peft's modules_to_save copy)
    full_bytes: int = 0  # storage for full fine-tuning (base only)


def quantized_bytes(numel: int, out_features: int, quant: Quant) -> int:
    if quant.bits == 8:
        return numel + 4 * out_features
    blocks = math.ceil(numel / 64)
    size = math.ceil(numel / 2) + 16 * 4
    if quant.double_quant:
        return size + blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4
    return size + 4 * blocks


def _optimizer_bytes(numel: int, optimizer: str) -> int:
    if optimizer == "sgd":
        return 0
    if optimizer == "adamw-8bit" and numel >= 4096:
        return 2 * (numel + 4 * math.ceil(numel / 256))
    return 8 * numel


def _kind(module: Any) -> str:
    name = type(module).__name__
    if name in ("Linear", "Linear4bit", "Linear8bitLt", "Conv1D"):
        return "Linear"
    if "Embedding" in name:
        return "Embedding"
    if "norm" in name.lower():
        return "Norm"
    if name.startswith("Conv"):
        return "Conv"
    return name


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


# ---- records from a real model -------------------------------------------

def _real_records(model: Any) -> list[_Record]:
    records = []
    modules = dict(model.named_modules())
    # Full fine-tuning stores quantized weights unquantized, like the model's other weights.
    float_element = next((p.element_size() for n, p in model.named_parameters()
                          if p.is_floating_point() and "lora_" not in n), 4)
    from .adapter import peft_role

    for name, param in model.named_parameters():
        module_path = name.rpartition(".")[0]
        role, base_path = peft_role(module_path)
        module = modules[module_path]
        state = getattr(param, "quant_state", None)
        if state is not None:  # Params4bit: count real parameters, not packed bytes
            numel = math.prod(state.shape)
            weight_bytes = param.numel() * param.element_size() + _state_bytes(state)
        else:
            numel = param.numel()
            weight_bytes = numel * param.element_size()
            scb = getattr(param, "SCB", None)
            if scb is not None:
                weight_bytes += scb.numel() * scb.element_size()
        full_bytes = numel * (param.element_size() if param.is_floating_point() else float_element)
        records.append(_Record(base_path, _kind(module), numel, weight_bytes, param.element_size(),
                               param.requires_grad, role, full_bytes))
    return records


def _state_bytes(state: Any) -> int:
    total = 0
    for value in state.as_dict(packed=False).values():
        if hasattr(value, "numel"):
            total += value.numel() * value.element_size()
    return total + (4 if state.nested else 0)  # the nested offset, a python float in the dict


# ---- records predicted from a spec ---------------------------------------

def _lora_shapes(module: Any, r: int) -> list[int]:
    """Parameter counts of peft's lora_A and lora_B for this layer."""
    import torch

    weight = module.weight
    if isinstance(module, torch.nn.Conv2d):
        out_ch, in_ch, kh, kw = weight.shape
        return [r * in_ch * kh * kw, out_ch * r]
    if isinstance(module, torch.nn.Embedding):
        return [r * module.num_embeddings, module.embedding_dim * r]
    from transformers.pytorch_utils import Conv1D

    in_f, out_f = (weight.shape[0], weight.shape[1]) if isinstance(module, Conv1D) else (weight.shape[1],
                                                                                            weight.shape[0])
    return [r * in_f, out_f * r]


def _rank_for(name: str, mapping: dict, default: Any) -> Any:
    import re

    # peft: the first key, in order, that matches the module name as a regex suffix
    for key, value in mapping.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _predicted_records(model: Any, lora: Lora | None, freeze: Freeze | None, quant: Quant | None,
                       preset: Any) -> list[_Record]:
    from .wrap import plan_trainable, resolve_targets, trained_in_full

    targets = resolve_targets(model, lora, preset) if lora else []
    full = trained_in_full(model, preset, lora)
    plan = plan_trainable(model, freeze, preset, lora)
    quantized: set[str] = set()
    if quant is not None:
        from .quantize import will_quantize

        quantized = set(will_quantize(model, quant, preset))
    modules = dict(model.named_modules())
    records = []
    for name, param in model.named_parameters():  # tied weights once, as peft counts them
        module_path, _, leaf = name.rpartition(".")
        module = modules[module_path]
        element = 4 if quant is not None else param.element_size()  # prepare_model_for_kbit_training upcasts
        numel = param.numel()
        is_quantized = module_path in quantized and leaf == "weight"
        weight_bytes = (quantized_bytes(numel, param.shape[0] if not _is_conv1d(module) else param.shape[1], quant)
                        if is_quantized else numel * element)
        trainable = plan.get(name, False) and not is_quantized
        if lora and lora.bias == "all" and leaf == "bias":
            trainable = True
        if lora and lora.bias == "lora_only" and leaf == "bias" and module_path in targets:
            trainable = True
        in_copy = any(module_path == f or module_path.startswith(f + ".") for f in full) and lora is not None
        records.append(_Record(module_path, _kind(module), numel, weight_bytes, element,
                               trainable and not in_copy, "base", numel * param.element_size()))
        if in_copy:  # peft keeps the original (frozen) and trains a copy
            records.append(_Record(module_path, _kind(module), numel, numel * element, element, True, "copy"))
    for target in targets:
        module = modules[target]
        r = _rank_for(target, lora.rank_pattern, lora.r)
        for count in _lora_shapes(module, r):
            records.append(_Record(target, _kind(module), count, 4 * count, 4, True, "lora"))
        if lora.use_dora:  # magnitude vector, one per output feature
            out = module.weight.shape[1] if _is_conv1d(module) else module.weight.shape[0]
            records.append(_Record(target, _kind(module), out, 4 * out, 4, True, "lora"))
    return records


def _is_conv1d(module: Any) -> bool:
    return type(module).__name__ == "Conv1D"


# ---- grouping --------------------------------------------------------------

def _layer_name(module_path: str, heads: list[str], depth: int | None, block_lists: list[str],
                embeddings: list[str]) -> str:
    from .zoo import block_of

    if depth is not None:
        parts = module_path.split(".")
        return ".".join(parts[:depth]) if module_path else "(root)"
    if any(module_path == h or module_path.startswith(h + ".") for h in heads):
        return "head"
    where = block_of(module_path + ".", block_lists)
    if where:
        return f"{where[0]}.{where[1]}"
    if any(module_path == e or module_path.startswith(e + ".") for e in embeddings):
        return "embeddings"
    return "other"


def _group(records: list[_Record], key: Any, optimizer: str, order: list[str] | None = None) -> list[Row]:
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
            row.optimizer_bytes += _optimizer_bytes(rec.numel, optimizer)
        if rec.role == "base":
            row.full_finetune_trainable_parameters += rec.numel
            full_bytes = rec.full_bytes or rec.numel * rec.element_bytes
            row.full_finetune_weight_bytes += full_bytes
            row.full_finetune_gradient_bytes += full_bytes
            row.full_finetune_optimizer_bytes += _optimizer_bytes(rec.numel, optimizer)
    if order:
        return sorted(rows.values(), key=lambda r: order.index(r.name) if r.name in order else len(order))
    return list(rows.values())


def report(model_or_config: Any, *, lora: Lora | dict | int | None = None, freeze: Freeze | str | None = None,
           quant: Quant | str | None = None, task: str | None = None, optimizer: str = "adamw",
           depth: int | None = None, by: str = "layer", dtype: str | None = None, preset: str | None = None,
           batch_size: int | None = None, seq_len: int | None = None, gradient_checkpointing: bool = False,
           attn: str = "sdpa", trust_remote_code: bool = False) -> Report:
    """Per-layer trainable parameters and training memory, against full fine-tuning.

    `model_or_config`: a model in memory (wrapped by lorakit or not), a
    `PretrainedConfig`, or anything `lorakit.load` accepts (read as a config
    and built on the meta device: no weights, no network for bundled names).
    `by`: "layer" (embeddings, each block, head, other; or `depth` name parts)
    or "kind" (Linear, Embedding, Norm, Conv).
    `batch_size` and `seq_len` (with `gradient_checkpointing`, `attn`): also count peak training memory by
    simulating two training steps on fake tensors (`lorakit.simulate`); `Report.simulation` holds it.
    """
    from .load import build_from_config, resolve_config
    from .zoo import find_block_lists, preset_for

    lora, freeze, quant = Lora.coerce(lora), Freeze.coerce(freeze), Quant.coerce(quant)
    if optimizer not in OPTIMIZERS:
        raise SpecError(f"unknown optimizer {optimizer!r}", hint=f"use one of {', '.join(OPTIMIZERS)}")
    if by not in ("layer", "kind"):
        raise SpecError(f'by must be "layer" or "kind", got {by!r}')
    if depth is not None and (by == "kind" or depth < 1):
        raise SpecError("depth takes a positive number and applies to by='layer' only",
                        hint="use either --depth N or --by kind")
    if (batch_size is None) != (seq_len is None):
        raise SpecError("the memory simulation needs both batch_size and seq_len", hint="give both, or neither")

    wrapped = getattr(model_or_config, "_lorakit", None)
    if wrapped is not None:
        if lora or freeze or quant:
            raise SpecError("this model is already wrapped; its own spec is reported",
                            hint="pass the unwrapped model (or a config) to compare other specs")
        base = model_or_config.get_base_model() if hasattr(model_or_config, "get_base_model") else model_or_config
        records = _real_records(model_or_config)
        lora, freeze, quant = wrapped["lora"], wrapped["freeze"], wrapped["quant"]
        chosen = preset_for(base, wrapped["preset"])
        name = (wrapped.get("source") or {}).get("id") or type(base).__name__
    else:
        if hasattr(model_or_config, "named_parameters"):
            base, name = model_or_config, (getattr(model_or_config, "_lorakit_source", None) or {}).get(
                "id", type(model_or_config).__name__)
            if dtype is not None:
                raise SpecError("dtype applies to configs; a model in memory is reported in its own dtype")
        else:
            config, source = resolve_config(model_or_config, trust_remote_code=trust_remote_code)
            base = build_from_config(config, task, meta=True, trust_remote_code=trust_remote_code,
                                     dtype=dtype or _default_dtype(config))
            name = source["id"]
        if quant is not None:
            from .quantize import is_quantized

            if is_quantized(base):
                raise SpecError("this model is already quantized", hint="drop quant=...")
        chosen = preset_for(base, preset)
        records = _predicted_records(base, lora, freeze, quant, chosen)
        if not any(r.trainable for r in records):
            raise SpecError("this spec leaves no parameter trainable",
                            hint="unfreeze something or add a LoRA spec")
    from .wrap import _output_embedding_names, trained_in_full

    heads = sorted(set(trained_in_full(base, chosen, lora)) | _output_embedding_names(base))
    block_lists = find_block_lists(base, chosen)
    modules = dict(base.named_modules())
    embeddings = [n for n in modules if n and any(n == e or n.endswith("." + e) for e in chosen.embeddings)]
    embeddings += [n for n, m in modules.items() if type(m).__name__ == "Embedding"]
    if by == "kind":
        rows = _group(records, lambda r: r.kind, optimizer)
    else:
        order = ["embeddings"] + [f"{s}.{i}" for s in block_lists for i in range(len(modules[s]))] + [
            "head", "other"]
        rows = _group(records, lambda r: _layer_name(r.module, heads, depth, block_lists, embeddings),
                      optimizer, order if depth is None else None)
    total = Row("total")
    for row in rows:
        total.add(row)
    param_dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
    result = Report(model=str(name), rows=rows, total=total, dtype=_dtype_name(param_dtype), optimizer=optimizer,
                    spec={"lora": spec_dict(lora), "freeze": spec_dict(freeze), "quant": spec_dict(quant),
                          "preset": chosen.name})
    if batch_size is not None:  # a model in memory is rebuilt from its config (dtype: the config's)
        in_memory = hasattr(model_or_config, "named_parameters")
        sim = simulate(base if in_memory else config, lora=lora, freeze=freeze, quant=quant, preset=chosen.name,
                       task=task, dtype=None if in_memory else (dtype or _default_dtype(config)), optimizer=optimizer,
                       batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
                       attn=attn, trust_remote_code=trust_remote_code)
        result.simulation = sim
        result.activation_bytes = sim.breakdown["activations"]
        result.activation_note = (f"saved at the simulated peak of {sim.peak_allocated / 2**30:.2f} GiB allocated "
                                  f"(step {sim.peak_step}, {sim.peak_phase}; {attn} attention, batch {batch_size}, "
                                  f"sequence {seq_len}, gradient checkpointing "
                                  f"{'on' if gradient_checkpointing else 'off'}); counted on fake tensors")
    return result


def _default_dtype(config: Any) -> str:
    value = getattr(config, "dtype", None)
    text = _dtype_name(value) if value is not None else "float32"
    return text if text in _DTYPE_BYTES else "float32"
