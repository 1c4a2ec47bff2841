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

import json
import warnings
from pathlib import Path
from typing import Any

from ..core.errors import LorakitError
from ..core.files import atomic_path, sha256_file, write_json_atomic
from ..cost.report import report
from ..model.fingerprint import fingerprint
from ..model.wrap import quiet_peft, written_by_lorakit
from ..plan.state import state_of
from ..spec.names import base_name
from ..spec.specs import REWRITES_BASE

FORMAT = "lorakit-adapter/2"
MANIFEST = "lorakit_manifest.json"
TRAINED = "lorakit_trained.safetensors"
_PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")


def trained_outside_peft(model: Any, tensors: dict | None = None) -> dict:
    """Trainable base parameters that peft's adapter files do not hold (freeze-only training, or
    blocks left unfrozen beside LoRA), by their base names; their values from `tensors` (by parameter name,
    gathered from a sharded model) where given."""
    return {base_name(n): (p if tensors is None else tensors[n]).detach().contiguous().cpu()
            for n, p in model.named_parameters() if p.requires_grad and base_name(n) is not None}


def versions() -> dict:
    import importlib.metadata as md

    found = {}
    for name in ("lorakit", "torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def save_extras(model: Any, folder: str | Path, tensors: dict | None = None) -> None:
    """Beside peft's files: the trained-in-full tensors and the manifest (written last, atomically).
    peft records the base by its local path; lorakit puts the portable id in its place. `tensors`: the
    trained values gathered from a sharded model (`sharding.gather_trainable`), by parameter name."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = state_of(model)
    extra = trained_outside_peft(model, tensors)
    if extra:
        with atomic_path(folder / TRAINED) as tmp:
            save_file(extra, tmp, metadata={"format": "pt"})
    else:  # an earlier save into this folder must not be hashed and loaded as this one's
        (folder / TRAINED).unlink(missing_ok=True)
    peft_config = folder / "adapter_config.json"
    if state is not None and state.source is not None and peft_config.is_file():
        data = json.loads(peft_config.read_text())
        data["base_model_name_or_path"] = state.source.id
        write_json_atomic(peft_config, data)
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.name in (*_PEFT_FILES, TRAINED)}
    try:
        totals = report(model).to_dict() if state else None
    except LorakitError:
        totals = None
    source = state.source.to_dict() if state and state.source else {}
    manifest = {
        "format": FORMAT,
        "base": dict(source, fingerprint=state.fingerprint if state else fingerprint(model)),
        "plan": state.plan.to_dict() if state else None,
        "report": None if totals is None else {k: totals[k] for k in (
            "total_parameters", "trainable_parameters", "full_finetune_trainable_parameters", "lora_parameters",
            "memory")},
        "files": files, "versions": versions(),
    }
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        # the task model's config (architectures, labels): a merge writes it, since the base
        # checkpoint may be a bare encoder (MiniLM is saved as BertModel)
        task_config = config.to_dict()
        task_config["architectures"] = [type(base).__name__]
        task_config.pop("quantization_config", None)
        task_config["_name_or_path"] = source.get("id", "")
        manifest["config"] = task_config
    write_json_atomic(folder / MANIFEST, manifest)


def saved_plan(manifest: dict | None) -> dict:
    """The Plan saved with an adapter, as a dict (`Plan.to_dict`); adapters saved before the Plan existed
    (format 1) carry its spec fields at the top level."""
    manifest = manifest or {}
    if manifest.get("plan"):
        return manifest["plan"]
    return {k: manifest.get(k) for k in ("lora", "freeze", "quant", "preset", "trained_in_full")}


def refuse_pickled(folder: Path) -> None:
    """peft falls back to adapter_model.bin (a pickle); lorakit reads safetensors only."""
    if (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").is_file():
        raise LorakitError(f"{folder} holds adapter_model.bin, a pickle file; lorakit never unpickles",
                           hint="if you trust it, convert it once: PeftModel.from_pretrained(base, folder)"
                                ".save_pretrained(new_folder) writes adapter_model.safetensors")


def check_mergeable(folder: Path, config: dict, plan: dict | None, into: str) -> None:
    """Refuse adapters whose weights go with other base weights than those they would be merged into."""
    init = str(config.get("init_lora_weights", True))
    if init.startswith(REWRITES_BASE):  # also peft's own variants, e.g. pissa_niter_16
        raise LorakitError(f"{folder} is a {init} adapter in peft's unconverted form: its weights go with the "
                           "base as that initialisation rewrote it, not with the original base",
                           hint="save it with LoraTrainer's save_model() (it converts), or with peft's "
                                "save_pretrained(..., path_initial_model_for_weight_conversion=...)")
    if into == "original" and ((plan or {}).get("lora") or {}).get("init") == "loftq":
        raise LorakitError(f"{folder} was initialised by LoftQ to make up for the 4-bit base's rounding; merged "
                           "into the original weights it would add that correction twice",
                           hint="merge into the weights it was trained on: into='dequantized' (--into dequantized)")


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
    if recorded.get("shapes_sha256") != current["shapes_sha256"] and recorded.get("shapes_sha256") != fingerprint(
            model, conv1d_as_stored=True)["shapes_sha256"]:  # earlier manifests recorded Conv1D weights as stored
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
    """Put an adapter onto its base model, after checking files and base. Returns the model to use
    (a `peft.PeftModel` for a LoRA adapter). An adapter plain peft saved (no lorakit manifest) loads as peft
    loads it; with no fingerprint to compare, its base is checked by peft's shapes only."""
    folder = Path(folder)
    refuse_pickled(folder)
    plain_peft = (folder / "adapter_config.json").is_file() and not (folder / MANIFEST).is_file()
    manifest = None if plain_peft else verify(folder, model)
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel
        from safetensors import safe_open

        try:
            with quiet_peft(as_written=written_by_lorakit(saved_plan(manifest))):
                model = PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
        except (RuntimeError, ValueError, KeyError) as exc:  # peft's size mismatch, missing module, bad file
            raise LorakitError(f"{folder} does not load onto this {type(model).__name__}: "
                               f"{str(exc).splitlines()[0][:300]}",
                               hint="load it onto the base it was trained on") from None
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
            saved = set(handle.keys())
        from peft import get_peft_model_state_dict

        # the saved base id may be portable ("package:..."), which peft cannot look up; on this machine the
        # base is the model in hand, whose name peft can read if the adapter is saved again
        for config in model.peft_config.values():
            config.base_model_name_or_path = getattr(model.get_base_model(), "name_or_path", None)
        expected = set(get_peft_model_state_dict(model, save_embedding_layers=False).keys())
        missing = sorted(expected - saved)
        if missing:
            raise LorakitError(f"{folder} lacks {len(missing)} adapter tensors, e.g. {missing[0]}",
                               hint="the adapter was saved from another model or is incomplete")
    load_trained(model, folder)
    return model


def convert_to_plain_lora(model: Any, folder: str, initial_adapter: str, is_main_process: bool) -> None:
    """Re-save a PiSSA/OLoRA adapter through peft's `path_initial_model_for_weight_conversion`. peft's
    conversion keeps only lora_A/lora_B: heads (modules_to_save) and trained biases are put back from the
    adapter just saved, and its reload of the initial adapter must not change what trains."""
    from safetensors.torch import load_file, save_file

    weights = Path(folder) / "adapter_model.safetensors"
    kept = {k: v for k, v in load_file(str(weights)).items() if "lora_A" not in k and "lora_B" not in k}
    trains = {name: p.requires_grad for name, p in model.named_parameters()}
    with warnings.catch_warnings():  # peft's advice to convert, given while it converts
        warnings.filterwarnings("ignore", message=".* changes the base weights")
        model.save_pretrained(folder, is_main_process=is_main_process,
                              path_initial_model_for_weight_conversion=initial_adapter)
    for name, param in model.named_parameters():
        param.requires_grad_(trains.get(name, False))
    if is_main_process and kept:
        with atomic_path(weights) as tmp:
            save_file({**load_file(str(weights)), **kept}, tmp, metadata={"format": "pt"})
