"""Verify a streamed merge module by module, never holding the model; the logits check where it fits.

Each tensor of the written checkpoint is read back beside the base tensor it came from, in blocks of
rows (a block of each file is mapped at a time). A LoRA target is checked on random probes x:
merged·x against base·x + scale·L(R·x), in float64, where L·R is the update in the tensor's own layout
(B·A for a Linear, its transpose for GPT-2's Conv1D and for an Embedding, peft's `get_delta_factors` for
expert tensors) and the factors and scales come from a peft model built on the meta device from the
adapter folder, not from lorakit's merge. Every other tensor must equal the base's (or the adapter's,
for a module trained in full) exactly, after the cast to the output dtype.

Tolerance: a right merge differs from the exact update only by rounding, elementwise at most
e = (u + u32)·|merged| + (r + 2)·u32·|scale|·|L|·|R| (u: half an ulp of the stored dtype, u32 of fp32,
where the merge adds; r: the rank). For a Gaussian probe drawn independently of the merge, row i of
e·x is normal with standard deviation ||e_i||, so a difference beyond SIGMAS of that bound is not
rounding. One weight off by a few ulps of fp32 is caught; in bf16 only what exceeds its rounding is.

The whole-model logits check (`verify.verify_merged`: two fp32 models) runs when the model's fp32
weights are at most LOGITS_CHECK_BYTES, or as `verify_logits` says.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from ..core.errors import LorakitError, SpecError
from ..model.tasks import build_from_config
from .streaming import CheckpointNames, shard_files
from .verify import peft_model, verify_merged

LOGITS_CHECK_BYTES = 768 * 2**20  # fp32 weights; the check holds about twice that (reference, then merged)
PROBES = 4
SIGMAS = 8.0
BLOCK_BYTES = 16 * 2**20  # float64 rows of one tensor held at a time


def check_merge(base: Any, loaded: list[dict], staging: Path, task_config: Any, weights: list[float] | None,
                method: str, dtype: str, into: str, streamed: bool, base_dir: Path | None,
                verify_logits: bool | None) -> dict:
    """The merge report's "verification": "modules" for a streamed merge, the logits figures when that check
    runs (as before, at the top level), and "logits_check" saying whether it ran and why."""
    modular = refuse_unchecked(streamed, into, verify_logits)
    figures: dict[str, Any] = {"modules": verify_modules(base_dir, loaded[0], staging, task_config)
                               if modular else None}
    fp32_bytes = 4 * sum(p.numel() for p in build_from_config(task_config, meta=True).parameters())
    if verify_logits is None:
        run, why = ((fp32_bytes <= LOGITS_CHECK_BYTES, f"{fp32_bytes / 2**20:.3g} MiB of fp32 weights vs a "
                     f"{LOGITS_CHECK_BYTES / 2**20:.0f} MiB budget") if modular
                    else (True, "the only check of this merge path"))
    else:
        run, why = verify_logits, "asked for (verify_logits)"
    figures["logits_check"] = ("ran: " if run else "skipped: ") + why
    if run:
        figures.update(verify_merged(base, loaded, staging, task_config, weights, method, dtype, into))
    return figures


def refuse_unchecked(streamed: bool, into: str, verify_logits: bool | None) -> bool:
    """Is the merge checked module by module? Without that, verify_logits=False would leave it unchecked:
    refused before anything is merged."""
    modular = streamed and into == "original"
    if verify_logits is False and not modular:
        raise SpecError("verify_logits=False leaves this merge unchecked: only a streamed merge into the original "
                        "weights is checked module by module", hint="drop verify_logits, or pass verify=False")
    return modular


def verify_modules(base_dir: Path, adapter: dict, staging: Path, task_config: Any) -> dict:
    """Every tensor of the merged checkpoint in `staging` against the base's in `base_dir` (see the module doc)."""
    import torch
    from safetensors import safe_open

    names = CheckpointNames(build_from_config(task_config, meta=True))
    targets = lora_updates(adapter, task_config)
    written = _weight_map(staging)
    full = adapter["full"]
    generator = torch.Generator().manual_seed(0)
    seen: set[str] = set()
    worst = {"ratio": 0.0, "tensor": None, "difference": 0.0}
    checked = 0
    for shard in shard_files(base_dir):
        with safe_open(str(base_dir / shard), "pt") as handle:
            keys = list(handle.keys())
        for key in keys:
            name, piece = names.map(key)
            if name is None:
                continue
            out_key = names.out_key(key, name) if isinstance(piece, tuple) else name
            if out_key not in written:
                raise _failed(f"{out_key} is missing from the merged checkpoint")
            seen.add(out_key)
            merged = (staging / written[out_key], out_key)
            source = (base_dir / shard, key)
            if name in targets:
                ratio, difference = _check_update(merged, source, targets[name], piece, generator)
                checked += 1
                if ratio > worst["ratio"]:
                    worst = {"ratio": ratio, "tensor": out_key, "difference": difference}
            else:
                _check_equal(merged, source, full.get(name))
    for name in set(full) - seen:  # modules the base lacked (a new head)
        _check_equal((staging / written[name], name), None, full[name])
        seen.add(name)
    extra = sorted(set(written) - seen)
    if extra:
        raise _failed(f"the merged checkpoint has tensors the base and adapter lack, e.g. {extra[0]}")
    return {"tensors": len(seen), "lora_tensors_probed": checked, "probes": PROBES, "sigmas": SIGMAS,
            "worst_ratio_to_tolerance": worst["ratio"], "worst_tensor": worst["tensor"],
            "worst_abs_difference": worst["difference"],
            "reference": "base + scale·L·R per tensor, factors and scales from peft; others equal the base's"}


def lora_updates(adapter: dict, task_config: Any) -> dict[str, tuple[Any, Any, float, int]]:
    """Task-model tensor name -> (L, R, scale, rank) with update = scale·L·R in the tensor's stored layout
    (experts: (E, d1, r) and (E, r, d2)), from peft's modules built on the meta device."""
    import torch
    from peft.tuners.lora import Embedding, LoraLayer, ParamWrapper
    from safetensors import safe_open

    with warnings.catch_warnings():  # the weights are read below: loading them into meta is meant to do nothing
        warnings.filterwarnings("ignore", message="for .*: copying from a non-meta parameter")
        model = peft_model(build_from_config(task_config, meta=True), [adapter], task_config, None, "linear")
    name = model.active_adapter
    prefix = "base_model.model."
    with safe_open(str(Path(adapter["folder"]) / "adapter_model.safetensors"), "pt") as handle:
        saved = {k: handle.get_tensor(k).double() for k in handle.keys()}
    updates = {}
    for path, module in model.named_modules():
        if not isinstance(module, LoraLayer) or name not in module.scaling:
            continue
        owner = path.removeprefix(prefix)
        scale = float(module.scaling[name])
        if isinstance(module, Embedding):  # A (r, vocab), B (dim, r); the weight (vocab, dim) gets (B·A)^T
            a, b = saved[f"{path}.lora_embedding_A"], saved[f"{path}.lora_embedding_B"]
            updates[f"{owner}.weight"] = (a.T, b.T, scale, a.shape[0])
            continue
        a, b = saved[f"{path}.lora_A.weight"], saved[f"{path}.lora_B.weight"]
        if isinstance(module, ParamWrapper):  # peft's own layout of an expert tensor's update
            module.lora_A[name].weight = torch.nn.Parameter(a, requires_grad=False)
            module.lora_B[name].weight = torch.nn.Parameter(b, requires_grad=False)
            left, right, scale = module.get_delta_factors(name)
            target = f"{owner.replace('.base_layer', '')}.{module.parameter_name}"
            updates[target] = (left.double(), right.double(), float(scale), right.shape[-2])
        elif a.dim() == 4:  # Conv2d: A has the kernel, B is 1x1
            if b.shape[2:] != (1, 1):
                raise SpecError(f"{owner}: a LoRA convolution with a {tuple(b.shape[2:])} B kernel cannot be "
                                "checked module by module", hint="pass verify_logits=True (--verify-logits)")
            updates[f"{owner}.weight"] = (b.flatten(1), a.flatten(1), scale, a.shape[0])
        elif module.fan_in_fan_out:  # Conv1D stores (in, out): the update is (B·A)^T
            updates[f"{owner}.weight"] = (a.T, b.T, scale, a.shape[0])
        else:
            updates[f"{owner}.weight"] = (b, a, scale, a.shape[0])
    return updates


def _weight_map(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    found = {}
    for shard in shard_files(folder):
        with safe_open(str(folder / shard), "pt") as handle:
            found.update(dict.fromkeys(handle.keys(), shard))
    return found


def _blocks(where: tuple[Path, str]) -> tuple[tuple, Any, int]:
    """(shape, dtype, rows per block) of a stored tensor."""
    from safetensors import safe_open

    with safe_open(str(where[0]), "pt") as handle:
        part = handle.get_slice(where[1])
        shape = tuple(part.get_shape())
        dtype = (part[0:1] if shape else handle.get_tensor(where[1])).dtype
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return shape, dtype, max(1, BLOCK_BYTES // (8 * row))


def _rows(where: tuple[Path, str], start: int, stop: int, expert: int | None = None) -> Any:
    """Rows start:stop (of one expert's matrix when `expert` is given) as a 2D tensor, mapping only them."""
    from safetensors import safe_open

    with safe_open(str(where[0]), "pt") as handle:
        part = handle.get_slice(where[1])
        rows = part[expert:expert + 1, start:stop][0] if expert is not None else part[start:stop]
    return rows.reshape(rows.shape[0], -1) if rows.dim() > 1 else rows


def _check_update(merged: tuple[Path, str], source: tuple[Path, str], update: tuple, piece: Any,
                  generator: Any) -> tuple[float, float]:
    """Probe a LoRA target block by block; returns (largest difference / tolerance, largest difference)."""
    import torch

    left, right, scale, rank = update
    shape, dtype, step = _blocks(merged)
    base_shape, _, _ = _blocks(source)
    if shape != base_shape:
        raise _failed(f"{merged[1]} has shape {shape} in the merged checkpoint but {base_shape} in the base")
    stored = _half_ulp(dtype)
    u32 = 2.0 ** -24
    experts = [None] if len(shape) != 3 else list(range(shape[0]))
    rows = shape[1] if len(shape) == 3 else shape[0]
    worst, largest = 0.0, 0.0
    for expert in experts:
        if isinstance(piece, tuple):  # one expert's rows part/parts of the fused tensor, stored as a Linear
            index, part, _ = piece
            lhs, rhs, offset = left[index], right[index], part * rows
        elif expert is not None:
            lhs, rhs, offset = left[expert], right[expert], 0
        else:
            lhs, rhs, offset = (left[0], right[0], 0) if left.dim() == 3 else (left, right, 0)
        width = rhs.shape[-1]
        probes = torch.randn(width, PROBES, generator=generator, dtype=torch.float64)
        right_x, right_norms = rhs @ probes, rhs.norm(dim=1)
        slop = 4 * width * 2.0 ** -53 * float(probes.norm(dim=0).max())
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            m = _rows(merged, start, stop, expert).double()
            w = _rows(source, start, stop, expert).double()
            l_rows = lhs[offset + start:offset + stop]
            if l_rows.shape[0] != m.shape[0] or rhs.shape[-1] != m.shape[1]:
                raise _failed(f"the adapter's update of {merged[1]} does not fit its shape {shape}")
            difference = (m @ probes - w @ probes - scale * (l_rows @ right_x)).abs()
            spread = abs(scale) * (l_rows.abs() @ right_norms)
            m_norm = m.norm(dim=1)
            bound = (stored + u32) * m_norm + (rank + 2) * u32 * spread
            tolerance = (SIGMAS * bound + slop * (m_norm + w.norm(dim=1) + spread) + 1e-300).unsqueeze(1)
            ratio = float((difference / tolerance).max())
            largest = max(largest, float(difference.max()))
            if ratio > 1:
                raise _failed(f"{merged[1]} differs from base + scale·B·A by {float(difference.max()):.3g} on a "
                              f"random probe (rounding allows {float(tolerance.min()):.3g} to "
                              f"{float(tolerance.max()):.3g})")
            worst = max(worst, ratio)
    return worst, largest


def _check_equal(merged: tuple[Path, str], source: tuple[Path, str] | None, trained: Any) -> None:
    """A tensor the merge does not change: bit for bit the base's (the adapter's when trained in full), cast to
    the stored dtype as the merge casts it (to the base's dtype first, then the output's)."""
    import torch

    shape, dtype, step = _blocks(merged)
    base_shape, base_dtype, _ = _blocks(source) if source is not None else (shape, dtype, 0)
    if trained is not None:
        base_shape = tuple(trained.shape)
    if shape != base_shape:
        raise _failed(f"{merged[1]} has shape {shape} in the merged checkpoint but {base_shape} in the base")
    if not shape:  # a scalar
        from safetensors import safe_open

        with safe_open(str(merged[0]), "pt") as handle:
            got = handle.get_tensor(merged[1])
        with safe_open(str(source[0]), "pt") as handle:
            want = handle.get_tensor(source[1]) if trained is None else trained
        same = torch.equal(got, want.to(got.dtype))
    else:
        same = True
        for start in range(0, shape[0], step):
            got = _rows(merged, start, min(shape[0], start + step))
            want = (_rows(source, start, min(shape[0], start + step)) if trained is None
                    else trained[start:start + step].reshape(got.shape).to(base_dtype))
            same = same and torch.equal(got, want.to(got.dtype))
            if not same:
                break
    if not same:
        raise _failed(f"{merged[1]} is not what it should be unchanged: the "
                      f"{'adapter' if trained is not None else 'base'}'s tensor")


def _half_ulp(dtype: Any) -> float:
    import torch

    return torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0


def _failed(what: str) -> LorakitError:
    return LorakitError(f"merge verification failed: {what}", hint="nothing was written; report this with the "
                                                                   "adapter and base")
