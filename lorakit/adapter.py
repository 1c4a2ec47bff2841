"""The adapter format: peft's files, trained-in-full tensors, and a manifest.

A checkpoint folder holds
  adapter_config.json, adapter_model.safetensors   peft's own (PeftModel.from_pretrained loads them)
  lorakit_trained.safetensors                      base parameters trained in full outside peft, if any
  lorakit_manifest.json                            base id + fingerprint, specs, report, file hashes, versions
The manifest's fingerprint (parameter names and shapes, and a hash of a few
embedding values) lets `load_adapter` refuse a different base, and its file
hashes let resume refuse a truncated file, instead of training on garbage.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import LorakitError
from .files import write_json_atomic
from .specs import spec_dict

MANIFEST = "lorakit_manifest.json"
TRAINED = "lorakit_trained.safetensors"
_PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def peft_role(name: str) -> tuple[str, str]:
    """(role, name in the unwrapped base) of a parameter or module name of a peft-wrapped model.

    role is "lora" (adapter weights, named by the module they adapt), "copy" (a modules_to_save
    copy, named by the module it copies) or "base"."""
    stripped = name.removeprefix("base_model.model.")
    if "lora_" in stripped:
        return "lora", stripped.split(".lora_")[0]
    if ".modules_to_save." in stripped:
        return "copy", stripped.split(".modules_to_save")[0]
    return "base", stripped.replace(".base_layer", "").replace(".original_module", "")


def base_name(name: str) -> str | None:
    """A parameter's name in the unwrapped base model, or None for peft's own (LoRA, copies)."""
    role, original = peft_role(name)
    return original if role == "base" else None


def fingerprint(model: Any) -> dict:
    """What identifies a base: its parameter names and real shapes, and a few of its embedding values."""
    import math

    import torch

    lines, sample = [], None
    for name, param in model.named_parameters():
        original = base_name(name)
        if original is None:
            continue
        state = getattr(param, "quant_state", None)
        shape = tuple(state.shape) if state is not None else tuple(param.shape)
        lines.append(f"{original}:{shape}")
        # meta (and fake) tensors have shapes but no values: the memory simulator wraps those
        has_values = not param.is_meta and type(param).__name__ != "FakeTensor"
        if sample is None and has_values and param.is_floating_point() and "embed" in original \
                and math.prod(shape) >= 16:
            sample = param.detach().flatten()[:1024].to(torch.float32).cpu().numpy().tobytes()
    config = getattr(model, "config", None)
    return {"model_type": getattr(config, "model_type", type(model).__name__),
            "shapes_sha256": hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest(),
            "embedding_sample_sha256": hashlib.sha256(sample).hexdigest() if sample is not None else None}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trained_outside_peft(model: Any) -> dict:
    """Trainable base parameters that peft's adapter files do not hold (freeze-only training, or
    blocks left unfrozen beside LoRA), by their base names."""
    return {base_name(n): p.detach().contiguous().cpu() for n, p in model.named_parameters()
            if p.requires_grad and base_name(n) is not None}


def versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in ("lorakit", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def save_extras(model: Any, folder: str | Path) -> None:
    """Beside peft's files: the trained-in-full tensors and the manifest (written last, atomically)."""
    from safetensors.torch import save_file

    from .report import report

    folder = Path(folder)
    extra = trained_outside_peft(model)
    if extra:
        save_file(extra, str(folder / TRAINED), metadata={"format": "pt"})
    spec = getattr(model, "_lorakit", None) or {}
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir())
             if p.name in (*_PEFT_FILES, TRAINED)}
    try:
        totals = report(model).to_dict() if spec else None
    except LorakitError:
        totals = None
    manifest = {
        "format": "lorakit-adapter/1",
        "base": dict(spec.get("source") or {}, fingerprint=spec.get("fingerprint") or fingerprint(model)),
        "lora": spec_dict(spec.get("lora")), "freeze": spec_dict(spec.get("freeze")),
        "quant": spec_dict(spec.get("quant")), "preset": spec.get("preset"),
        "targets": spec.get("targets"), "trained_in_full": spec.get("trained_in_full"),
        "report": None if totals is None else {k: totals[k] for k in (
            "total_parameters", "trainable_parameters", "full_finetune_trainable_parameters", "lora_parameters",
            "memory")},
        "files": files, "versions": versions(),
    }
    manifest["base"].pop("missing_keys", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        # the task model's config (architectures, labels): a merge writes it, since the base
        # checkpoint may be a bare encoder (MiniLM is saved as BertModel)
        task_config = config.to_dict()
        task_config["architectures"] = [type(base).__name__]
        task_config.pop("quantization_config", None)
        manifest["config"] = task_config
    write_json_atomic(folder / MANIFEST, manifest)


def verify(folder: str | Path, model: Any | None = None) -> dict:
    """Check a checkpoint's files against its manifest (and its base against `model`); return the manifest."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise LorakitError(f"{folder} has no {MANIFEST}: it was not written by lorakit, or the save was cut off",
                           hint="use the last complete checkpoint (checkpoints are renamed into place "
                                "only when complete)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise LorakitError(f"{path} is corrupt (not JSON)", hint="use another checkpoint") from None
    for name, expected in manifest.get("files", {}).items():
        file = folder / name
        if not file.is_file():
            raise LorakitError(f"{file} is missing", hint="the checkpoint is incomplete; use another one")
        if sha256_file(file) != expected:
            raise LorakitError(f"{file} does not match its manifest hash: truncated or changed",
                               hint="refusing to train on it; use another checkpoint")
    if model is not None:
        check_base(manifest, model, folder)
    return manifest


def check_base(manifest: dict, model: Any, folder: Path) -> None:
    recorded = manifest.get("base", {}).get("fingerprint", {})
    current = fingerprint(model)
    base_id = manifest.get("base", {}).get("id", "unknown")
    if recorded.get("model_type") != current["model_type"]:
        raise LorakitError(f"{folder} was trained on a {recorded.get('model_type')} model ({base_id}), "
                           f"not on this {current['model_type']}", hint="load the base it was trained on")
    if recorded.get("shapes_sha256") != current["shapes_sha256"]:
        raise LorakitError(f"{folder} was trained on a base of other shapes ({base_id}): parameter names or "
                           "sizes differ", hint="load the base it was trained on (same size and head)")
    if recorded.get("embedding_sample_sha256") != current["embedding_sample_sha256"]:
        raise LorakitError(f"{folder} was trained on other base weights ({base_id}): same architecture, "
                           "different values", hint="load the exact base checkpoint it was trained on")


def load_trained(model: Any, folder: Path) -> None:
    """Copy lorakit_trained.safetensors into `model`; every key must exist with its shape."""
    import torch
    from safetensors.torch import load_file

    file = folder / TRAINED
    if not file.is_file():
        return
    tensors = load_file(str(file))
    params = {base_name(n): p for n, p in model.named_parameters() if base_name(n) is not None}
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise LorakitError(f"{file} holds {len(missing)} tensors this model lacks, e.g. {missing[0]}",
                           hint="load it onto the base it was trained on")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise LorakitError(f"{name}: checkpoint shape {tuple(value.shape)} != model's "
                                   f"{tuple(params[name].shape)}", hint="load it onto the base it was trained on")
            params[name].copy_(value)


def load_adapter(model: Any, folder: str | Path, *, is_trainable: bool = False) -> Any:
    """Put a lorakit adapter onto its base model, after checking files and base. Returns the model to use."""
    folder = Path(folder)
    manifest = verify(folder, model)
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel
        from safetensors import safe_open

        model = PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
            saved = set(handle.keys())
        from peft import get_peft_model_state_dict

        expected = set(get_peft_model_state_dict(model).keys())
        missing = sorted(expected - saved)
        if missing:
            raise LorakitError(f"{folder} lacks {len(missing)} adapter tensors, e.g. {missing[0]}",
                               hint="the adapter was saved from another model or is incomplete")
    load_trained(model, folder)
    model._lorakit_manifest = manifest
    return model
