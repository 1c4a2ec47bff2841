"""`lorakit fit`: which of full fine-tuning, LoRA and QLoRA fit on a GPU, and the largest batch for each.

Every answer is a simulated training run (`lorakit.simulate`), compared against
the GPU's memory as nvidia-smi counts it: the caching allocator's reserved
segments plus the CUDA context. The largest batch is found by bisection over
simulated runs; the first two batch sizes give a straight-line guess (memory
grows linearly with batch at a fixed sequence) that narrows the bracket.

Also here: the `LoraTrainer` callback that, on CUDA, compares the prediction
with `torch.cuda.max_memory_allocated()` after the first optimizer step.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any

from .errors import LorakitError
from .materialise import QUANT_PATHS
from .simulate import Simulation, simulate
from .specs import Lora, Quant
from .state import state_of

logger = logging.getLogger("lorakit")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MAX_BATCH = 4096
METHODS = ("full", "lora", "qlora")


def parse_memory(text: str) -> int:
    """'24GiB', '80 GB', '81920MiB', '24' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise LorakitError(f"cannot read a memory size from {text!r}",
                           hint="write it like 24GiB, 80GB or 40960MiB (a bare number means GiB)")
    return int(float(match.group(1)) * (_UNITS[unit] if unit else 2**30))


@dataclass
class FitRow:
    method: str                    # full | lora | qlora
    gradient_checkpointing: bool
    fits_batch_1: bool
    device_bytes_batch_1: int      # reserved + CUDA context at batch 1
    peak_allocated_batch_1: int
    largest_batch: int             # 0 when batch 1 does not fit
    device_bytes_largest: int | None


def fit(model: Any, gpu_memory: int | str, *, seq_len: int = 2048, lora: Lora | None = None,
        quant: Quant | None = None, attn: str = "sdpa", optimizer: str = "adamw", task: str | None = None,
        dtype: str | None = None, trust_remote_code: bool = False, methods: tuple = METHODS,
        checkpointing: tuple = (False, True), quant_path: str = "load", progress: Any = None) -> list[FitRow]:
    """Full fine-tuning, LoRA and QLoRA (4-bit), each without and with gradient checkpointing. QLoRA's model
    is loaded as `quant_path` says (see `simulate`): by default quantized while it loads. `progress`, if given,
    is called with a short line before each simulated run."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LorakitError(f"unknown method {unknown[0]!r}", hint=f"use {', '.join(METHODS)}")
    limit = parse_memory(gpu_memory) if isinstance(gpu_memory, str) else int(gpu_memory)
    lora = lora or Lora(r=16, targets="all-linear")
    quant = quant or Quant(bits=4, compute_dtype="bfloat16")
    specs = {"full": {}, "lora": {"lora": lora}, "qlora": {"lora": lora, "quant": quant, "quant_path": quant_path}}
    rows = []
    for method in methods:
        for on in checkpointing:
            def run(batch: int, spec: dict = specs[method], on: bool = on, method: str = method) -> Simulation:
                if progress is not None:
                    progress(f"{method}, checkpointing {'on' if on else 'off'}, batch {batch}")
                return simulate(model, task=task, dtype=dtype, attn=attn, optimizer=optimizer, batch_size=batch,
                                seq_len=seq_len, gradient_checkpointing=on, trust_remote_code=trust_remote_code,
                                **spec)
            rows.append(_row(method, on, run, limit))
    return rows


def _row(method: str, checkpointing: bool, run: Any, limit: int) -> FitRow:
    one = run(1)
    row = FitRow(method, checkpointing, one.device_total <= limit, one.device_total, one.peak_allocated, 0, None)
    if not row.fits_batch_1:
        return row
    two = run(2)
    if two.device_total > limit:
        row.largest_batch, row.device_bytes_largest = 1, one.device_total
        return row
    slope = max(two.device_total - one.device_total, 1)
    guess = min(MAX_BATCH, max(2, 1 + (limit - one.device_total) // slope))
    good, good_bytes, bad = 2, two.device_total, MAX_BATCH + 1
    for probe in (guess, guess + 1):  # the guess, then one past it: usually the whole bracket
        if good < probe < bad:
            total = run(probe).device_total
            if total <= limit:
                good, good_bytes = probe, total
            else:
                bad = probe
    if bad == MAX_BATCH + 1 and good < MAX_BATCH:
        bad = min(MAX_BATCH + 1, good * 2)
        while bad <= MAX_BATCH and run(bad).device_total <= limit:
            good, bad = bad, min(MAX_BATCH + 1, bad * 2)
    while bad - good > 1:  # bisection
        middle = (good + bad) // 2
        total = run(middle).device_total
        if total <= limit:
            good, good_bytes = middle, total
        else:
            bad = middle
    row.largest_batch, row.device_bytes_largest = good, good_bytes
    return row


def render_fit(rows: list[FitRow], model: str, gpu_memory: int, seq_len: int, quant_path: str = "load") -> str:
    gib = 2**30
    lines = [f"{model} on a GPU with {gpu_memory / gib:.1f} GiB, sequence {seq_len} "
             "(device memory = simulated reserved + CUDA context)"]
    if any(r.method == "qlora" for r in rows):
        lines.append(f"QLoRA's model: {QUANT_PATHS[quant_path]}")
    lines += [
             f"{'method':8s} {'checkpointing':13s} {'batch 1':>10s} {'fits':>5s} {'largest batch':>14s} {'at':>10s}"]
    for r in rows:
        at = f"{r.device_bytes_largest / gib:.2f} GiB" if r.device_bytes_largest else "-"
        lines.append(f"{r.method:8s} {'on' if r.gradient_checkpointing else 'off':13s} "
                     f"{r.device_bytes_batch_1 / gib:6.2f} GiB {'yes' if r.fits_batch_1 else 'no':>5s} "
                     f"{r.largest_batch:>14d} {at:>10s}")
    return "\n".join(lines) + "\n"


def rows_json(rows: list[FitRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def memory_check_callback() -> Any:
    """A TrainerCallback: on CUDA, after the first optimizer step, log the simulated peak beside
    torch.cuda.max_memory_allocated() and warn when they differ by more than 10%."""
    from transformers import TrainerCallback

    class MemoryCheck(TrainerCallback):
        def __init__(self) -> None:
            self.shape: tuple | None = None
            self.handle = None

        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            import torch

            if not torch.cuda.is_available() or model is None:
                return

            def record(module: Any, positional: tuple, named: dict) -> None:
                ids = named.get("input_ids", positional[0] if positional else None)
                if self.shape is None and hasattr(ids, "shape") and ids.dim() == 2:
                    self.shape = tuple(ids.shape)
            self.handle = model.register_forward_pre_hook(record, with_kwargs=True)

        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if self.handle is None:
                return
            self.handle.remove()
            self.handle = None
            if self.shape is None or state.global_step != 1:
                return
            _compare(model, args, self.shape)

    return MemoryCheck()


def _compare(model: Any, args: Any, shape: tuple) -> None:
    import torch

    state = state_of(model)
    plan = state.plan if state else None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        predicted = simulate(base, lora=plan and plan.lora, freeze=plan and plan.freeze,
                             quant=plan and plan.quant, batch_size=shape[0], seq_len=shape[1], steps=1,
                             attn=_attention_name(getattr(base.config, "_attn_implementation", None)),
                             gradient_checkpointing=bool(args.gradient_checkpointing),
                             autocast="bfloat16" if args.bf16 else "float16" if args.fp16 else None)
    except Exception as exc:  # a check must never stop training
        logger.info(f"memory check skipped: {getattr(exc, 'message', exc)}")
        return
    measured = torch.cuda.max_memory_allocated()
    logger.info(f"peak memory after step 1: measured {measured / 2**30:.2f} GiB, simulated "
                f"{predicted.peak_allocated / 2**30:.2f} GiB")
    if measured and abs(predicted.peak_allocated / measured - 1) > 0.10:
        logger.warning(f"the simulated peak ({predicted.peak_allocated / 2**30:.2f} GiB) differs from the measured "
                       f"one ({measured / 2**30:.2f} GiB) by more than 10%; please report it to lorakit")


def _attention_name(implementation: str | None) -> str:
    if implementation and "flash" in implementation:
        return "flash"
    return implementation if implementation in ("sdpa", "eager") else "sdpa"
