"""What one GPU of several holds under DeepSpeed ZeRO-2 or ZeRO-3, as LoraTrainer runs it: DeepSpeed's own engine
replayed on fake tensors, not a formula.

Under `per_gpu.fake_ranks` (a fake process group of N ranks standing in for NCCL), `engine` builds the
`DeepSpeedEngine` Trainer builds for `training_args(deepspeed={"zero_optimization": {"stage": 2 or 3}})`: the
config with Trainer's "auto" values filled as Trainer fills them (micro-batch, clipping at 1.0, bf16/fp16 from
the autocast dtype, bucket sizes from the model's hidden size, as LoraTrainer asks), and Trainer's optimizer given
to DeepSpeed as the client optimizer. So the flat bit16 groups, the float32 master partitions, the optimizer
state of this rank's partition, the gradient buckets and partitions, ZeRO-3's parameter partitions and what its
coordinator gathers, prefetches and keeps for reuse are DeepSpeed's own allocations, counted by `LiveBytes`.

Three things DeepSpeed does need tensor values, and a simulation has none; each is replaced for the duration:
the gradient-norm and overflow checks (taken as finite), ZeRO-3's check that every rank traced the same modules
(one rank is replayed), and the CPU shared-memory collective DeepSpeed compiles on a CPU-only machine (the
fake process group does the collectives). DeepSpeed moves the model to its device and casts it to bf16/fp16
with `module.to` / `.bfloat16()`, which cannot swap fake parameters: the cast is done beforehand, in place, and
the engine's calls leave the model as it is.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
from typing import Any, Iterator

from ..core.errors import SpecError
from .materialise import state_tensors
from .per_gpu import ZERO_STAGES, as_role, patched

FRESH_GROUPS = ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP",
                "_TENSOR_MODEL_PARALLEL_GROUP", "mpu")


def hidden_size(config: Any) -> int | None:
    """The hidden size Trainer sizes DeepSpeed's "auto" buckets from (transformers' trainer_config_finalize)."""
    for where in (config, getattr(config, "text_config", None)):
        if getattr(where, "hidden_size", None):
            return where.hidden_size
        if getattr(where, "hidden_sizes", None):
            return max(where.hidden_sizes)
    return None


def config(stage: int, batch_size: int, gpus: int, autocast: str | None, hidden: int | None) -> dict:
    """DeepSpeed's config as Trainer completes lorakit's `{"zero_optimization": {"stage": stage}}`."""
    zero: dict[str, Any] = {"stage": stage}
    if hidden:  # LoraTrainer asks for "auto" (sharding.auto_buckets); without a hidden size DeepSpeed's defaults
        zero["reduce_bucket_size"] = hidden * hidden
        if stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
            zero["stage3_param_persistence_threshold"] = 10 * hidden
    return {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1,
            "train_batch_size": batch_size * gpus, "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": autocast == "bfloat16"}, "fp16": {"enabled": autocast == "float16"},
            "zero_optimization": zero, "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


def check(shard: str, optimizer: str, autocast: str | None) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise SpecError(f"simulating {shard} needs DeepSpeed, which is not installed",
                        hint="pip install 'lorakit[deepspeed]'")
    if optimizer != "adamw":
        raise SpecError(f"{shard} is simulated with Trainer's AdamW only, not {optimizer!r}",
                        hint="simulate optimizer='adamw' (DeepSpeed partitions its state)")
    if autocast == "float16":
        raise SpecError(f"{shard} with fp16 is not simulated: DeepSpeed's loss scaler reads the gradients' values",
                        hint="simulate autocast='bfloat16', or autocast=None")


def cast(net: Any, autocast: str | None) -> None:
    """What DeepSpeed's `module.bfloat16()` does to the model, done in place beforehand: every floating
    parameter and buffer in the compute dtype (LoRA's float32 weights included; DeepSpeed keeps float32
    master copies of the trained ones)."""
    import torch

    if autocast is None:
        return
    dtype = getattr(torch, autocast)
    with torch.no_grad():
        for tensor in [*net.parameters(), *net.buffers()]:
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)


@contextlib.contextmanager
def replayable(net: Any, gpus: int, counter: Any) -> Iterator[None]:
    """DeepSpeed, for the duration, as it can run on one fake rank (see the module's docstring), with the
    environment a launcher gives rank 0; what ZeRO-3's coordinator all-gathers for a module's forward or
    backward is counted as weights."""
    import os
    import warnings
    from unittest import mock

    comm = importlib.import_module("deepspeed.comm.torch")
    modules = [importlib.import_module(f"deepspeed.runtime.zero.{name}") for name in ("stage_1_and_2", "stage3")]
    coordinator = importlib.import_module("deepspeed.runtime.zero.partitioned_param_coordinator")
    groups, backend = importlib.import_module("deepspeed.utils.groups"), importlib.import_module("deepspeed.comm.comm")
    fetch = coordinator.PartitionedParameterCoordinator.fetch_sub_module
    for name in ("to", "half", "bfloat16"):  # the model is already where DeepSpeed puts it, in its dtype
        setattr(net, name, lambda *args, **kwargs: net)
    quiet = logging.getLogger("DeepSpeed")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with mock.patch.dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE=str(gpus)), \
                warnings.catch_warnings(action="ignore"), \
                patched((comm, "build_shm_op", lambda: None),
                        *[(module, "is_invalid_grad_norm", lambda norm: False) for module in modules],
                        *[(optimizer, "has_overflow", lambda self, *args, **kwargs: False) for optimizer in
                          (modules[0].DeepSpeedZeroOptimizer, modules[1].DeepSpeedZeroOptimizer_Stage3)],
                        (coordinator, "assert_ints_same_as_other_ranks", lambda ints: None),
                        (coordinator.PartitionedParameterCoordinator, "fetch_sub_module",
                         as_role(counter, fetch, "weights")),
                        # DeepSpeed's process groups, made afresh over this fake group
                        (backend, "cdb", None), *[(groups, name, None) for name in FRESH_GROUPS]):
            yield
    finally:
        for name in ("to", "half", "bfloat16"):
            vars(net).pop(name, None)
        quiet.level = level


def engine(net: Any, shard: str, batch_size: int, gpus: int, autocast: str | None, optimizer: Any,
           counter: Any) -> Any:
    """The DeepSpeedEngine Trainer builds around `net` (fake tensors, under `per_gpu.fake_ranks` and
    `replayable`), its allocations counted by `counter`. Under ZeRO-3 the whole parameters are never counted:
    zero.Init partitions each as its module is built, so a rank only ever holds its partitions, the parameters
    DeepSpeed keeps whole (below stage3_param_persistence_threshold) and the buffers."""
    import deepspeed

    for tensor in state_tensors(net) if shard == "zero3" else ():
        counter.elsewhere(tensor)
    cast(net, autocast)
    settings = config(ZERO_STAGES[shard], batch_size, gpus, autocast, hidden_size(getattr(net, "config", None)))
    built, *_ = deepspeed.initialize(model=net, optimizer=optimizer, config=settings, dist_init_required=False)
    for tensor in state_tensors(net):  # what the model holds now (ZeRO-2: its whole weights, counted already)
        counter.resized(tensor) if shard == "zero3" else counter.track(tensor)
    return built


def label(engine: Any, counter: Any) -> None:
    """The kinds of what DeepSpeed's ZeRO optimizer holds, by its attributes' names: float32 master
    partitions are optimizer state, like the partition's Adam moments; gradient buckets and partitions are
    gradients; the flat bit16 groups are the trained weights. Read from DeepSpeed's own names (0.19)."""
    import torch
    from torch.utils._pytree import tree_leaves

    def tensors(value: Any) -> list[Any]:
        return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]

    zero = engine.optimizer
    for name, value in vars(zero).items():
        lowered = name.lower()
        role = ("optimizer state" if "fp32" in lowered else "gradients" if "grad" in lowered or "ipg" in lowered
                else "weights" if any(kind in lowered for kind in ("bit16", "fp16", "bf16")) else None)
        if role:
            for tensor in tensors(value):
                if (sid := counter.storage_id(tensor)) is not None:
                    counter.storages[sid].role = role
    for state in zero.optimizer.state.values():
        for tensor in tensors(state):
            if (sid := counter.storage_id(tensor)) is not None:
                counter.storages[sid].role = "optimizer state"
