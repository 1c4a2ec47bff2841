"""Peak training memory, counted by running real training steps on fake tensors.

The model is built from its config under torch's `FakeTensorMode` (shapes,
dtypes and storages, no memory), the spec is applied by `lorakit.wrap` itself
(peft LoRA/DoRA, freezing, bitsandbytes 8/4-bit through its fake kernels), and
steps run as `LoraTrainer` runs them: forward under autocast with the task's
loss, backward, gradient clipping, the optimizer step (which creates its
state), zero_grad. `counting.LiveBytes` counts live storage bytes through it
all. Steps 1 and 2 both run: step 1 creates the optimizer state, step 2 carries
it through forward and backward, and for full fine-tuning step 2 is the peak.

The target is a CUDA GPU; the tensors are fake CPU tensors, because a CPU build
of torch cannot run ops on fake CUDA tensors (its device guard aborts) and
autocast("cuda") switches itself off without CUDA. Where CUDA's kernels keep
other tensors than the CPU's, `counting` says what is emulated and why. The
attention kernels agree already: sdpa in bf16/fp16 picks flash attention on
both (saved: output and logsumexp, never the probabilities); "flash" is
simulated as sdpa's flash kernel, which saves the same tensors as
flash-attention-2. Allocations are rounded as the CUDA allocator rounds them,
the cuBLAS workspaces are added, and `allocator` replays the caching
allocator's rules for the reserved figure; the CUDA context is added
separately and labelled.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..core.errors import SpecError
from ..model.batches import sample_batch
from ..model.wrap import wrap
from ..plan.accounting import OPTIMIZERS
from ..plan.make import check_init
from ..spec.specs import Freeze, Lora, Quant, torch_dtype
from . import per_gpu
from . import zero_replay
from .allocator import CachingAllocator
from .levers import use_chunked_loss
from .materialise import QUANT_PATHS, materialise, prepare_bitsandbytes, state_tensors
from .plot import memory_plot
from .rebuild import (architecture, build, checkpoint, config_dtype, position_warning, specs_of, uniform_blocks,
                      unpadded_unpacked_rows, with_blocks, without_layerdrop, without_value_checks)
from .sharding import SHARDED_HEAD, SHARDS_PARAMETERS, quant_for
from .tiled_mlp import use_tiled_mlp
from .training_step import optimizer_for, run_steps, step_flops

ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash": "sdpa"}
CUDA_CONTEXT = 619 << 20  # a bare CUDA 13 context on an H100 (benchmarks/results/memory-cuda-h100.json)


@dataclass
class Simulation:
    """What one simulated training run holds on the GPU. Bytes throughout."""

    model: str
    settings: dict
    peak_allocated: int          # what torch.cuda.max_memory_allocated() would report
    peak_step: int
    peak_phase: str              # forward | backward | optimizer
    peak_module: str             # module (or op) running at the peak
    breakdown: dict[str, int]    # at the peak
    top_activations: list[tuple[str, int]]  # modules holding the most saved activations after forward
    setup_allocated: int         # model (and quantization state) before the first step
    steps: list[dict]            # per step: peak_allocated, peak_reserved, allocated_after, peak phase
    peak_reserved: int           # the caching allocator's segments (max_memory_reserved)
    cuda_context: int = CUDA_CONTEXT
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    phase_peaks: list[dict] = field(default_factory=list)  # per step and phase: the most allocated
    host_peak: int = 0           # offloaded activations at most, in host memory (activation_offload)
    step_flops: int = 0          # matmul/attention FLOPs of one step, recomputation included (FlopCounterMode)
    timeline: dict | None = None  # bytes by kind over the peak step (stepping.timeline); None when extrapolated

    @property
    def device_total(self) -> int:
        """Reserved + CUDA context: about what nvidia-smi shows for the process."""
        return self.peak_reserved + self.cuda_context

    def to_dict(self) -> dict:  # without the timeline: the picture's data, not a figure
        return dict({k: v for k, v in asdict(self).items() if k != "timeline"}, device_total=self.device_total)

    def plot(self, path: str, gpu_memory: int | None = None, force: bool = False) -> None:
        """Draw device memory over the ops of the peak step, stacked by kind, to a .png or .svg (`memplot`);
        `gpu_memory` (bytes) draws the GPU's capacity. Needs a run with `extrapolate=False` on a model of many
        identical blocks (the 2- and 3-block runs are not its timeline)."""
        memory_plot(self, path, gpu_memory=gpu_memory, force=force)


def simulate(model: Any, *, lora: Lora | dict | int | None = None, freeze: Freeze | str | None = None,
             quant: Quant | str | None = None, task: str | None = None, dtype: str | None = None,
             autocast: str | None = "bfloat16", attn: str = "sdpa", batch_size: int = 1, seq_len: int = 512,
             gradient_checkpointing: bool = False, optimizer: str = "adamw", steps: int = 2,
             preset: str | None = None, trust_remote_code: bool = False, real: bool = False,
             quant_path: str = "load", extrapolate: bool = True, chunked_loss: bool | None = None,
             activation_offload: bool = False, tiled_mlp: bool | None = False, count_flops: bool = False,
             peft_input_cast: bool = False, gpus: int = 1, shard: str | None = None) -> Simulation:
    """Simulate `steps` training steps of `model` (a config, a name `lorakit.load` accepts, or a transformers
    model in memory, rebuilt from its config and class) with the spec applied, on fake tensors.

    `quant_path`, with `quant`: how the quantized model got onto the GPU, which decides what the caching
    allocator keeps reserved. "load": `lorakit.load(path, quant=...)` or `from_pretrained(quantization_config=
    ...)`, which quantize weight by weight while loading; "wrap": `wrap(model, quant=...)` on a model that was
    on the GPU in full precision first.
    `extrapolate`: a model of identical blocks is simulated with 2 and 3 of them and the rest worked out (exact
    for allocated bytes); False simulates every block.
    `real=True` runs the identical steps on real CPU tensors (small models only): the tests' reference.
    `chunked_loss`, `activation_offload`, `tiled_mlp`: `LoraTrainer`'s memory levers (see `lorakit.cost.levers`,
    `lorakit.cost.tiled_mlp` and
    `training_args`), simulated with the same code; offloaded bytes are host memory (`Simulation.host_peak`).
    `count_flops`: also count one step's FLOPs, recomputation included (`Simulation.step_flops`), in a step of
    its own.
    `peft_input_cast`: LoRA inputs upcast to the adapters' float32 as plain peft does in a loop of one's own
    (LoraTrainer leaves them in the autocast dtype; see `lorakit.cost.levers`); with chunked_loss=False, the step
    of a plain training loop.
    `gpus`, `shard`: one rank of `gpus` (figures per GPU; `batch_size` is per GPU): data parallel (DDP) when
    `shard` is None, FSDP2 as Trainer applies it with "fsdp" (`lorakit.cost.per_gpu`), DeepSpeed's engine with
    "zero2" / "zero3" (`lorakit.cost.zero_replay`; it trains in the autocast dtype, with AdamW).
    """
    check_settings(batch_size, seq_len, attn, optimizer, autocast, steps)
    per_gpu.check(gpus, shard)
    if shard in per_gpu.ZERO_STAGES:
        zero_replay.check(shard, optimizer, autocast)
    if real and gpus > 1:
        raise SpecError("real=True runs one process's step: it cannot hold several GPUs' ranks",
                        hint="compare a sharded simulation with a real torchrun run (tests/test_sharding.py)")
    if activation_offload and not gradient_checkpointing:
        raise SpecError("activation_offload needs gradient checkpointing: without it every activation would "
                        "cross to the host and back", hint="add gradient_checkpointing=True")
    if quant_path not in QUANT_PATHS:
        raise SpecError(f"unknown quant_path {quant_path!r}", hint=f"use one of {', '.join(QUANT_PATHS)}")
    lora, freeze, quant = Lora.coerce(lora), Freeze.coerce(freeze), Quant.coerce(quant)
    lora, freeze, quant, preset = specs_of(model, lora, freeze, quant, preset)
    if lora is not None and lora.init != "default":  # how adapters start costs no memory in a training step
        check_init(lora, quant)
        lora = replace(lora, init="default")
    config, cls, name, task = architecture(model, task, trust_remote_code)
    config, notes = without_layerdrop(config)
    notes += position_warning(config, seq_len)
    dtype = torch_dtype(dtype) if dtype else config_dtype(config)
    started = time.perf_counter()
    run = dict(cls=cls, task=task, dtype=dtype, attn=attn, lora=lora, freeze=freeze, quant=quant, preset=preset,
               batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
               optimizer=optimizer, autocast=autocast, steps=steps, trust_remote_code=trust_remote_code,
               real=real, quant_path=quant_path, chunked_loss=chunked_loss, activation_offload=activation_offload,
               tiled_mlp=tiled_mlp,
               count_flops=count_flops, peft_input_cast=peft_input_cast, gpus=gpus, shard=shard)
    # ZeRO-3 keeps gathered parameters for reuse within a budget of elements (stage3_max_reuse_distance): what
    # it keeps is not linear in the blocks, so it is simulated whole
    whole = real or not extrapolate or shard == "zero3"
    blocks = None if whole else uniform_blocks(config, cls, dtype, trust_remote_code, freeze, lora)
    if blocks is None:
        result, ran = _simulate_once(config, **run)
    else:  # identical blocks cost the same: two short models give the slope, exactly (tests/test_simulate.py)
        from .stepping import extrapolated

        (two, ran), (three, _) = (_simulate_once(with_blocks(config, k), **run) for k in (2, 3))
        result = extrapolated(two, three, blocks)
        notes.append(f"simulated with 2 and 3 of its {blocks} identical blocks and extrapolated: allocated bytes "
                     "exactly; reserved as the 3-block run's fragmentation over that")
    result.model = name
    notes += [note for note in result.warnings if note not in notes]
    if ran != ATTENTION[attn]:
        notes.append(f"{getattr(config, 'model_type', name)} models have no {attn} attention: simulated with {ran}, "
                     "as transformers runs them")
    result.settings = dict(dtype=str(dtype).removeprefix("torch."), autocast=autocast, attn=ran,
                           batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
                           optimizer=optimizer, steps=steps, real=real,
                           lora=asdict(lora) if lora else None, freeze=asdict(freeze) if freeze else None,
                           quant=asdict(quant) if quant else None, quant_path=quant_path if quant else None,
                           chunked_loss=result.settings["chunked_loss"], activation_offload=activation_offload,
                           tiled_mlp=result.settings["tiled_mlp"],
                           peft_input_cast=peft_input_cast, gpus=gpus, shard=shard,
                           extrapolated_from_blocks=(2, 3) if blocks else None)
    result.warnings, result.seconds = notes, time.perf_counter() - started
    return result


def _simulate_once(config: Any, *, cls: Any, task: str, dtype: Any, attn: str, lora: Any, freeze: Any, quant: Any,
                   preset: Any, batch_size: int, seq_len: int, gradient_checkpointing: bool, optimizer: str,
                   autocast: Any, steps: int, trust_remote_code: bool, real: bool, quant_path: str,
                   chunked_loss: bool | None, activation_offload: bool, tiled_mlp: bool | None,
                   count_flops: bool, peft_input_cast: bool, gpus: int,
                   shard: str | None) -> tuple[Simulation, str]:
    """One simulated run of exactly this config: (the result, the attention implementation that ran)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .counting import LiveBytes, cuda_kernels

    inputs = sample_batch(config, task, batch_size=batch_size, seq_len=seq_len)
    counter = LiveBytes()
    fake = FakeTensorMode(allow_non_fake_inputs=True) if not real else None
    if fake is not None:  # fake inputs: transformers then skips its checks that read values (it sees a trace)
        inputs = {k: fake.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    torch.manual_seed(0)
    with torch.device("meta") if not real else _maybe(None):
        net = build(cls, config, dtype, ATTENTION[attn], trust_remote_code)
        ran = getattr(net.config, "_attn_implementation", None) or ATTENTION[attn]
        if shard:  # 4-bit weights stored in the compute dtype where LoraTrainer sets it for sharded training
            quant = quant_for(quant, per_gpu.arguments(shard), net)
        if lora or freeze or quant:
            net = wrap(net, lora=lora, freeze=freeze, quant=quant, preset=preset)
    if not any(p.requires_grad for p in net.parameters()):
        raise SpecError("nothing in this model is trainable", hint="give a LoRA spec or a freeze spec")
    head_sharded = SHARDED_HEAD if shard in SHARDS_PARAMETERS else None  # ZeRO-2 keeps lm_head whole
    chunked, why_not = use_chunked_loss(net, task, chunked_loss, head_sharded)
    notes = [f"standard causal-LM loss (LoraTrainer's too): {why_not}"] if why_not else []
    if shard and tiled_mlp:
        raise SpecError(f"the tiled MLP is not checked under {shard}, and LoraTrainer refuses it there",
                        hint="simulate without tiled_mlp=True")
    tiled, why_not = use_tiled_mlp(net, tiled_mlp if not shard else False)
    notes += [f"MLPs run whole: {why_not}"] if why_not and tiled_mlp is None else []
    if gradient_checkpointing:
        checkpoint(net)
    net.train()
    prepare_bitsandbytes(net)
    def to_fake() -> None:
        if fake is not None:
            materialise(net, loaded_dtype=dtype if quant is not None else None, quant_path=quant_path)

    engine, zero = None, shard in per_gpu.ZERO_STAGES
    with per_gpu.fake_ranks(gpus) if shard else _maybe(None) as mesh, _maybe(fake), \
            zero_replay.replayable(net, gpus, counter) if zero else _maybe(None):
        if shard in SHARDS_PARAMETERS:  # FSDP2 shards the model as accelerate moves it to the GPU, ZeRO-3 as it
            to_fake()                   # loads (zero.Init): only the shards are ever there
        if shard == "fsdp":
            net = per_gpu.fsdp2(net, mesh, autocast)
        with counter:
            if shard not in SHARDS_PARAMETERS:
                to_fake()
                for tensor in state_tensors(net):
                    counter.track(tensor)
            if zero:  # DeepSpeed trains in the compute dtype, without autocast
                engine = zero_replay.engine(net, shard, batch_size, gpus, autocast, optimizer_for(net, optimizer),
                                            counter)
                autocast = None
            elif shard == "fsdp":  # this rank's shards
                for tensor in state_tensors(net):
                    counter.track(tensor)
            if gpus > 1 and not shard:
                per_gpu.ddp_setup(net, counter)
            setup = counter.live
            with cuda_kernels(), without_value_checks(), unpadded_unpacked_rows(), \
                    per_gpu.counted(counter) if shard == "fsdp" else _maybe(None), \
                    per_gpu.fake_4bit_gathered() if shard and quant else _maybe(None):
                run_steps(net, inputs, counter, optimizer, autocast, steps, chunked, activation_offload,
                          autocast is not None and not peft_input_cast, engine, tiled, 2 if fake is not None else None)
        # a step of its own: FlopCounterMode beside LiveBytes changes what checkpointing keeps
        flops = step_flops(net, inputs, autocast, chunked, engine, tiled) if count_flops else 0
    result = _summarise(counter, setup, "", steps)
    result.settings = {"chunked_loss": chunked, "tiled_mlp": tiled}
    result.warnings, result.host_peak = notes, counter.host_peak
    result.step_flops = flops
    return result, ran


def check_settings(batch_size: Any, seq_len: Any, attn: str, optimizer: str, autocast: Any, steps: int) -> None:
    for knob, value in (("batch_size", batch_size), ("seq_len", seq_len), ("steps", steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise SpecError(f"{knob} must be a positive whole number, got {value!r}",
                            hint=f"e.g. {knob}=1" if knob != "seq_len" else "e.g. seq_len=2048")
    if attn not in ATTENTION:
        raise SpecError(f"unknown attention {attn!r}", hint=f"use one of {', '.join(ATTENTION)}")
    if optimizer not in OPTIMIZERS:
        raise SpecError(f"unknown optimizer {optimizer!r}", hint=f"use one of {', '.join(OPTIMIZERS)}")
    if autocast not in (None, "bfloat16", "float16"):
        raise SpecError(f"autocast must be None, 'bfloat16' or 'float16', got {autocast!r}",
                        hint="None trains in the weights' dtype")


class _maybe:
    def __init__(self, mode: Any) -> None:
        self.mode = mode

    def __enter__(self) -> None:
        if self.mode is not None:
            self.mode.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.mode is not None:
            self.mode.__exit__(*exc)


def _summarise(counter: Any, setup: int, name: str, steps: int) -> Simulation:
    from .stepping import replay

    found = replay(counter, CachingAllocator())
    return Simulation(model=name, settings={}, setup_allocated=setup, **found)
