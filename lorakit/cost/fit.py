"""`lorakit fit`: for full fine-tuning, LoRA and QLoRA, the configuration that fits a GPU with the least extra
compute.

Every answer is a simulated training run (`lorakit.cost.simulate`), compared against
the GPU's memory as nvidia-smi counts it: the caching allocator's reserved
segments plus the CUDA context. The levers are tried cheapest first (`LADDER`):
the chunked loss costs nothing, checkpointing recomputes the forward (its FLOPs
are counted), offload moves the checkpointed inputs to the host and back, the
8-bit optimizer changes the optimizer's numerics; last, a smaller micro-batch
with gradient accumulation, which keeps the FLOPs but loses parallelism.

Also here: the `LoraTrainer` callback that, on CUDA, compares the prediction
with `torch.cuda.max_memory_allocated()` after the first optimizer step.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import Any

from ..core.errors import LorakitError
from ..plan.state import state_of
from ..spec.specs import Lora, Quant
from . import per_gpu
from . import sharding
from .materialise import QUANT_PATHS
from .ladder import LADDER, METHODS, applies, lever_settings, ran, training_args_for
from .longest import longest
from .simulate import Simulation, simulate

logger = logging.getLogger("lorakit")
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """'24GiB', '80 GB', '81920MiB', '24' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise LorakitError(f"cannot read a memory size from {text!r}",
                           hint="write it like 24GiB, 80GB or 40960MiB (a bare number means GiB)")
    return int(float(match.group(1)) * (_UNITS[unit] if unit else 2**30))


@dataclass
class Choice:
    """For one method: the first configuration on the ladder that fits, or the closest miss (fits False)."""
    method: str                    # full | lora | qlora
    fits: bool
    levers: list[str]              # the rungs taken (without "none")
    micro_batch: int
    accumulation: int              # gradient_accumulation_steps (micro_batch x accumulation x GPUs = global batch)
    device_bytes: int              # reserved + CUDA context
    peak_allocated: int
    step_flops: int                # one micro-batch step, recomputation included
    extra_compute: float           # step_flops over the plain step's, minus 1
    host_bytes: int                # offloaded activations in host memory
    training_args: dict            # lorakit.training_args keywords for this configuration
    tried: list[dict]              # every configuration simulated, in order


def fit(model: Any, gpu_memory: int | str, *, seq_len: int = 2048, global_batch: int = 1, lora: Lora | None = None,
        quant: Quant | None = None, attn: str = "sdpa", optimizer: str = "adamw", task: str | None = None,
        dtype: str | None = None, trust_remote_code: bool = False, methods: tuple = METHODS,
        quant_path: str = "load", progress: Any = None, gpus: int = 1, shard: str | None = None,
        max_seq_len: bool = False) -> list[Any]:
    """For full fine-tuning, LoRA and QLoRA (4-bit): the configuration that fits `gpu_memory` with the least
    extra compute, climbing `LADDER` at micro-batch `global_batch`; then, with every lever on, smaller
    micro-batches (divisors of the global batch, at most half the last; gradient accumulation makes up the
    rest) until one fits, and at that micro-batch the levers it no longer needs are dropped from the top.
    QLoRA's model is loaded as `quant_path` says (see `simulate`). `progress`, if given, is called with a short
    line before each simulated run. `gpus`, `shard`: what fits on each of `gpus` GPUs training together (data
    parallel, FSDP2 with shard="fsdp", DeepSpeed with "zero2" / "zero3"), each taking `global_batch / gpus` of
    the global batch.
    `max_seq_len`: instead, the longest sequence that fits at batch 1 for each method, with the cheapest levers
    that get there (`lorakit.cost.longest`: a list of `Longest`)."""
    if max_seq_len:
        if global_batch != 1:
            raise LorakitError("the longest context is found at batch 1", hint="drop --global-batch")
        limit = parse_memory(gpu_memory) if isinstance(gpu_memory, str) else int(gpu_memory)
        return longest(model, limit, lora=lora, quant=quant, attn=attn, optimizer=optimizer, task=task, dtype=dtype,
                       trust_remote_code=trust_remote_code, methods=methods, quant_path=quant_path,
                       progress=progress, gpus=gpus, shard=shard)
    per_gpu.check(gpus, shard)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise LorakitError(f"unknown method {unknown[0]!r}", hint=f"use {', '.join(METHODS)}")
    if not isinstance(global_batch, int) or isinstance(global_batch, bool) or global_batch < 1:
        raise LorakitError(f"global batch must be a positive whole number, got {global_batch!r}",
                           hint="e.g. --global-batch 32 (micro-batch x gradient accumulation x GPUs)")
    if global_batch % gpus:
        raise LorakitError(f"a global batch of {global_batch} does not split over {gpus} GPUs",
                           hint=f"give a multiple of {gpus}: micro-batch x gradient accumulation x GPUs")
    limit = parse_memory(gpu_memory) if isinstance(gpu_memory, str) else int(gpu_memory)
    lora = lora or Lora(r=16, targets="all-linear")
    quant = quant or Quant(bits=4, compute_dtype="bfloat16")
    specs = {"full": {}, "lora": {"lora": lora}, "qlora": {"lora": lora, "quant": quant, "quant_path": quant_path}}
    shard_args = per_gpu.training_keywords(shard)
    return [_choose(method, specs[method], limit, global_batch // gpus, progress,
                    dict(model=model, task=task, dtype=dtype, attn=attn, optimizer=optimizer, seq_len=seq_len,
                         trust_remote_code=trust_remote_code, gpus=gpus, shard=shard), shard_args)
            for method in methods]


def _choose(method: str, spec: dict, limit: int, global_batch: int, progress: Any, common: dict,
            shard_args: dict) -> Choice:
    """`global_batch`: this GPU's share of it."""
    tried: list[dict] = []

    def run(levers: list[str], micro: int) -> Simulation:
        settings = dict(common, **spec, batch_size=micro, count_flops=True, **lever_settings(levers))
        if progress is not None:
            progress(f"{method}: {' + '.join(levers) or 'no lever'}, micro-batch {micro}")
        result = simulate(settings.pop("model"), **settings)
        tried.append({"levers": list(levers), "micro_batch": micro, "device_bytes": result.device_total,
                      "peak_allocated": result.peak_allocated, "step_flops": result.step_flops,
                      "chunked_loss": result.settings["chunked_loss"]})
        return result

    plain = result = run([], global_batch)
    levers: list[str] = []
    for rung in LADDER[1:]:
        if result.device_total <= limit:
            break
        if not applies(rung, common["optimizer"], common["shard"]):
            continue
        levers.append(rung)
        result = run(levers, global_batch)
        if not ran(rung, result.settings):
            levers.remove(rung)  # this model does not allow it (the run's warnings say why)
    micro = global_batch
    while result.device_total > limit and micro > 1:  # smaller micro-batches, accumulated: half or less, a divisor
        micro = max(d for d in range(1, micro // 2 + 1) if global_batch % d == 0)
        result = run(levers, micro)
    if micro < global_batch and result.device_total <= limit:  # at that micro-batch, maybe fewer levers do
        for count in range(len(levers) - 1, -1, -1):
            fewer = run(levers[:count], micro)
            if fewer.device_total > limit:
                break
            levers, result = levers[:count], fewer
    fits = result.device_total <= limit
    return Choice(method, fits, levers, micro, global_batch // micro, result.device_total, result.peak_allocated,
                  result.step_flops, result.step_flops / max(plain.step_flops * micro / global_batch, 1) - 1,
                  result.host_peak, dict(training_args_for(levers, micro, global_batch), **shard_args), tried)


def render_fit(choices: list[Choice], model: str, gpu_memory: int, seq_len: int, global_batch: int = 1,
               quant_path: str = "load", gpus: int = 1, shard: str | None = None) -> str:
    gib = 2**30
    where = "a GPU" if gpus == 1 and shard is None else f"each of {gpus} GPUs ({per_gpu.how(shard)})"
    lines = [f"{model} on {where} with {gpu_memory / gib:.1f} GiB, sequence {seq_len}, global batch {global_batch} "
             "(device memory = simulated reserved + CUDA context)"]
    if any(c.method == "qlora" for c in choices):
        lines.append(f"QLoRA's model: {QUANT_PATHS[quant_path]}")
    lines.append(f"{'method':7s} {'fits':>4s} {'micro x accum':>13s} {'device':>10s} {'extra compute':>13s} "
                 f"{'on host':>9s}  levers (the cheapest that fit)")
    for c in choices:
        host = f"{c.host_bytes / gib:.1f} GiB" if c.host_bytes else "-"
        lines.append(f"{c.method:7s} {'yes' if c.fits else 'no':>4s} {f'{c.micro_batch} x {c.accumulation}':>13s} "
                     f"{c.device_bytes / gib:6.2f} GiB {f'{c.extra_compute:+.0%}':>13s} {host:>9s}  "
                     f"{' + '.join(c.levers) or 'none needed'}")
    if any(not c.fits for c in choices):
        lines.append("a method that does not fit shows its last try: every lever on, micro-batch 1")
    return "\n".join(lines) + "\n"


def choices_json(choices: list[Choice]) -> list[dict]:
    return [asdict(c) for c in choices]


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

    kind = sharding.kind(args)
    if kind is not None:  # sharded runs are simulated under a fake process group, which a distributed job
        # cannot open
        logger.info(f"memory check skipped: a {kind} run is simulated in a process of its own "
                    f"(lorakit fit --gpus N --shard {kind})")
        return
    state = state_of(model)
    plan = state.plan if state else None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        predicted = simulate(base, lora=plan and plan.lora, freeze=plan and plan.freeze,
                             quant=plan and plan.quant, batch_size=shape[0], seq_len=shape[1], steps=1,
                             attn=_attention_name(getattr(base.config, "_attn_implementation", None)),
                             gradient_checkpointing=bool(args.gradient_checkpointing),
                             chunked_loss=getattr(args, "lorakit_chunked_loss", None),
                             activation_offload=getattr(args, "lorakit_activation_offload", False),
                             tiled_mlp=getattr(args, "lorakit_tiled_mlp", False),
                             autocast="bfloat16" if args.bf16 else "float16" if args.fp16 else None,
                             gpus=max(args.world_size, 1))
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
