"""The adapters a merge reads, as they are on disk (lorakit's or plain peft's), and what it refuses before any weight
is touched: adapters of other bases, of other modules, or on layers a merge cannot reproduce."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..adapter.format import MANIFEST, refuse_pickled, saved_plan, verify as verify_files
from ..core.errors import LorakitError, SpecError
from ..core.files import sha256_file
from ..plan.targeting import tied_layers
from ..spec.names import adapter_key
from ..spec.zoo import ruled_modules


def read_adapter(folder: Path) -> dict:
    """An adapter folder as a merge uses it: its config, manifest and Plan (None for plain peft's), its LoRA
    factors by the module they adapt, and the tensors of modules it trains in full, by their base names."""
    from safetensors import safe_open

    refuse_pickled(folder)
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
    lora: dict[str, dict] = {}  # adapted module -> {"lora_A": ..., "lora_B": ...}
    full = {}                   # base name -> tensor of a module trained in full
    for key, value in tensors.items():
        name, part = adapter_key(key)
        if part is None:
            # A bias trained with bias="all"/"lora_only" on a LoRA-wrapped module is saved under peft's
            # wrapper name (`query.base_layer.bias`); in the base it is `query.bias`.
            full[name.replace(".base_layer.", ".")] = value
        else:
            lora.setdefault(name, {})[part] = value
    return {"folder": folder, "config": config, "manifest": manifest, "plan": saved_plan(manifest), "lora": lora,
            "full": full, "sha256": sha256_file(weights)}


def base_from_manifest(adapter: dict) -> str:
    manifest = adapter["manifest"] or {}
    base = (manifest.get("base") or {}).get("id") or adapter["config"].get("base_model_name_or_path")
    if not base:
        raise SpecError(f"{adapter['folder']} does not name its base model", hint="pass --base MODEL")
    return base


def check_compatible(loaded: list[dict]) -> None:
    first = loaded[0]
    if len(loaded) > 1 and any(a["config"].get("target_parameters") for a in loaded):
        raise SpecError("peft's add_weighted_adapter cannot combine adapters of MoE expert tensors "
                        "(target_parameters)", hint="merge one adapter, then merge the next into that output: "
                                                    "the sum of their updates")
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


def refuse_unmergeable(loaded: list[dict], meta: Any) -> None:
    """Adapters plain peft puts where lorakit's Plan puts none, which a merge would not reproduce: on a weight
    several modules share (Zamba's shared block; an input embedding tied to the output layer), where peft applies
    the adapter at one use and a merge would change every use; on a layer whose weight the model reads directly
    (WavLM's attention, Mamba's dt_proj), where the adapter changed nothing in training and a merge would."""
    why = tied_layers(meta)
    why.update({name: rule.reason for name, rule in ruled_modules(meta).items() if not rule.lora})
    for adapter in loaded:
        first = {}  # one layer for each reason
        for module in sorted(m for m in adapter["lora"] if m in why):
            first.setdefault(why[module], module)
        if first:
            raise LorakitError(f"{adapter['folder']} adapts layers a merge cannot reproduce: " + "; ".join(
                f"{module}, which cannot be merged: {reason}" for reason, module in first.items()),
                hint="use it unmerged (lorakit.load_adapter), or train an adapter that leaves such layers out "
                     "(lorakit's Plan does)")


def check_model_type(adapter: dict, base_config: Any) -> None:
    recorded = (((adapter["manifest"] or {}).get("base") or {}).get("fingerprint") or {}).get("model_type")
    actual = base_config.model_type
    if recorded and recorded != actual:
        raise LorakitError(f"{adapter['folder']} was trained on a {recorded} model, but the base is a {actual}",
                           hint="pass the base it was trained on with --base")
