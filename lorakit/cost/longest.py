"""The longest context that fits: `lorakit fit MODEL --gpu-memory 80GiB --max-seq-len`.

For full fine-tuning, LoRA and QLoRA, at batch 1: the longest sequence whose simulated training step (reserved
memory + CUDA context, as `fit` counts it) fits, and the cheapest of LoraTrainer's levers that get there.

The search runs on the simulator (identical blocks extrapolated from 2 and 3 of them). With flash-style
attention, which holds no (S, S) tensor, a step's memory grows linearly with the sequence, so each next try is
where the line through the last two tries meets the budget (secant), kept between the longest length that fit
and the shortest that did not, until those are one `granularity` apart: three or four simulations. Then, at that
length, each lever is dropped in turn, the most expensive first, where the step still fits without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import LorakitError
from ..spec.specs import Lora, Quant
from . import per_gpu
from .ladder import LADDER, METHODS, applies, lever_settings, ran, training_args_for
from .simulate import simulate

GRANULARITY = 1024  # tokens: the answer is a multiple of it
LONGEST_TRIED = 1 << 22  # 4M tokens: where the search stops growing


@dataclass
class Longest:
    """For one method: the longest sequence that fits (0: not even `GRANULARITY` tokens), with what."""
    method: str
    seq_len: int
    levers: list[str]
    device_bytes: int              # reserved + CUDA context, at seq_len
    peak_allocated: int
    peak_phase: str
    peak_module: str
    host_bytes: int                # offloaded activations in host memory
    training_args: dict
    tried: list[dict] = field(default_factory=list)   # every simulation: seq_len, levers, device_bytes


def longest(model: Any, gpu_memory: int, *, lora: Lora | None = None, quant: Quant | None = None,
            attn: str = "sdpa", optimizer: str = "adamw", task: str | None = None, dtype: str | None = None,
            trust_remote_code: bool = False, methods: tuple = METHODS, quant_path: str = "load",
            progress: Any = None, gpus: int = 1, shard: str | None = None,
            levers: tuple[str, ...] | None = None) -> list[Longest]:
    """See the module docstring. `gpus`, `shard`: per GPU of several training together (batch 1 each).
    `levers`: only these rungs of the ladder (default: every one that applies), e.g. ("checkpointing",) for
    a plain recipe to compare with."""
    per_gpu.check(gpus, shard)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LorakitError(f"unknown method {unknown[0]!r}", hint=f"use {', '.join(METHODS)}")
    lora = lora or Lora(r=16, targets="all-linear")
    quant = quant or Quant(bits=4, compute_dtype="bfloat16")
    specs = {"full": {}, "lora": {"lora": lora}, "qlora": {"lora": lora, "quant": quant, "quant_path": quant_path}}
    common = dict(model=model, task=task, dtype=dtype, attn=attn, optimizer=optimizer, batch_size=1,
                  trust_remote_code=trust_remote_code, gpus=gpus, shard=shard)
    every = [r for r in LADDER[1:] if applies(r, optimizer, shard) and (levers is None or r in levers)]  # as fit
    return [_longest(method, specs[method], gpu_memory, every, common, progress, per_gpu.training_keywords(shard))
            for method in methods]


def _longest(method: str, spec: dict, limit: int, every: list[str], common: dict, progress: Any,
             shard_args: dict) -> Longest:
    tried: list[dict] = []
    runs: dict[tuple, Any] = {}

    def run(seq_len: int, levers: list[str]) -> Any:
        key = (seq_len, tuple(levers))
        if key not in runs:
            if progress is not None:
                progress(f"{method}: sequence {seq_len:,}, {' + '.join(levers) or 'no lever'}")
            settings = dict(common, **spec, seq_len=seq_len, **lever_settings(levers))
            result = simulate(settings.pop("model"), **settings)
            runs[key] = result
            tried.append({"seq_len": seq_len, "levers": list(levers), "device_bytes": result.device_total})
        return runs[key]

    def fits(seq_len: int, levers: list[str]) -> bool:
        return run(seq_len, levers).device_total <= limit

    levers = [r for r in every if ran(r, run(GRANULARITY, every).settings)]
    if not fits(GRANULARITY, levers):
        return _answer(method, 0, levers, run(GRANULARITY, levers), tried, shard_args)
    good, bad = GRANULARITY, None
    points = [(GRANULARITY, run(GRANULARITY, levers).device_total)]
    while bad is None or bad - good > GRANULARITY:
        if len(points) == 1:  # a second point far enough away to show the slope
            guess = 32 * GRANULARITY
        else:
            (s1, d1), (s2, d2) = points[-2], points[-1]
            slope = (d2 - d1) / (s2 - s1)
            guess = s2 + (limit - d2) / slope if slope > 0 else 8 * good
        upper = bad - GRANULARITY if bad is not None else LONGEST_TRIED
        nxt = min(max(GRANULARITY * math.floor(guess / GRANULARITY), good + GRANULARITY), upper)
        if nxt <= good or nxt in (p[0] for p in points):  # the line lands where a try was: halve the gap
            nxt = GRANULARITY * ((good + (bad or 2 * good)) // (2 * GRANULARITY))
            if nxt <= good:
                break
        points.append((nxt, run(nxt, levers).device_total))
        if points[-1][1] <= limit:
            good = nxt
        else:
            bad = nxt
        if bad is None and good >= LONGEST_TRIED:
            break
    for rung in reversed(levers):  # the cheapest levers that still get there: the dearest dropped first
        fewer = [r for r in levers if r != rung]
        if rung == "chunked loss" or rung == "checkpointing" and "activation offload" in fewer:
            continue  # free; or needed by the offload
        if fits(good, fewer):
            levers = fewer
    return _answer(method, good, levers, run(good, levers), tried, shard_args)


def _answer(method: str, seq_len: int, levers: list[str], result: Any, tried: list[dict], shard_args: dict) -> Longest:
    return Longest(method, seq_len, levers if seq_len else [], result.device_total, result.peak_allocated,
                   result.peak_phase, result.peak_module, result.host_peak,
                   dict(training_args_for(levers, 1, 1), **shard_args) if seq_len else {}, tried)


def render_longest(answers: list[Longest], model: str, gpu_memory: int, gpus: int = 1,
                   shard: str | None = None) -> str:
    gib = 2**30
    where = "a GPU" if gpus == 1 and shard is None else f"each of {gpus} GPUs ({per_gpu.how(shard)})"
    lines = [f"{model} on {where} with {gpu_memory / gib:.1f} GiB: the longest sequence that fits, batch 1 "
             "(simulated: device memory = reserved + CUDA context)",
             f"{'method':7s} {'longest':>9s} {'device':>10s} {'on host':>9s}  levers (the cheapest that get there); "
             "peak"]
    for a in answers:
        host = f"{a.host_bytes / gib:.1f} GiB" if a.host_bytes else "-"
        if not a.seq_len:
            lines.append(f"{a.method:7s} {'none':>9s} {a.device_bytes / gib:6.2f} GiB {host:>9s}  not even "
                         f"{GRANULARITY:,} tokens with every lever")
            continue
        lines.append(f"{a.method:7s} {a.seq_len:>9,} {a.device_bytes / gib:6.2f} GiB {host:>9s}  "
                     f"{' + '.join(a.levers) or 'none needed'}; {a.peak_phase} in {a.peak_module}")
    return "\n".join(lines) + "\n"
