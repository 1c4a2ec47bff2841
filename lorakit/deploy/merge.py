"""Fold adapters into the base weights and write a plain transformers checkpoint.

One adapter (method "linear") onto a base with safetensors files is merged by
streaming (`lorakit.deploy.streaming`: tensor by tensor, peak memory about one output
shard plus the largest tensor). Several adapters (peft's `add_weighted_adapter`),
DoRA, or a base only reachable through `from_pretrained` go through peft's
`merge_and_unload`, which holds the whole model. Either way the output is
written to a temp folder beside `out_dir`, verified (`lorakit.deploy.verify_streamed`:
tensor by tensor for a streamed merge, by logits through peft where the model
fits), and only then renamed into place.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..adapter.format import check_mergeable, versions
from ..core.errors import LorakitError, SpecError
from ..core.files import refuse_existing, write_json_atomic
from ..gguf.export import check_gguf, export_gguf, prepare_gguf
from ..model.load import hub_reachable, package_path, resolve_config
from ..model.tasks import build_from_config
from ..plan.state import Source
from ..spec.specs import torch_dtype
from .adapters import base_from_manifest, check_compatible, check_model_type, read_adapter, refuse_unmergeable
from .shard_writer import check_finite
from .streaming import merge_streamed, names_line_up
from .verify import peft_model
from .verify_streamed import check_merge, refuse_unchecked

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
# Which weighted merges equal the weighted sum of the adapters' updates exactly.
EXACTNESS = {"linear": "exact for one adapter; for several, peft sums the A and B matrices separately, which "
                       "is not the sum of the B·A updates (approximate)",
             "cat": "exact: concatenates the ranks, so the update is the weighted sum of B·A",
             "svd": "approximate: truncated SVD of the weighted sum of updates",
             "ties": "approximate by design: trims and sign-elects the updates (TIES)",
             "dare_linear": "approximate by design: random drop and rescale (DARE)",
             "dare_ties": "approximate by design: DARE then TIES"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json",
                    "preprocessor_config.json", "processor_config.json", "chat_template.jinja",
                    "generation_config.json")


# ---- inputs -----------------------------------------------------------------


# ---- the merge ----------------------------------------------------------------

def merge(base: Any, adapters: Any, out_dir: str | os.PathLike, *, weights: list[float] | None = None,
          method: str = "linear", dtype: str | None = None, verify: bool = True, force: bool = False,
          into: str = "original", stream: bool | None = None, gguf: str | os.PathLike | None = None,
          gguf_type: str = "f16", ollama: bool = False, verify_logits: bool | None = None) -> dict:
    """Merge one or several adapters into `base` and write a plain transformers checkpoint to `out_dir`.

    `base`: anything `lorakit.load` takes, or None to use the adapter manifest's base. Returns the
    merge report (also written to `out_dir/merge_report.json`). With `gguf`, the merged model is also
    written to that GGUF file (`gguf_type` f16, q8_0 or f32; the families in gguf/families.py) and checked
    before it gets its name (in llama.cpp when built here: see gguf/verify.py); with `ollama`, an Ollama
    Modelfile beside it (gguf/modelfile.py). `verify_logits`: run the whole-model logits check (True), skip it
    (False), or decide by verify_streamed.LOGITS_CHECK_BYTES (None).
    """
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
    if verify_logits is not None and not verify:
        raise SpecError("verify_logits is for a verified merge", hint="drop verify_logits, or verify=True")
    out = Path(out_dir)
    staging, old = _leftovers(out)  # first: it may bring back an output a killed merge had set aside
    refuse_existing(out, force, folder=True)
    gguf_path = prepare_gguf(gguf, gguf_type, force, ollama)
    loaded = [read_adapter(f) for f in folders]
    for adapter in loaded:
        check_mergeable(adapter["folder"], adapter["config"], adapter["plan"], into)
    base = base if base is not None else base_from_manifest(loaded[0])
    _refuse_overlap(out, base, folders)
    check_compatible(loaded)
    staging.mkdir()
    try:
        in_memory_base = hasattr(base, "named_parameters")
        base_config, source = (base.config, None) if in_memory_base else resolve_config(base)
        check_model_type(loaded[0], base_config)
        base_dir = None if in_memory_base else _local_base_dir(source)
        if gguf_path is not None:  # refused now, before any weight is merged or written
            check_gguf(base_config, base_dir, gguf_type, ollama)
        # Downstream, a base on disk is read from its folder: resolved once, here.
        base = base if in_memory_base or base_dir is None else base_dir
        # An adapter of expert tensors is streamed with the layout its Plan recorded (a plain peft one has none)
        streamable = (len(loaded) == 1 and method == "linear" and base_dir is not None
                      and not loaded[0]["config"].get("use_dora")
                      and (not loaded[0]["config"].get("target_parameters") or "targets" in loaded[0]["plan"]))
        if stream is True and not streamable:
            raise SpecError("this merge cannot be streamed",
                            hint="streaming needs one adapter, method linear, no DoRA, and a local safetensors base")
        task_config = _task_config(loaded[0], base_config)
        meta = build_from_config(task_config, meta=True)
        refuse_unmergeable(loaded, meta)
        if streamable and not names_line_up(base_dir, meta, loaded[0]):
            # The checkpoint stores tensors that transformers builds on load in ways the stream does not follow
            # (e.g. transposed experts): only from_pretrained can read it.
            if stream is True:
                raise SpecError("this merge cannot be streamed: the base checkpoint stores some weights in a layout "
                                "transformers converts while loading", hint="drop stream=True (--stream)")
            streamable = False
        if into == "dequantized" and not streamable:
            raise SpecError("--into dequantized needs the streamed path", hint="merge one adapter at a time")
        use_stream = streamable if stream is None else stream
        if verify:
            refuse_unchecked(use_stream, into, verify_logits)
        if use_stream:
            stats = merge_streamed(base_dir, loaded[0], staging, meta, task_config, dtype, into)
        else:
            stats = _in_memory(base, loaded, staging, task_config, weights, method, dtype)
        _copy_side_files(base_dir, loaded[0]["folder"], staging)
        figures = check_merge(base, loaded, staging, task_config, weights, method, dtype or stats["dtype"], into,
                              use_stream, base_dir, verify_logits) if verify else None
        exported = (export_gguf(staging, gguf_path, gguf_type, name=out.name, verify=verify, ollama=ollama)
                    if gguf_path is not None else None)
        report = {
            "base": str(base), "adapters": [{"path": str(a["folder"]), "sha256": a["sha256"]} for a in loaded],
            "method": method, "exactness": EXACTNESS[method] if len(loaded) > 1 else "exact (one adapter)",
            "weights": weights, "dtype": dtype or stats["dtype"], "into": into,
            "path": "streamed shard by shard" if use_stream else "peft merge_and_unload (whole model in memory)",
            "verification": figures, "wall_seconds": round(time.perf_counter() - started, 3),
            "peak_rss_bytes": _peak_rss(),
            "merged_layers": stats["merged_layers"], "gguf": exported, "versions": versions(),
        }
        write_json_atomic(staging / "merge_report.json", report)
        _publish(staging, out, old)
        return report
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _peak_rss() -> int | None:
    """This process's peak RSS where the platform tells it (the resource module is Unix-only)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _local_base_dir(source: Source) -> Path | None:
    """The folder holding the base's safetensors, or None when only from_pretrained can reach it."""
    if source.path:
        folder = Path(source.path)
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source.id, local_files_only=not hub_reachable(),
                                            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
        except Exception as exc:  # noqa: BLE001 - any Hub failure: the base is not available here
            raise LorakitError(f"cannot find the weights of {source.id} ({exc})",
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
    model = peft_model(base, loaded, task_config, weights, method)
    merged = model.merge_and_unload(safe_merge=True)
    target = torch_dtype(dtype)
    if target is not None:
        merged = merged.to(target)
    for name, param in merged.named_parameters():
        check_finite(name, param)
    merged.save_pretrained(str(staging), safe_serialization=True, max_shard_size="2GB")
    layers = len(loaded[0]["lora"])
    return {"dtype": str(next(merged.parameters()).dtype).removeprefix("torch."), "merged_layers": layers}


def _copy_side_files(base_dir: Path | None, adapter_dir: Path, staging: Path) -> None:
    """Tokenizer files (and chat template) from the adapter folder when it saved a tokenizer (it may have added
    tokens or changed the template), else from the base; never a mix of the two. Other side files: the base's."""
    from_adapter = (adapter_dir / "tokenizer_config.json").is_file()
    for name in _TOKENIZER_FILES:
        tokenizer_file = name not in ("generation_config.json", "preprocessor_config.json", "processor_config.json")
        folder = adapter_dir if from_adapter and tokenizer_file else base_dir
        if folder is not None and (folder / name).is_file() and not (staging / name).exists():
            shutil.copy2(folder / name, staging / name)


def _leftovers(out: Path) -> tuple[Path, Path]:
    """The staging and set-aside folders of a merge into `out`, fixed names beside it, and what a killed
    merge left there put right: a set-aside old output comes back if none replaced it, the rest goes."""
    staging, old = out.parent / f".{out.name}.lorakit-staging", out.parent / f".{out.name}.lorakit-old"
    if old.exists() and not out.exists():  # killed between moving the old output aside and publishing
        os.replace(old, out)
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    return staging, old


def _refuse_overlap(out: Path, base: Any, adapters: list[Path]) -> None:
    """An output that is, contains or lies inside an input would destroy it: refused, even with --force."""
    inputs = list(adapters)
    if isinstance(base, (str, os.PathLike)):
        text = str(base)
        inputs.append(package_path(text) if text.startswith("package:") else Path(text))
    target = out.resolve()
    for given in inputs:
        path = given.resolve()
        if target == path or path in target.parents or target in path.parents:
            raise LorakitError(f"the output {out} overlaps the input {given}: writing it would destroy the input",
                               hint="choose an output folder outside the base model and adapter folders")


def _publish(staging: Path, out: Path, old: Path) -> None:
    """Rename the finished folder into place; an existing output (allowed by --force) is set aside first
    and removed only after, so a kill in between leaves one complete folder to restore (`_leftovers`)."""
    if out.exists():
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
