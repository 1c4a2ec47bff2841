"""Fold adapters into the base weights and write a plain transformers checkpoint.

One adapter (method "linear") onto a base with safetensors files is merged by
streaming: load a shard, add B·A·scale (fp32) to the LoRA layers in it, write
it, move on; peak memory is about the largest shard plus the adapter. Several
adapters (peft's `add_weighted_adapter`), DoRA, or a base only reachable
through `from_pretrained` go through peft's `merge_and_unload`, which holds
the whole model. Either way the output is written to a temp folder beside
`out_dir`, verified against base+adapter run through peft, and only then
renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from .adapter import MANIFEST, sha256_file, verify as verify_files, versions
from .errors import LorakitError, SpecError
from .files import refuse_existing, write_json_atomic

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
# Which weighted merges equal the weighted sum of the adapters' updates exactly.
EXACTNESS = {"linear": "exact for one adapter; for several, peft sums the A and B matrices separately, which "
                       "is not the sum of the B·A updates (approximate)",
             "cat": "exact: concatenates the ranks, so the update is the weighted sum of B·A",
             "svd": "approximate: truncated SVD of the weighted sum of updates",
             "ties": "approximate by design: trims and sign-elects the updates (TIES)",
             "dare_linear": "approximate by design: random drop and rescale (DARE)",
             "dare_ties": "approximate by design: DARE then TIES"}
FP32_TOLERANCE = 1e-4
# bf16 keeps 8 significant bits (relative step 2^-8 = 0.4%); rounding every weight and
# activation compounds over the layers, so half-precision outputs are checked to 2% of
# the largest logit rather than to an absolute figure.
HALF_RELATIVE_TOLERANCE = 0.02
DEQUANTIZED_TOLERANCE = 1e-2
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json",
                    "preprocessor_config.json", "processor_config.json", "chat_template.jinja",
                    "generation_config.json")


# ---- inputs -----------------------------------------------------------------

def _read_adapter(folder: Path) -> dict:
    from safetensors import safe_open

    if not (folder / "adapter_config.json").is_file():
        raise LorakitError(f"{folder} is not an adapter folder (no adapter_config.json)",
                           hint="pass a folder written by LoraTrainer or peft's save_pretrained")
    manifest = verify_files(folder) if (folder / MANIFEST).is_file() else None
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"
    try:
        with safe_open(str(weights), "pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise LorakitError(f"{weights} is corrupt or truncated ({exc})", hint="re-save or re-download the adapter"
                           ) from None
    return {"folder": folder, "config": config, "manifest": manifest, "tensors": tensors,
            "sha256": sha256_file(weights)}


def _lora_modules(adapter: dict) -> dict[str, dict]:
    """module path (base names) -> {"A": tensor, "B": tensor}; plus the "full" copies under "__full__"."""
    modules: dict[str, dict] = {}
    full = {}
    for key, value in adapter["tensors"].items():
        name = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            marker = f".{part}"
            if marker in name:
                modules.setdefault(name.split(marker)[0], {})[part] = value
                break
        else:
            full[name] = value
    return {"lora": modules, "full": full}


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


# ---- the merge ----------------------------------------------------------------

def merge(base: Any, adapters: Any, out_dir: str | os.PathLike, *, weights: list[float] | None = None,
          method: str = "linear", dtype: str | None = None, verify: bool = True, force: bool = False,
          into: str = "original", stream: bool | None = None) -> dict:
    """Merge one or several adapters into `base` and write a plain transformers checkpoint to `out_dir`.

    `base`: anything `lorakit.load` takes, or None to use the adapter manifest's base. Returns the
    merge report (also written to `out_dir/merge_report.json`).
    """
    from .load import torch_dtype

    started = time.perf_counter()
    folders = [Path(a) for a in ([adapters] if isinstance(adapters, (str, os.PathLike)) else adapters)]
    if not folders:
        raise SpecError("no adapter given", hint="pass --adapter DIR")
    if method not in METHODS:
        raise SpecError(f"unknown merge method {method!r}", hint=f"methods are: {', '.join(METHODS)}")
    if weights is not None and len(weights) != len(folders):
        raise SpecError(f"{len(weights)} weights for {len(folders)} adapters",
                        hint="give one weight per --adapter, e.g. --weights 0.7,0.3")
    if into not in ("original", "dequantized"):
        raise SpecError(f"into must be 'original' or 'dequantized', got {into!r}")
    torch_dtype(dtype)
    out = Path(out_dir)
    refuse_existing(out, force)
    loaded = [_read_adapter(f) for f in folders]
    base = base if base is not None else _base_from_manifest(loaded[0])
    _check_compatible(loaded)
    staging = out.parent / f".{out.name}.lorakit-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        base_dir = _local_base_dir(base)
        streamable = (len(loaded) == 1 and method == "linear" and base_dir is not None
                      and not loaded[0]["config"].get("use_dora"))
        if stream is True and not streamable:
            raise SpecError("this merge cannot be streamed",
                            hint="streaming needs one adapter, method linear, no DoRA, and a local safetensors base")
        task_config = _task_config(loaded[0], base)
        _check_model_type(loaded[0], base, task_config)
        if streamable and not _names_line_up(base_dir, task_config, loaded[0]):
            # The checkpoint uses names transformers renames on load (e.g. ViT's legacy
            # attention.attention.query): only from_pretrained can read it.
            streamable = False
        if into == "dequantized" and not streamable:
            raise SpecError("--into dequantized needs the streamed path", hint="merge one adapter at a time")
        use_stream = streamable if stream is None else stream
        if use_stream:
            stats = _streamed(base_dir, loaded[0], staging, task_config, dtype, into)
        else:
            stats = _in_memory(base, loaded, staging, task_config, weights, method, dtype)
        _copy_side_files(base_dir, staging)
        figures = _verify(base, loaded, staging, task_config, weights, method, dtype, into) if verify else None
        report = {
            "base": str(base), "adapters": [{"path": str(a["folder"]), "sha256": a["sha256"]} for a in loaded],
            "method": method, "exactness": EXACTNESS[method] if len(loaded) > 1 else "exact (one adapter)",
            "weights": weights, "dtype": dtype or stats["dtype"], "into": into,
            "path": "streamed shard by shard" if use_stream else "peft merge_and_unload (whole model in memory)",
            "verification": figures, "wall_seconds": round(time.perf_counter() - started, 3),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "merged_layers": stats["merged_layers"], "versions": versions(),
        }
        write_json_atomic(staging / "merge_report.json", report)
        _publish(staging, out, force)
        return report
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _base_from_manifest(adapter: dict) -> str:
    manifest = adapter["manifest"] or {}
    base = (manifest.get("base") or {}).get("id") or adapter["config"].get("base_model_name_or_path")
    if not base:
        raise SpecError(f"{adapter['folder']} does not name its base model", hint="pass --base MODEL")
    return base


def _check_compatible(loaded: list[dict]) -> None:
    first = loaded[0]
    for other in loaded[1:]:
        fa = ((first["manifest"] or {}).get("base") or {}).get("fingerprint")
        fb = ((other["manifest"] or {}).get("base") or {}).get("fingerprint")
        if fa and fb and fa.get("shapes_sha256") != fb.get("shapes_sha256"):
            raise LorakitError(f"{first['folder']} and {other['folder']} were trained on different bases",
                               hint="merge adapters of the same base model only")
        ta, tb = set(_lora_modules(first)["lora"]), set(_lora_modules(other)["lora"])
        if ta != tb:
            only = sorted(ta ^ tb)
            raise LorakitError(f"{first['folder']} and {other['folder']} adapt different modules, e.g. {only[0]}",
                               hint="weighted merges need adapters with the same targets")


def _check_model_type(adapter: dict, base: Any, task_config: Any) -> None:
    from .load import resolve_config

    recorded = (((adapter["manifest"] or {}).get("base") or {}).get("fingerprint") or {}).get("model_type")
    actual = base.config.model_type if hasattr(base, "config") else resolve_config(base)[0].model_type
    if recorded and recorded != actual:
        raise LorakitError(f"{adapter['folder']} was trained on a {recorded} model, but the base is a {actual}",
                           hint="pass the base it was trained on with --base")


def _names_line_up(base_dir: Path, task_config: Any, adapter: dict) -> bool:
    """Do the checkpoint's tensor names map onto the task model's (allowing the base-model prefix)?"""
    from safetensors import safe_open

    from .load import build_from_config

    meta = build_from_config(task_config, meta=True)
    expected = {n for n, _ in meta.named_parameters()}
    prefix = getattr(meta, "base_model_prefix", "")
    mapped = set()
    for shard in _shard_files(base_dir):
        try:
            with safe_open(str(base_dir / shard), "pt") as handle:
                mapped |= {_task_key(k, expected, prefix) for k in handle.keys()}
        except Exception:  # noqa: BLE001 - reported as corrupt by the streaming pass
            return True
    from_adapter = set(_lora_modules(adapter)["full"])
    return not (expected - mapped - from_adapter)


def _local_base_dir(base: Any) -> Path | None:
    """The folder holding the base's safetensors, or None when only from_pretrained can reach it."""
    from .load import resolve_config

    if hasattr(base, "named_parameters"):
        return None
    _, source = resolve_config(base)
    if source["kind"] == "dir":
        folder = Path(source["id"])
    else:
        try:
            from huggingface_hub import snapshot_download

            from .load import hub_reachable

            folder = Path(snapshot_download(source["id"], local_files_only=not hub_reachable(),
                                            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
        except Exception as exc:  # noqa: BLE001 - any Hub failure: the base is not available here
            raise LorakitError(f"cannot find the weights of {source['id']} ({exc})",
                               hint="download the base once, or pass --base with its local folder") from None
    has_weights = (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file()
    return folder if has_weights else None


def _task_config(adapter: dict, base: Any) -> Any:
    """The config of the model being produced: the adapter manifest's (it knows the task head), else the base's."""
    from transformers import AutoConfig

    from .load import resolve_config

    recorded = (adapter["manifest"] or {}).get("config")
    if recorded:
        data = dict(recorded)
        return AutoConfig.for_model(**{k: v for k, v in data.items() if k not in ("transformers_version",)})
    if hasattr(base, "config"):
        return base.config
    return resolve_config(base)[0]


def _shard_files(folder: Path) -> list[str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return ["model.safetensors"]


OUTPUT_SHARD_BYTES = 128 * 2**20  # flush written tensors at this size: bounds what is held at once


def _streamed(base_dir: Path, adapter: dict, staging: Path, task_config: Any, dtype: str | None,
              into: str) -> dict:
    """Tensor by tensor: open, merge if it is a LoRA target, buffer, and write the buffer out as an
    output shard whenever it reaches OUTPUT_SHARD_BYTES. Opening the input per tensor keeps only that
    tensor's pages of the memory-mapped file resident."""
    from safetensors import safe_open

    from .load import build_from_config

    meta = build_from_config(task_config, meta=True)
    expected = set(meta.state_dict().keys())
    prefix = getattr(meta, "base_model_prefix", "")
    parts = _lora_modules(adapter)
    lora, full = parts["lora"], dict(parts["full"])
    pending = {f"{module}.weight": module for module in lora}
    fan_in_fan_out = bool(adapter["config"].get("fan_in_fan_out"))
    quantized = _quantized_weights(adapter, task_config) if into == "dequantized" else set()
    target_dtype = _dtype(dtype)
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


def _checked(name: str, tensor: Any, target_dtype: Any) -> Any:
    import torch

    if tensor.is_floating_point():
        if not torch.isfinite(tensor).all():
            raise LorakitError(f"merged weight {name} has NaN or Inf values",
                               hint="the adapter is broken (diverged training?); do not deploy it")
        if target_dtype is not None:
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


def _dtype(dtype: str | None) -> Any:
    from .load import torch_dtype

    return torch_dtype(dtype)


def _task_key(key: str, expected: set[str], prefix: str) -> str | None:
    if key in expected:
        return key
    if prefix and f"{prefix}.{key}" in expected:
        return f"{prefix}.{key}"
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in expected:
        return key[len(prefix) + 1:]
    return None


def _quantized_weights(adapter: dict, task_config: Any) -> set[str]:
    from .load import build_from_config
    from .quantize import will_quantize
    from .specs import Quant

    spec = (adapter["manifest"] or {}).get("quant")
    if not spec:
        raise SpecError("--into dequantized is for adapters trained on an 8/4-bit base; this one was not",
                        hint="drop --into")
    meta = build_from_config(task_config, meta=True)
    return {f"{name}.weight" for name in will_quantize(meta, Quant(**spec))}


def _dequantized(weight: Any, adapter: dict) -> Any:
    """The weight as the quantized base the adapter trained on saw it: quantize, then dequantize."""
    import bitsandbytes.functional as bnbf

    spec = adapter["manifest"]["quant"]
    if spec["bits"] == 8:
        import bitsandbytes as bnb

        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
        return (param.data.float() * param.SCB.float().unsqueeze(1) / 127).float()
    packed, state = bnbf.quantize_4bit(weight, quant_type=spec["quant_type"], compress_statistics=spec["double_quant"])
    return bnbf.dequantize_4bit(packed, state).float()


def _in_memory(base: Any, loaded: list[dict], staging: Path, task_config: Any, weights: list[float] | None,
               method: str, dtype: str | None) -> dict:
    model = _peft_model(base, loaded, task_config, weights, method)
    merged = model.merge_and_unload(safe_merge=True)
    target = _dtype(dtype)
    if target is not None:
        merged = merged.to(target)
    for name, param in merged.named_parameters():
        if param.is_floating_point() and not param.isfinite().all():
            raise LorakitError(f"merged weight {name} has NaN or Inf values", hint="the adapter is broken")
    merged.save_pretrained(str(staging), safe_serialization=True, max_shard_size="2GB")
    layers = len(_lora_modules(loaded[0])["lora"])
    return {"dtype": str(next(merged.parameters()).dtype).removeprefix("torch."), "merged_layers": layers}


def _base_model(base: Any, task_config: Any, quant: Any = None) -> Any:
    from .load import auto_class, load, task_from_config

    if hasattr(base, "named_parameters"):
        return base
    task = task_from_config(task_config)
    source_dir = _local_base_dir(base)
    where = str(source_dir) if source_dir is not None else str(base)
    if quant is not None:
        model = load(where, task=task, quant=quant, num_labels=task_config.num_labels,
                     id2label=task_config.id2label, label2id=task_config.label2id)
    else:
        model = auto_class(task).from_pretrained(where, config=task_config, use_safetensors=True)
    return model.eval()


def _peft_model(base: Any, loaded: list[dict], task_config: Any, weights: list[float] | None, method: str,
                quant: Any = None) -> Any:
    from peft import PeftModel

    model = PeftModel.from_pretrained(_base_model(base, task_config, quant), str(loaded[0]["folder"]),
                                      adapter_name="adapter0")
    for i, adapter in enumerate(loaded[1:], start=1):
        model.load_adapter(str(adapter["folder"]), adapter_name=f"adapter{i}")
    if len(loaded) > 1:
        names = [f"adapter{i}" for i in range(len(loaded))]
        kwargs = {"density": 0.5} if method in ("ties", "dare_linear", "dare_ties") else {}
        import torch

        torch.manual_seed(0)  # DARE drops at random: the merge and its verification must drop alike
        model.add_weighted_adapter(names, weights or [1.0 / len(loaded)] * len(loaded), "merged",
                                   combination_type=method, **kwargs)
        model.set_adapter("merged")
        for name in names:
            model.delete_adapter(name)
    return model.eval()


def sample_inputs(config: Any) -> dict:
    """A fixed batch: tokens for text models, pixels for vision models."""
    import torch

    g = torch.Generator().manual_seed(0)
    if hasattr(config, "num_channels") and not hasattr(config, "vocab_size"):
        size = getattr(config, "image_size", 64)
        size = size if isinstance(size, int) else size[0]
        return {"pixel_values": torch.randn(2, config.num_channels, size, size, generator=g)}
    vocab = min(getattr(config, "vocab_size", 1000), 1000)
    inputs = {"input_ids": torch.randint(3, vocab, (2, 16), generator=g)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(3, vocab, (2, 8), generator=g)
    return inputs


def _logits(model: Any, inputs: dict) -> Any:
    import torch

    with torch.no_grad():
        out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def _verify(base: Any, loaded: list[dict], staging: Path, task_config: Any, weights: list[float] | None,
            method: str, dtype: str | None, into: str) -> dict:
    """Max |logits| difference between base+adapter through peft and the merged checkpoint."""
    from .load import auto_class, task_from_config
    from .specs import Quant

    inputs = sample_inputs(task_config)
    quant_spec = (loaded[0]["manifest"] or {}).get("quant")
    quant = Quant(**quant_spec) if quant_spec else None
    reference_model = _peft_model(base, loaded, task_config, weights, method,
                                  quant if into == "dequantized" else None)
    reference = _logits(reference_model, inputs)
    del reference_model
    merged = auto_class(task_from_config(task_config)).from_pretrained(str(staging), use_safetensors=True).eval()
    candidate = _logits(merged, inputs)
    difference = float((reference - candidate).abs().max())
    half = dtype in ("bfloat16", "float16")
    tolerance = HALF_RELATIVE_TOLERANCE * float(reference.abs().max()) if half else FP32_TOLERANCE
    if into == "dequantized":
        # The reference runs bitsandbytes' own 4-bit kernel, not the exact dequantized weights; on CPU
        # it differed from them by about 2e-3 in the logits of our tests, hence this looser bound.
        tolerance = max(tolerance, DEQUANTIZED_TOLERANCE)
    figures = {"max_abs_logit_difference": difference, "tolerance": tolerance,
               "reference": "base + adapter through peft" + (" on the quantized base" if into == "dequantized"
                                                             else ""),
               "sample": {k: list(v.shape) for k, v in inputs.items()}}
    if quant is not None and into == "original":
        quantized = _logits(_peft_model(base, loaded, task_config, None, "linear", quant), inputs)
        figures["quantization_gap"] = {
            "max_abs_logit_difference": float((quantized - candidate).abs().max()),
            "meaning": "the adapter on the quantized base it trained on, against the merged full-precision model"}
    if not difference <= tolerance:
        raise LorakitError(f"merge verification failed: logits differ by {difference:.3g} (tolerance {tolerance:.3g})",
                           hint="nothing was written; report this with the adapter and base")
    return figures


def _copy_side_files(base_dir: Path | None, staging: Path) -> None:
    if base_dir is None:
        return
    for name in _TOKENIZER_FILES:
        if (base_dir / name).is_file() and not (staging / name).exists():
            shutil.copy2(base_dir / name, staging / name)


def _publish(staging: Path, out: Path, force: bool) -> None:
    """Rename the finished folder into place; with force, the old one is removed only after."""
    if out.exists():
        if not force:
            raise LorakitError(f"{out} already exists", hint="pass --force")
        old = out.parent / f".{out.name}.lorakit-old-{os.getpid()}"
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
