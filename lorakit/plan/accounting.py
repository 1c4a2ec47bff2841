"""Counting tensors: one record per parameter, from a real model or from a Plan.

* `real_records(model)`: a model lorakit wrapped; its real tensors are counted
  (4-bit weights by their real parameter count and real packed bytes).
* `planned_records(model, plan)`: anything else (a meta-device model built
  from a config, or a model in memory plus specs): what peft *would* add is
  computed from layer shapes and the Plan, without importing peft. Tests
  prove both equal peft applied for real.

Memory model (bytes):
  weights    real storage: fp32/bf16/fp16 by dtype; int8 = n + 4 per output row (SCB);
             nf4/fp4 = ceil(n/2) + absmax per 64-block (fp32, or uint8 with double
             quantization plus its fp32 nested absmax per 256 blocks and maps).
             A quantized model's other parameters keep their dtype (as `wrap` and
             `load` leave them); LoRA weights are fp32.
  gradients  one per trainable parameter, in its dtype.
  optimizer  adamw: two fp32 moments (8 B) per trainable parameter;
             adamw-8bit: two uint8 moments plus an fp32 absmax per 256 (bitsandbytes),
             fp32 moments for tensors under 4096 elements (its min_8bit_size).
Full fine-tuning: every base parameter trainable, unquantized, in the model dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..spec.names import adaptable_kind, is_packed, module_kind, out_features, peft_role, shape_of, under
from ..spec.specs import Quant
from .plan import Plan

OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")


@dataclass
class Record:
    """One tensor: where it lives, what it costs, and whether it trains."""

    module: str          # module path in base-model names
    kind: str            # module kind for the by-kind view
    numel: int
    weight_bytes: int
    element_bytes: int   # of gradients, when trainable
    trainable: bool
    role: str            # "base" | "lora" | "copy" (peft's modules_to_save copy)
    full_bytes: int = 0  # storage for full fine-tuning (base only)


def quantized_bytes(numel: int, out: int, quant: Quant) -> int:
    if quant.bits == 8:
        return numel + 4 * out
    blocks = math.ceil(numel / 64)
    size = math.ceil(numel / 2) + 16 * 4
    if quant.double_quant:
        return size + blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + 4
    return size + 4 * blocks


def optimizer_bytes(numel: int, optimizer: str) -> int:
    if optimizer == "sgd":
        return 0
    if optimizer == "adamw-8bit" and numel >= 4096:
        return 2 * (numel + 4 * math.ceil(numel / 256))
    return 8 * numel


def quant_state_bytes(state: Any) -> int:
    """Bytes of a bitsandbytes 4-bit QuantState (absmax, nested absmax, code maps)."""
    total = 0
    for value in state.as_dict(packed=False).values():
        if hasattr(value, "numel"):
            total += value.numel() * value.element_size()
    return total + (4 if state.nested else 0)  # the nested offset, a python float in the dict


def real_records(model: Any) -> list[Record]:
    records = []
    modules = dict(model.named_modules())
    # Full fine-tuning stores quantized weights unquantized, like the model's other weights.
    float_element = next((p.element_size() for n, p in model.named_parameters()
                          if p.is_floating_point() and "lora_" not in n and not is_packed(p)), 4)
    for name, param in model.named_parameters():
        module_path = name.rpartition(".")[0]
        role, base_path = peft_role(module_path)
        state = getattr(param, "quant_state", None)
        if state is not None:  # Params4bit: count real parameters, not packed bytes
            numel = math.prod(state.shape)
            weight_bytes = param.numel() * param.element_size() + quant_state_bytes(state)
        else:
            numel = param.numel()
            weight_bytes = numel * param.element_size()
            scb = getattr(param, "SCB", None)
            if scb is not None:
                weight_bytes += scb.numel() * scb.element_size()
        full_bytes = numel * (float_element if is_packed(param) or not param.is_floating_point()
                              else param.element_size())
        owner = modules[module_path]
        if role == "lora":  # grouped by the layer it adapts: peft's wrapper holds it as its base layer
            wrapper = modules[name.split(".lora_")[0]]
            owner = wrapper.get_base_layer() if hasattr(wrapper, "get_base_layer") else wrapper
        records.append(Record(base_path, module_kind(owner), numel, weight_bytes,
                              param.element_size(), param.requires_grad, role, full_bytes))
    return records


def lora_sizes(module: Any, r: int) -> list[int]:
    """Parameter counts of peft's lora_A and lora_B for this layer (from its weight's real shape, a 4-bit
    one's included)."""
    shape = shape_of(module.weight)
    kind = adaptable_kind(module)
    if kind == "Conv2d":
        out_ch, in_ch, kh, kw = shape
        return [r * in_ch * kh * kw, out_ch * r]
    if kind == "Embedding":
        return [r * module.num_embeddings, module.embedding_dim * r]
    in_f, out_f = (shape[0], shape[1]) if kind == "Conv1D" else (shape[1], shape[0])
    return [r * in_f, out_f * r]


def planned_records(model: Any, plan: Plan) -> list[Record]:
    """The records `model` would have once `plan` is carried out."""
    lora, quant = plan.lora, plan.quant
    quantized, trainable, targets = set(plan.quantized), set(plan.trainable), set(plan.target_names)
    modules = dict(model.named_modules())
    # A model loaded quantized: full fine-tuning would hold its quantized weights in the other weights' dtype.
    float_element = next((p.element_size() for p in model.parameters() if p.is_floating_point()
                          and not is_packed(p)), 4)
    records = []
    for name, param in model.named_parameters():  # tied weights once, as peft counts them
        module_path, _, leaf = name.rpartition(".")
        module = modules[module_path]
        element = float_element if is_packed(param) or not param.is_floating_point() else param.element_size()
        numel = math.prod(shape_of(param))
        is_quantized = module_path in quantized and leaf == "weight"
        weight_bytes = quantized_bytes(numel, out_features(module), quant) if is_quantized else numel * element
        trains = name in trainable
        if lora and leaf == "bias" and (lora.bias == "all" or (lora.bias == "lora_only" and module_path in targets)):
            trains = True
        in_copy = lora is not None and under(module_path, plan.trained_in_full)
        records.append(Record(module_path, module_kind(module), numel, weight_bytes, element,
                              trains and not in_copy, "base", numel * element))
        if in_copy:  # peft keeps the original (frozen) and trains a copy
            records.append(Record(module_path, module_kind(module), numel, numel * element, element, True, "copy"))
    for target in plan.targets:
        if target.parameter:  # peft's ParamWrapper: one (A, B) pair per expert, stacked
            owner = target.name.rpartition(".")[0]
            shape = model.get_parameter(target.name).shape
            experts, rows, cols = shape if len(shape) == 3 else (1, *shape)
            for count in (target.r * experts * cols, rows * target.r * experts):
                records.append(Record(owner, module_kind(modules[owner]), count, 4 * count, 4, True, "lora"))
            continue
        module = modules[target.name]
        for count in lora_sizes(module, target.r):
            records.append(Record(target.name, module_kind(module), count, 4 * count, 4, True, "lora"))
        if lora.use_dora:  # magnitude vector, one per output feature
            out = out_features(module)
            records.append(Record(target.name, module_kind(module), out, 4 * out, 4, True, "lora"))
    return records
