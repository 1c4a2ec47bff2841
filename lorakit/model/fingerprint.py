"""A base model's identity, for an adapter's manifest to check against: names, real shapes and a few embedding
values, the same on every rank of a sharded model (a parameter gathered in full where it is sharded)."""

from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Any

from ..spec.names import adaptable_kind, base_name, shape_of


def fingerprint(model: Any, conv1d_as_stored: bool = False) -> dict:
    """What identifies a base: its parameter names and real shapes, and a few of its embedding values
    (left out on the meta device, where there are none). A sharded model (FSDP2, ZeRO-3) gives the same
    fingerprint as the whole one, on every rank: its full shapes, and the sample gathered in full (every
    rank meets the same parameter first, so all take part in that one gather). A Conv1D weight (GPT-2's, stored
    (in, out)) counts as (out, in), as bitsandbytes stores it once quantized: one base, loaded in full precision
    or in 8/4 bits, has one fingerprint. `conv1d_as_stored`: the fingerprint manifests recorded before that."""
    import torch

    lines, sample = [], None
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        original = base_name(name)
        if original is None:
            continue
        # a sharded 4-bit weight (FSDP2's DTensor) lost its quant state; bitsandbytes keeps it on the module
        path, _, kind = name.rpartition(".")
        state = getattr(param, "quant_state", None) or (getattr(modules[path], "quant_state", None)
                                                        if kind == "weight" else None)
        shape = tuple(state.shape) if state is not None else shape_of(param)
        if kind == "weight" and adaptable_kind(modules[path]) == "Conv1D" and not conv1d_as_stored:
            shape = shape[::-1]
        lines.append(f"{original}:{shape}")
        has_values = not param.is_meta and type(param).__name__ != "FakeTensor"  # the memory simulator's
        if (sample is None and param.is_floating_point() and has_values and "embed" in original
                and math.prod(shape) >= 16):
            sample = full_value(param).flatten()[:1024].to(torch.float32).cpu().numpy().tobytes()
    config = getattr(model, "config", None)
    return {"model_type": getattr(config, "model_type", type(model).__name__),
            "shapes_sha256": hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest(),
            "embedding_sample_sha256": hashlib.sha256(sample).hexdigest() if sample is not None else None}


def full_value(param: Any) -> Any:
    """A parameter's full value on every rank; a collective for a DTensor (FSDP2) or a ZeRO-3 parameter, so
    every rank must ask for the same parameters in the same order."""
    if type(param).__name__ == "DTensor" or hasattr(param, "device_mesh"):
        return param.full_tensor().detach()
    if hasattr(param, "ds_id"):
        with gathered([param]):
            return param.detach().clone()
    return param.detach()


def gathered(params: list[Any]) -> Any:
    """A block within which ZeRO-3 parameters among `params` are whole (DeepSpeed's GatheredParameters, a
    collective); nothing to do for any other parameter."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)
