"""The streamed merge: one adapter folded into a safetensors base tensor by tensor.

Each tensor is read on its own (so only its pages of the memory-mapped shard
are resident), gets W + scale·B·A in fp32 if it is a LoRA target, and goes to
an output buffer written out as a shard every OUTPUT_SHARD_BYTES (`lorakit.deploy.shard_writer`). Peak memory
is about one output shard plus the largest tensor and the adapter, not the
model. `lorakit.deploy.merge` decides when this path applies and verifies it.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..core.errors import LorakitError, SpecError
from ..spec.names import adaptable_kind
from ..spec.specs import torch_dtype
from .shard_writer import ShardWriter, checked


def _scale(config: dict, module: str, rank: int) -> float:
    alpha = config["lora_alpha"]
    patterns = config.get("alpha_pattern") or {}
    if patterns:  # peft's own matching; without patterns, a merge needs no peft at all (2.4 s of imports)
        from peft.utils.other import get_pattern_key

        key = get_pattern_key(list(patterns), module)
        alpha = patterns.get(key, alpha)
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _delta(parts: dict, base_shape: tuple, fan_in_fan_out: bool, scale: float) -> Any:
    """B·A·scale in fp32, shaped like the base weight (Linear, Conv1D, Conv2d, Embedding)."""
    if "lora_embedding_A" in parts:
        a, b = parts["lora_embedding_A"].float(), parts["lora_embedding_B"].float()
        return (b @ a).T * scale
    a, b = parts["lora_A"].float(), parts["lora_B"].float()
    if a.dim() == 4:  # Conv2d: A has the layer's kernel, B is 1x1
        return (b.flatten(1) @ a.flatten(1)).view(base_shape) * scale
    delta = (b @ a).mul_(scale)  # in place: a merge holds as few tensor-sized temporaries as it can
    return delta.T if fan_in_fan_out else delta


def _merged_in_rows(module: str, tensor: Any, parts: dict, fan_in_fan_out: bool, scale: float) -> Any:
    """W + scale·B·A for a Linear (Conv1D) weight, computed in blocks of rows: fp32 temporaries of a block, not
    of the tensor (a 70B model's MLP weight is 0.9 GB in fp32)."""
    import torch

    a, b = parts["lora_A"].float(), parts["lora_B"].float()
    left, right = (a.T, b.T) if fan_in_fan_out else (b, a)  # the update in the weight's layout: left @ right
    if (left.shape[0], right.shape[1]) != tuple(tensor.shape):
        raise _other_base(module, (left.shape[0], right.shape[1]), tensor.shape)
    out = torch.empty_like(tensor)
    step = max(1, 2**22 // tensor.shape[1])
    for start in range(0, tensor.shape[0], step):
        rows = slice(start, start + step)
        out[rows] = (left[rows] @ right).mul_(scale).add_(tensor[rows].float()).to(tensor.dtype)
    return out


def _other_base(module: str, update: tuple, base: tuple) -> LorakitError:
    return LorakitError(f"adapter layer {module} has shape {tuple(update)} but the base's is {tuple(base)}",
                        hint="this adapter was trained on another base")


def _expert_delta(parts: dict, experts: int, expert: int | None, scale: float, transposed: bool) -> Any:
    """peft's ParamWrapper update of an expert tensor, in fp32: one (A, B) pair per expert, stacked, A being
    (rank·E, in) and B (out, rank·E). For one expert (out, in), else all (E, out, in); (E, in, out) when the
    tensor is stored transposed."""
    a, b = parts["lora_A"].float(), parts["lora_B"].float()
    a = a.reshape(experts, -1, a.shape[-1])                  # (E, rank, in)
    b = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, rank)
    if expert is not None:
        a, b = a[expert], b[expert]
    delta = (b @ a) * scale
    return delta.transpose(-1, -2) if transposed else delta


class CheckpointNames:
    """How transformers maps a checkpoint's tensor names onto the task model (`meta`): its own renamings
    and the base-model prefix, and, for MoE checkpoints that store every expert as its own Linear weight
    (the Hub's format, and what transformers 5 writes), the converters that stack them into the model's
    fused expert tensors. `piece(key)` says which slice of which fused tensor a per-expert weight is."""

    def __init__(self, meta: Any) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(meta)
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.expected = dict.fromkeys(meta.state_dict(), True)
        self.prefix = getattr(meta, "base_model_prefix", "")

    def map(self, key: str) -> tuple[str | None, tuple[int, int, int] | str | None]:
        """(task-model name or None, piece): piece is (expert, part, parts) for a per-expert weight that is
        rows part/parts of expert `expert` in the fused tensor, "unsupported" for one that other operations
        (e.g. a transpose) build, None for a tensor stored as the model holds it."""
        from transformers.core_model_loading import rename_source_key

        name, pattern = rename_source_key(key, self.renamings, self.converters, self.prefix or None,
                                          self.expected if self.prefix else None)
        if name not in self.expected:
            return None, None
        if pattern is None:
            return name, None
        converter = next(c for c in self.converters if pattern in c.source_patterns)
        steps = [(type(op).__name__, getattr(op, "dim", None)) for op in getattr(converter, "operations", [])]
        match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
        # stacking Linear weights (out, in) along a new first dimension, then joining them along rows, gives
        # (experts, out, in): anything else (a transpose into (experts, in, out)) is left to from_pretrained
        if steps not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]) or not match:
            return name, "unsupported"
        return name, (int(match.group(1)), converter.source_patterns.index(pattern), len(converter.source_patterns))

    def out_key(self, key: str, name: str) -> str:
        """A per-expert weight is written back under its checkpoint name (with the task model's prefix)."""
        prefix = self.prefix + "."
        if self.prefix and name.startswith(prefix) and not key.startswith(prefix):
            return prefix + key
        if self.prefix and key.startswith(prefix) and not name.startswith(prefix):
            return key[len(prefix):]
        return key


def shard_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def names_line_up(base_dir: Path, meta: Any, adapter: dict) -> bool:
    """Do the checkpoint's tensor names map onto the task model's (`meta`, on the meta device),
    allowing the base-model prefix, and is every weight the adapter adapts stored under the name it adapts?
    Names transformers renames on load (ViT's legacy ones) do not line up, nor a weight shared by several
    modules (Zamba's shared block), which the checkpoint stores once, under one of its names."""
    from safetensors import safe_open

    expected = {n for n, _ in meta.named_parameters()}
    names = CheckpointNames(meta)
    mapped = set()
    for shard in shard_files(base_dir):
        try:
            with safe_open(str(base_dir / shard), "pt") as handle:
                found = [names.map(k) for k in handle.keys()]
        except Exception:  # noqa: BLE001 - reported as corrupt by the streaming pass
            return True
        if any(piece == "unsupported" for _, piece in found):
            return False
        mapped |= {name for name, _ in found}
    experts = adapter_keys(adapter, meta).values()
    adapted = {f"{module}.weight" for module in adapter["lora"] if module not in experts}
    return not (expected - mapped - set(adapter["full"])) and adapted <= mapped


def merge_streamed(base_dir: Path, adapter: dict, staging: Path, meta: Any, task_config: Any, dtype: str | None,
                   into: str) -> dict:
    """Tensor by tensor: open, merge if it is a LoRA target, buffer, and write the buffer out as an
    output shard whenever it reaches OUTPUT_SHARD_BYTES. Opening the input per tensor keeps only that
    tensor's pages of the memory-mapped file resident."""
    from safetensors import safe_open

    names = CheckpointNames(meta)
    lora, full = adapter["lora"], dict(adapter["full"])
    tensors = adapter_keys(adapter, meta)  # expert tensor -> the name its adapter is saved under
    pending = {f"{module}.weight": module for module in lora if module not in tensors.values()}
    pending.update(tensors)
    layouts = {t["name"]: t for t in adapter["plan"].get("targets", ()) if t.get("parameter")}
    pieces: dict[str, set] = {name: set() for name in tensors}  # (expert, part) merged so far
    # peft's rule: a Conv1D base layer (GPT-2's, stored (in, out)) takes the update transposed, whatever the saved
    # config says (an adapter trained on a 4-bit GPT-2, whose Conv1D layers were Linear4bit ones, says False)
    modules = dict(meta.named_modules())
    conv1d = {module for module in lora if adaptable_kind(modules.get(module)) == "Conv1D"}
    quantized = _quantized_weights(adapter) if into == "dequantized" else set()
    target_dtype = torch_dtype(dtype)
    writer = ShardWriter(staging)
    out_dtype, merged = None, []
    for shard in shard_files(base_dir):
        path = str(base_dir / shard)
        try:
            with safe_open(path, "pt") as handle:
                keys = list(handle.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise LorakitError(f"{base_dir / shard} is corrupt or truncated ({exc})",
                               hint="re-download the base model") from None
        for key in keys:
            name, piece = names.map(key)
            if name is None:
                continue  # transformers would drop it too (e.g. a pooler the task model lacks)
            with safe_open(path, "pt") as handle:
                tensor = handle.get_tensor(key)
            out_dtype = out_dtype or (tensor.dtype if tensor.is_floating_point() else None)
            if isinstance(piece, tuple):  # one expert's share of a fused tensor, stored as a Linear weight
                if name in tensors:
                    expert, part, parts = piece
                    module = tensors[name]
                    experts = meta.get_parameter(name).shape[0]
                    rank = lora[module]["lora_A"].shape[0] // experts
                    delta = _expert_delta(lora[module], experts, expert, _scale(adapter["config"], name, rank),
                                          False)  # stacked Linear weights: (E, out, in); see CheckpointNames.map
                    rows = tensor.shape[0]
                    if delta.shape != (rows * parts, tensor.shape[1]):
                        raise LorakitError(f"adapter of {name} has shape {tuple(delta.shape)} per expert but the "
                                           f"base's experts are {(rows * parts, tensor.shape[1])}",
                                           hint="this adapter was trained on another base")
                    tensor = (tensor.float() + delta[part * rows:(part + 1) * rows]).to(tensor.dtype)
                    pieces[name].add((expert, part))
                    if len(pieces[name]) == experts * parts:
                        pending.pop(name)
                        merged.append(name)
                writer.add(names.out_key(key, name), checked(key, tensor, target_dtype))
                continue
            if name in pending:
                module = pending.pop(name)
                parts = lora[module]
                if name not in tensors and name not in quantized and getattr(parts.get("lora_A"), "ndim", 0) == 2:
                    tensor = _merged_in_rows(module, tensor, parts, module in conv1d,
                                             _scale(adapter["config"], module, parts["lora_A"].shape[0]))
                    merged.append(module)
                else:
                    weight = tensor.float()
                    if name in quantized:
                        weight = _dequantized(weight, adapter)
                    if name in tensors:  # a fused expert tensor, or a router's weight
                        experts = weight.shape[0] if weight.dim() == 3 else 1
                        rank = parts["lora_A"].shape[0] // experts
                        delta = _expert_delta(parts, experts, None, _scale(adapter["config"], name, rank),
                                              bool(layouts[name].get("transposed")))
                        delta = delta if weight.dim() == 3 else delta[0]
                    else:
                        rank = parts.get("lora_A", parts.get("lora_embedding_A")).shape[0]
                        delta = _delta(parts, tuple(weight.shape), module in conv1d,
                                       _scale(adapter["config"], module, rank))
                    if delta.shape != weight.shape:
                        raise _other_base(module, delta.shape, weight.shape)
                    tensor = delta.add_(weight).to(tensor.dtype)
                    del weight, delta
                    merged.append(module)
            if name in full:
                tensor = full.pop(name).to(tensor.dtype)
            writer.add(name, checked(name, tensor, target_dtype))
    if pending:
        missing = sorted(pending.values())
        raise LorakitError(f"the adapter targets {len(missing)} modules the base lacks, e.g. {missing[0]}",
                           hint="this adapter was trained on another base")
    for name, tensor in full.items():  # modules the base checkpoint lacked (a new head)
        writer.add(name, checked(name, tensor, target_dtype))
    writer.close()
    config = task_config
    final_dtype = target_dtype or out_dtype
    config.dtype = final_dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(staging))
    return {"dtype": str(final_dtype).removeprefix("torch."), "merged_layers": len(merged)}


def adapter_keys(adapter: dict, meta: Any) -> dict[str, str]:
    """Parameter tensor -> the module name its LoRA weights are saved under. peft adapts the tensors of one
    module (an MoE layer's experts) by nesting one ParamWrapper per tensor, in the module's parameter order:
    the last tensor's adapter is the outermost (`experts.lora_A`), each earlier one a `.base_layer` deeper."""
    names = [t["name"] for t in adapter["plan"].get("targets", ()) if t.get("parameter")]
    keys = {}
    for owner in dict.fromkeys(n.rpartition(".")[0] for n in names):
        order = [f"{owner}.{p}" for p, _ in meta.get_submodule(owner).named_parameters(recurse=False)
                 if f"{owner}.{p}" in names]
        for depth, name in enumerate(reversed(order)):
            keys[name] = owner + ".base_layer" * depth
    return keys


def _quantized_weights(adapter: dict) -> set[str]:
    """The weights the adapter's base had quantized: read from the Plan saved with it, not decided again."""
    plan = adapter["plan"]
    if not plan.get("quant"):
        raise SpecError("--into dequantized is for adapters trained on an 8/4-bit base; this one was not",
                        hint="drop --into")
    if "quantized" not in plan:
        raise SpecError(f"{adapter['folder']} was saved by an older lorakit and does not list its quantized "
                        "layers", hint="load it with lorakit.load_adapter and save it again")
    return {f"{name}.weight" for name in plan["quantized"]}


def _dequantized(weight: Any, adapter: dict) -> Any:
    """The weight as the quantized base the adapter trained on saw it: quantize, then dequantize."""
    import bitsandbytes.functional as bnbf

    spec = adapter["plan"]["quant"]
    if spec["bits"] == 8:
        import bitsandbytes as bnb

        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
        return (param.data.float() * param.SCB.float().unsqueeze(1) / 127).float()
    packed, state = bnbf.quantize_4bit(weight, quant_type=spec["quant_type"], compress_statistics=spec["double_quant"])
    return bnbf.dequantize_4bit(packed, state).float()
