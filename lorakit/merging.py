"""Fold adapters into the base weights and write a plain transformers checkpoint.

One adapter (method "linear") onto a base with safetensors files is merged by
streaming (`lorakit.streaming`: tensor by tensor, peak memory about one output
shard plus the largest tensor). Several adapters (peft's `add_weighted_adapter`),
DoRA, or a base only reachable through `from_pretrained` go through peft's
`merge_and_unload`, which holds the whole model. Either way the output is
written to a temp folder beside `out_dir`, verified against base+adapter run
through peft, and only then renamed into place.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from .adapter import MANIFEST, sha256_file, verify as verify_files, versions
from .errors import LorakitError, SpecError
from .files import refuse_existing, write_json_atomic
from .streaming import check_finite, merge_streamed, names_line_up

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
    lora, full = _split(tensors)
    return {"folder": folder, "config": config, "manifest": manifest, "lora": lora, "full": full,
            "sha256": sha256_file(weights)}


def _split(tensors: dict) -> tuple[dict[str, dict], dict]:
    """({adapted module: {"lora_A": ..., "lora_B": ...}}, {base name: tensor of a module trained in full})."""
    modules: dict[str, dict] = {}
    full = {}
    for key, value in tensors.items():
        name = key.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"):
            marker = f".{part}"
            if marker in name:
                modules.setdefault(name.split(marker)[0], {})[part] = value
                break
        else:
            full[name] = value
    return modules, full


# ---- the merge ----------------------------------------------------------------

def merge(base: Any, adapters: Any, out_dir: str | os.PathLike, *, weights: list[float] | None = None,
          method: str = "linear", dtype: str | None = None, verify: bool = True, force: bool = False,
          into: str = "original", stream: bool | None = None) -> dict:
    """Merge one or several adapters into `base` and write a plain transformers checkpoint to `out_dir`.

    `base`: anything `lorakit.load` takes, or None to use the adapter manifest's base. Returns the
    merge report (also written to `out_dir/merge_report.json`).
    """
    from .load import build_from_config, resolve_config, torch_dtype

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
        in_memory_base = hasattr(base, "named_parameters")
        base_config, source = (base.config, None) if in_memory_base else resolve_config(base)
        _check_model_type(loaded[0], base_config)
        base_dir = None if in_memory_base else _local_base_dir(source)
        # Downstream, a base on disk is read from its folder: resolved once, here.
        base = base if in_memory_base or base_dir is None else base_dir
        streamable = (len(loaded) == 1 and method == "linear" and base_dir is not None
                      and not loaded[0]["config"].get("use_dora"))
        if stream is True and not streamable:
            raise SpecError("this merge cannot be streamed",
                            hint="streaming needs one adapter, method linear, no DoRA, and a local safetensors base")
        task_config = _task_config(loaded[0], base_config)
        meta = build_from_config(task_config, meta=True)
        if streamable and not names_line_up(base_dir, meta, loaded[0]):
            # The checkpoint uses names transformers renames on load (e.g. ViT's legacy
            # attention.attention.query): only from_pretrained can read it.
            streamable = False
        if into == "dequantized" and not streamable:
            raise SpecError("--into dequantized needs the streamed path", hint="merge one adapter at a time")
        use_stream = streamable if stream is None else stream
        if use_stream:
            stats = merge_streamed(base_dir, loaded[0], staging, meta, task_config, dtype, into)
        else:
            stats = _in_memory(base, loaded, staging, task_config, weights, method, dtype)
        _copy_side_files(base_dir, loaded[0]["folder"], staging)
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
        ta, tb = set(first["lora"]), set(other["lora"])
        if ta != tb:
            only = sorted(ta ^ tb)
            raise LorakitError(f"{first['folder']} and {other['folder']} adapt different modules, e.g. {only[0]}",
                               hint="weighted merges need adapters with the same targets")


def _check_model_type(adapter: dict, base_config: Any) -> None:
    recorded = (((adapter["manifest"] or {}).get("base") or {}).get("fingerprint") or {}).get("model_type")
    actual = base_config.model_type
    if recorded and recorded != actual:
        raise LorakitError(f"{adapter['folder']} was trained on a {recorded} model, but the base is a {actual}",
                           hint="pass the base it was trained on with --base")


def _local_base_dir(source: dict) -> Path | None:
    """The folder holding the base's safetensors, or None when only from_pretrained can reach it."""
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


def _task_config(adapter: dict, base_config: Any) -> Any:
    """The config of the model being produced: the adapter manifest's (it knows the task head), else the base's."""
    from transformers import AutoConfig

    recorded = (adapter["manifest"] or {}).get("config")
    if recorded:
        data = dict(recorded)
        return AutoConfig.for_model(**{k: v for k, v in data.items() if k not in ("transformers_version",)})
    return base_config


def _in_memory(base: Any, loaded: list[dict], staging: Path, task_config: Any, weights: list[float] | None,
               method: str, dtype: str | None) -> dict:
    from .load import torch_dtype

    model = _peft_model(base, loaded, task_config, weights, method)
    merged = model.merge_and_unload(safe_merge=True)
    target = torch_dtype(dtype)
    if target is not None:
        merged = merged.to(target)
    for name, param in merged.named_parameters():
        check_finite(name, param)
    merged.save_pretrained(str(staging), safe_serialization=True, max_shard_size="2GB")
    layers = len(loaded[0]["lora"])
    return {"dtype": str(next(merged.parameters()).dtype).removeprefix("torch."), "merged_layers": layers}


def _base_model(base: Any, task_config: Any, quant: Any = None) -> Any:
    from .load import auto_class, load, task_from_config

    if hasattr(base, "named_parameters"):
        return base
    task = task_from_config(task_config)
    where = str(base)  # its folder when on disk (merge resolved it), else its id
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


def _copy_side_files(base_dir: Path | None, adapter_dir: Path, staging: Path) -> None:
    """Tokenizer files (and chat template) from the adapter folder when it saved a tokenizer (it may have added
    tokens or changed the template), else from the base; never a mix of the two. Other side files: the base's."""
    from_adapter = (adapter_dir / "tokenizer_config.json").is_file()
    for name in _TOKENIZER_FILES:
        tokenizer_file = name not in ("generation_config.json", "preprocessor_config.json", "processor_config.json")
        folder = adapter_dir if from_adapter and tokenizer_file else base_dir
        if folder is not None and (folder / name).is_file() and not (staging / name).exists():
            shutil.copy2(folder / name, staging / name)


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
