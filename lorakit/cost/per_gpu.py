"""What one GPU of several holds in a simulated run: data parallel (DDP) and FSDP2, as Trainer runs them.

`simulate(..., gpus=N, shard=...)` replays one rank. FSDP2 is not modelled by a formula: a fake process group
of N ranks (torch's own, the one torchtitan's memory estimator uses) stands in for NCCL, and accelerate's
`fsdp2_prepare_model`, the function `LoraTrainer` reaches through Trainer, shards the fake model exactly as it
shards a real one: one FSDP unit per decoder layer (the model's `_no_split_modules`), the embeddings and the
head in units of their own, the root last, trainable parameters upcast to float32 under mixed precision, and
the mixed-precision policy Trainer's bf16/fp16 gives (parameters all-gathered and gradients reduced in the
compute dtype). The step then runs as on one GPU and `LiveBytes` sees this rank's shards, the all-gathered
units and their prefetch, and the reduce-scatter buffers. Collectives move no data, which costs no memory.
A 4-bit model is sharded as LoraTrainer shards it: packed weights stored in the compute dtype, sharded with
the rest, and their quantization state whole on every rank.

DDP holds the whole model on every rank. Wrapping it broadcasts rank 0's parameters and buffers, flattened
into buckets of up to 250 MiB (a transient beside the whole model), and allocates its gradient buckets: one
more copy of the trainable parameters' gradients, kept for the whole run.

DeepSpeed ZeRO-2 and ZeRO-3 are replayed with DeepSpeed's own engine (`zero_replay`), under the same fake
process group.
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
from typing import Any, Iterator

from ..core.errors import SpecError
from .allocator import round_size

SHARDS = ("fsdp", "zero2", "zero3")
ZERO_STAGES = {"zero2": 2, "zero3": 3}  # the shards DeepSpeed does (`zero_replay`), by ZeRO stage


def check(gpus: Any, shard: str | None) -> None:
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 1:
        raise SpecError(f"gpus must be a whole number of GPUs, 1 or more, got {gpus!r}",
                        hint="e.g. gpus=8 (--gpus 8); the figures are per GPU")
    if shard is None:
        return
    if shard not in SHARDS:
        raise SpecError(f"unknown shard {shard!r}", hint=f"use one of {', '.join(SHARDS)}, or none for DDP")


def how(shard: str | None) -> str:
    return {None: "DDP", "fsdp": "FSDP2 full shard", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}[shard]


def training_keywords(shard: str | None) -> dict:
    """What `lorakit.training_args` needs to train as `shard` (docs/scaling.md's recipes)."""
    if shard is None:
        return {}
    if shard == "fsdp":
        return {"fsdp": True}
    return {"deepspeed": {"zero_optimization": {"stage": ZERO_STAGES[shard]}, "bf16": {"enabled": "auto"},
                          "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                          "train_batch_size": "auto"}}


def arguments(shard: str) -> Any:
    """The part of TrainingArguments that `sharding.kind` reads, for `shard`: what `training_keywords` sets."""
    return types.SimpleNamespace(**{"fsdp": None, "fsdp_config": None, "deepspeed": None,
                                    **training_keywords(shard)})


def describe(gpus: int, shard: str | None) -> str:
    return "one GPU" if gpus == 1 and shard is None else f"one of {gpus} GPUs, {how(shard)}"


@contextlib.contextmanager
def fake_ranks(gpus: int) -> Iterator[Any]:
    """A fake process group of `gpus` ranks, this process rank 0, and its one-dimensional device mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise SpecError("a sharded run cannot be simulated inside a distributed job: this process already "
                        "belongs to a process group", hint="simulate in a process of its own (no torchrun)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        yield init_device_mesh("cpu", (gpus,), mesh_dim_names=("dp_shard",))  # before fake mode: it reads values
    finally:
        dist.destroy_process_group()


def fsdp2(net: Any, mesh: Any, autocast: str | None) -> Any:
    """`net` sharded by accelerate's own `fsdp2_prepare_model`, configured as Trainer configures it for
    `training_args(fsdp=True)` (transformer-based wrapping, full shard, mixed precision from bf16/fp16)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    mixed = {"bfloat16": "bf16", "float16": "fp16", None: "no"}[autocast]
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True)
    if mixed != "no":
        plugin.set_mixed_precision(mixed)
    # the parts of an Accelerator that fsdp2_prepare_model reads
    accelerator = types.SimpleNamespace(
        state=types.SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=mesh, mixed_precision=mixed,
        parallelism_config=types.SimpleNamespace(fsdp_dim_names=list(mesh.mesh_dim_names)),
        is_main_process=True, device=mesh.device_type)
    with warnings.catch_warnings(action="ignore"), _state_dict_without_quant_state():
        return fsdp2_prepare_model(accelerator, net)


@contextlib.contextmanager
def patched(*patches: tuple[Any, str, Any]) -> Iterator[None]:
    """Each (owner, name, value) set for the duration, the originals put back after."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)


def _state_dict_without_quant_state() -> Any:
    """fsdp2_prepare_model takes the model's state_dict (it reloads it only with cpu_ram_efficient_loading, off
    here), and a bitsandbytes 4-bit layer puts its quantization state in it by value (`.item()`), which a fake
    tensor has not: for that call, the layer's state_dict is the plain module's."""
    import torch

    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return contextlib.nullcontext()
    return patched((bnb.nn.Linear4bit, "_save_to_state_dict", torch.nn.Module._save_to_state_dict))


def counted(counter: Any) -> Any:
    """FSDP2 as `counter` must see it. It frees a gathered unit's parameters by resizing their storage to
    nothing and re-allocates them by resizing it back (`storage.resize_`, which no op reports): the counter is
    told. And what FSDP2 allocates to all-gather a unit is counted as weights, its reduce-scatter buffers as
    gradients (the breakdown's kinds). Reads FSDP2's private names (as of torch 2.13)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param as params, _fsdp_param_group as groups

    def told(function: Any) -> Any:
        def run(tensor: Any) -> None:
            function(tensor)
            counter.resized(tensor)
        return run

    group = groups.FSDPParamGroup
    return patched((group, "unshard", as_role(counter, group.unshard, "weights")),
                   (group, "wait_for_unshard", as_role(counter, group.wait_for_unshard, "weights")),
                   (groups, "foreach_reduce", as_role(counter, groups.foreach_reduce, "gradients")),
                   (params, "alloc_storage", told(params.alloc_storage)),
                   (params, "free_storage", told(params.free_storage)),
                   (groups, "alloc_storage", told(groups.alloc_storage)))


def as_role(counter: Any, function: Any, role: str) -> Any:
    """`function`, with what it allocates counted by `counter` as `role` (a kind of the breakdown)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        before, counter.role = counter.role, role
        try:
            return function(*args, **kwargs)
        finally:
            counter.role = before
    return run


DDP_BROADCAST_BUCKET = 250 << 20  # DistributedDataParallel's broadcast_bucket_size


def ddp_broadcast(net: Any) -> int:
    """Bytes of the largest buffer DDP flattens the model's parameters and buffers into when it broadcasts
    rank 0's values at wrap time (torch's take_tensors: per dtype, a bucket closes once it reaches 250 MiB).
    A transient: it lives beside the whole model for one collective."""
    import torch

    filling: dict[Any, int] = {}
    largest = 0
    for tensor in [*net.parameters(), *net.buffers()]:
        if not isinstance(tensor, torch.Tensor):
            continue
        size = filling.get(tensor.dtype, 0) + tensor.numel() * tensor.element_size()
        largest = max(largest, size)
        filling[tensor.dtype] = 0 if size >= DDP_BROADCAST_BUCKET else size
    return largest


def fake_4bit_gathered() -> Any:
    """A 4-bit weight FSDP2 has gathered is a plain parameter: bitsandbytes gives it back its layer's quant
    state by making it a `Params4bit`, which a fake tensor cannot become; here it gets the state as an attribute,
    which is all the layer's forward reads."""
    from bitsandbytes.nn import modules

    def give_state(module: Any) -> None:
        if getattr(module.weight, "quant_state", None) is None:
            module.weight.quant_state = module.quant_state

    return patched((modules, "fix_4bit_weight_quant_state_from_module", give_state))


def ddp_setup(net: Any, counter: Any) -> None:
    """What wrapping `net` in DDP allocates, counted: rank 0's model broadcast in flat buckets (freed after the
    collective), then DDP's own gradient buckets (kept)."""
    counter.remove(counter.add(round_size(ddp_broadcast(net)), "setup"))
    counter.storages[counter.add(round_size(ddp_buckets(net)), "setup")].role = "gradients"


def ddp_buckets(net: Any) -> int:
    """Bytes of DDP's gradient buckets: every trainable parameter's gradient once more, in its dtype."""
    return sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)
