"""The streamed merge: one adapter folded into a safetensors base tensor by tensor.

Each tensor is read on its own (so only its pages of the memory-mapped shard
are resident), gets W + scale·B·A in fp32 if it is a LoRA target, and goes to
an output buffer written out as a shard every OUTPUT_SHARD_BYTES. Peak memory
is about one output shard plus the largest tensor and the adapter, not the
model. `lorakit.merging` decides when this path applies and verifies it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import LorakitError, SpecError
from .files import write_json_atomic
from .specs import torch_dtype

def _scale(config: dict, module: str, rank: int) -> float:
    from peft.utils.other import get_pattern_key

    alpha = config["lora_alpha"]
    patterns = config.get("alpha_pattern") or {}
    if patterns:
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
    delta = (b @ a) * scale
    return delta.T if fan_in_fan_out else delta


def _shard_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


def names_line_up(base_dir: Path, meta: Any, adapter: dict) -> bool:
    """Do the checkpoint's tensor names map onto the task model's (`meta`, on the meta device),
    allowing the base-model prefix? Names transformers renames on load (ViT's legacy ones) do not."""
    from safetensors import safe_open

    expected = {n for n, _ in meta.named_parameters()}
    prefix = getattr(meta, "base_model_prefix", "")
    mapped = set()
    for shard in _shard_files(base_dir):
        try:
            with safe_open(str(base_dir / shard), "pt") as handle:
                mapped |= {_task_key(k, expected, prefix) for k in handle.keys()}
        except Exception:  # noqa: BLE001 - reported as corrupt by the streaming pass
            return True
    return not (expected - mapped - set(adapter["full"]))


OUTPUT_SHARD_BYTES = 128 * 2**20  # flush written tensors at this size: bounds what is held at once


def merge_streamed(base_dir: Path, adapter: dict, staging: Path, meta: Any, task_config: Any, dtype: str | None,
                   into: str) -> dict:
    """Tensor by tensor: open, merge if it is a LoRA target, buffer, and write the buffer out as an
    output shard whenever it reaches OUTPUT_SHARD_BYTES. Opening the input per tensor keeps only that
    tensor's pages of the memory-mapped file resident."""
    from safetensors import safe_open


    expected = set(meta.state_dict().keys())
    prefix = getattr(meta, "base_model_prefix", "")
    lora, full = adapter["lora"], dict(adapter["full"])
    pending = {f"{module}.weight": module for module in lora}
    fan_in_fan_out = bool(adapter["config"].get("fan_in_fan_out"))
    quantized = _quantized_weights(adapter) if into == "dequantized" else set()
    target_dtype = torch_dtype(dtype)
    writer = _ShardWriter(staging)
    out_dtype, merged = None, []
    for shard in _shard_files(base_dir):
        path = str(base_dir / shard)
        try:
            with safe_open(path, "pt") as handle:
                keys = list(handle.keys())
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise LorakitError(f"{base_dir / shard} is corrupt or truncated ({exc})",
                               hint="re-download the base model") from None
        for key in keys:
            name = _task_key(key, expected, prefix)
            if name is None:
                continue  # transformers would drop it too (e.g. a pooler the task model lacks)
            with safe_open(path, "pt") as handle:
                tensor = handle.get_tensor(key)
            out_dtype = out_dtype or (tensor.dtype if tensor.is_floating_point() else None)
            if name in pending:
                module = pending.pop(name)
                rank = lora[module].get("lora_A", lora[module].get("lora_embedding_A")).shape[0]
                weight = tensor.float()
                if name in quantized:
                    weight = _dequantized(weight, adapter)
                delta = _delta(lora[module], tuple(weight.shape), fan_in_fan_out,
                               _scale(adapter["config"], module, rank))
                if delta.shape != weight.shape:
                    raise LorakitError(f"adapter layer {module} has shape {tuple(delta.shape)} but the base's "
                                       f"is {tuple(weight.shape)}", hint="this adapter was trained on another base")
                tensor = (weight + delta).to(tensor.dtype)
                del weight, delta
                merged.append(module)
            if name in full:
                tensor = full.pop(name).to(tensor.dtype)
            writer.add(name, _checked(name, tensor, target_dtype))
    if pending:
        missing = sorted(pending.values())
        raise LorakitError(f"the adapter targets {len(missing)} modules the base lacks, e.g. {missing[0]}",
                           hint="this adapter was trained on another base")
    for name, tensor in full.items():  # modules the base checkpoint lacked (a new head)
        writer.add(name, _checked(name, tensor, target_dtype))
    writer.close()
    config = task_config
    final_dtype = target_dtype or out_dtype
    config.dtype = final_dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(staging))
    return {"dtype": str(final_dtype).removeprefix("torch."), "merged_layers": len(merged)}


def check_finite(name: str, tensor: Any) -> None:
    """peft's safe_merge idea: a merged weight with NaN or Inf fails the merge, naming the layer."""
    import torch

    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise LorakitError(f"merged weight {name} has NaN or Inf values",
                           hint="the adapter is broken (diverged training?); do not deploy it")


def _checked(name: str, tensor: Any, target_dtype: Any) -> Any:
    check_finite(name, tensor)
    if target_dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(target_dtype)
    return tensor.contiguous()


class _ShardWriter:
    """Writes tensors into model-0000i-of-0000N.safetensors files of about OUTPUT_SHARD_BYTES,
    then names them and writes the index (or a single model.safetensors) on close."""

    def __init__(self, folder: Path):
        self.folder, self.buffer, self.size, self.parts, self.total = folder, {}, 0, [], 0

    def add(self, name: str, tensor: Any) -> None:
        self.buffer[name] = tensor
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= OUTPUT_SHARD_BYTES:
            self._flush()

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        part = self.folder / f".part-{len(self.parts):05d}.safetensors"
        save_file(self.buffer, str(part), metadata={"format": "pt"})
        self.parts.append((part, list(self.buffer)))
        self.total += self.size
        self.buffer, self.size = {}, 0

    def close(self) -> None:
        self._flush()
        count = len(self.parts)
        weight_map = {}
        for number, (part, names) in enumerate(self.parts, start=1):
            file = "model.safetensors" if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(part, self.folder / file)
            weight_map.update(dict.fromkeys(names, file))
        if count > 1:
            write_json_atomic(self.folder / "model.safetensors.index.json",
                              {"metadata": {"total_size": self.total}, "weight_map": weight_map})


def _task_key(key: str, expected: set[str], prefix: str) -> str | None:
    if key in expected:
        return key
    if prefix and f"{prefix}.{key}" in expected:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
        return key[len(prefix) + 1:]
    return None


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
