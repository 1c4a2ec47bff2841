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

import contextlib
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .allocator import CachingAllocator
from .errors import LorakitError, SpecError
from .materialise import QUANT_PATHS, materialise, prepare_bitsandbytes, state_tensors
from .memplot import memory_plot
from .batches import sample_batch
from .levers import chunked_loss, chunked_loss_blocker, offloaded_activations, uncast_lora_inputs
from .load import auto_class, check_task, resolve_config, task_from_config, with_architectures
from .plan import check_init, model_task
from .specs import Freeze, Lora, Quant, torch_dtype
from .wrap import wrap

ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash": "sdpa"}
OPTIMIZERS = ("adamw", "adamw-8bit", "sgd")
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
             activation_offload: bool = False, count_flops: bool = False,
             peft_input_cast: bool = False) -> Simulation:
    """Simulate `steps` training steps of `model` (a config, a name `lorakit.load` accepts, or a transformers
    model in memory, rebuilt from its config and class) with the spec applied, on fake tensors.

    `quant_path`, with `quant`: how the quantized model got onto the GPU, which decides what the caching
    allocator keeps reserved. "load": `lorakit.load(path, quant=...)` or `from_pretrained(quantization_config=
    ...)`, which quantize weight by weight while loading; "wrap": `wrap(model, quant=...)` on a model that was
    on the GPU in full precision first.
    `extrapolate`: a model of identical blocks is simulated with 2 and 3 of them and the rest worked out (exact
    for allocated bytes); False simulates every block.
    `real=True` runs the identical steps on real CPU tensors (small models only): the tests' reference.
    `chunked_loss`, `activation_offload`: `LoraTrainer`'s memory levers (see `lorakit.levers` and
    `training_args`), simulated with the same code; offloaded bytes are host memory (`Simulation.host_peak`).
    `count_flops`: also count one step's FLOPs, recomputation included (`Simulation.step_flops`), in a step of
    its own.
    `peft_input_cast`: LoRA inputs upcast to the adapters' float32 as plain peft does in a loop of one's own
    (LoraTrainer leaves them in the autocast dtype; see `lorakit.levers`); with chunked_loss=False, the step
    of a plain training loop.
    """
    check_settings(batch_size, seq_len, attn, optimizer, autocast, steps)
    if activation_offload and not gradient_checkpointing:
        raise SpecError("activation_offload needs gradient checkpointing: without it every activation would "
                        "cross to the host and back", hint="add gradient_checkpointing=True")
    if quant_path not in QUANT_PATHS:
        raise SpecError(f"unknown quant_path {quant_path!r}", hint=f"use one of {', '.join(QUANT_PATHS)}")
    lora, freeze, quant = Lora.coerce(lora), Freeze.coerce(freeze), Quant.coerce(quant)
    if lora is not None and lora.init != "default":  # how adapters start costs no memory in a training step
        check_init(lora, quant)
        lora = replace(lora, init="default")
    config, cls, name, task = _architecture(model, task, trust_remote_code)
    config, notes = _without_layerdrop(config)
    notes += _position_warning(config, seq_len)
    dtype = torch_dtype(dtype) if dtype else _config_dtype(config)
    started = time.perf_counter()
    run = dict(cls=cls, task=task, dtype=dtype, attn=attn, lora=lora, freeze=freeze, quant=quant, preset=preset,
               batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=gradient_checkpointing,
               optimizer=optimizer, autocast=autocast, steps=steps, trust_remote_code=trust_remote_code,
               real=real, quant_path=quant_path, chunked_loss=chunked_loss, activation_offload=activation_offload,
               count_flops=count_flops, peft_input_cast=peft_input_cast)
    blocks = None if real or not extrapolate else _uniform_blocks(config, cls, dtype, trust_remote_code, freeze, lora)
    if blocks is None:
        result, ran = _simulate_once(config, **run)
    else:  # identical blocks cost the same: two short models give the slope, exactly (tests/test_simulate.py)
        from .stepping import extrapolated

        (two, ran), (three, _) = (_simulate_once(_with_blocks(config, k), **run) for k in (2, 3))
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
                           peft_input_cast=peft_input_cast,
                           extrapolated_from_blocks=(2, 3) if blocks else None)
    result.warnings, result.seconds = notes, time.perf_counter() - started
    return result


def _simulate_once(config: Any, *, cls: Any, task: str, dtype: Any, attn: str, lora: Any, freeze: Any, quant: Any,
                   preset: Any, batch_size: int, seq_len: int, gradient_checkpointing: bool, optimizer: str,
                   autocast: Any, steps: int, trust_remote_code: bool, real: bool, quant_path: str,
                   chunked_loss: bool | None, activation_offload: bool,
                   count_flops: bool, peft_input_cast: bool) -> tuple[Simulation, str]:
    """One simulated run of exactly this config: (the result, the attention implementation that ran)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .counting import LiveBytes, cuda_kernels

    inputs = sample_batch(config, task, batch_size=batch_size, seq_len=seq_len)
    counter = LiveBytes()
    fake = FakeTensorMode(allow_non_fake_inputs=True) if not real else None
    torch.manual_seed(0)
    with torch.device("meta") if not real else _maybe(None):
        net = _build(cls, config, dtype, ATTENTION[attn], trust_remote_code)
        ran = getattr(net.config, "_attn_implementation", None) or ATTENTION[attn]
        if lora or freeze or quant:
            net = wrap(net, lora=lora, freeze=freeze, quant=quant, preset=preset)
    if not any(p.requires_grad for p in net.parameters()):
        raise SpecError("nothing in this model is trainable", hint="give a LoRA spec or a freeze spec")
    chunked, notes = _chunked_loss(net, task, chunked_loss)
    if gradient_checkpointing:
        checkpoint(net)
    net.train()
    prepare_bitsandbytes(net)
    with _maybe(fake):
        with counter:
            if fake is not None:
                materialise(net, loaded_dtype=dtype if quant is not None else None, quant_path=quant_path)
            for tensor in state_tensors(net):
                counter.track(tensor)
            setup = counter.live
            with cuda_kernels(), _without_value_checks():
                _run_steps(net, inputs, counter, optimizer, autocast, steps, chunked, activation_offload,
                           autocast is not None and not peft_input_cast)
        # a step of its own: FlopCounterMode beside LiveBytes changes what checkpointing keeps
        flops = _step_flops(net, inputs, autocast, chunked) if count_flops else 0
    result = _summarise(counter, setup, "", steps)
    result.settings, result.warnings, result.host_peak = {"chunked_loss": chunked}, notes, counter.host_peak
    result.step_flops = flops
    return result, ran


def _chunked_loss(net: Any, task: str, asked: bool | None) -> tuple[bool, list[str]]:
    """Whether the step uses the chunked causal-LM loss, as `LoraTrainer` decides it, and the note saying why not."""
    if asked is False:
        return False, []
    if task != "causal-lm":
        if asked:
            raise SpecError(f"chunked_loss is a causal-LM loss; this model's task is {task}",
                            hint="leave chunked_loss unset: the model's own loss is simulated")
        return False, []
    blocker = chunked_loss_blocker(net)
    if blocker and asked:
        raise SpecError(f"chunked_loss=True, but it would not give this model's loss: {blocker}",
                        hint="leave chunked_loss unset to simulate the standard loss")
    return blocker is None, [f"standard causal-LM loss (LoraTrainer's too): {blocker}"] if blocker else []


def _uniform_blocks(config: Any, cls: Any, dtype: Any, trust_remote_code: bool, freeze: Any, lora: Any) -> int | None:
    """The number of blocks when simulating 2 and 3 of them tells the rest exactly: a plain decoder or encoder
    (one config, `num_hidden_layers` of at least 4) whose blocks are alike (one layer type, and blocks 0-2 of a
    3-block model identical in classes and shapes), and a spec that selects no blocks by index."""
    import torch

    blocks = getattr(config, "num_hidden_layers", None)
    if not isinstance(blocks, int) or blocks < 4 or getattr(config, "sub_configs", None):
        return None
    if len(set(getattr(config, "layer_types", None) or [None])) > 1:
        return None
    if lora is not None and lora.layers is not None or freeze is not None and (
            freeze.first_layers or freeze.last_layers or freeze.layers):
        return None
    with torch.device("meta"):
        small = _build(cls, _with_blocks(config, 3), dtype, "eager", trust_remote_code)
    stacks = [m for m in small.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == 3]
    if len(stacks) != 1:
        return None
    shapes = [[(n, type(m).__name__, tuple(p.shape)) for n, m in block.named_modules() for p in
               m.parameters(recurse=False)] for block in stacks[0]]
    return blocks if shapes[0] == shapes[1] == shapes[2] else None


def _with_blocks(config: Any, count: int) -> Any:
    import copy

    config = copy.copy(config)
    config.num_hidden_layers = count
    return config


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


def _architecture(model: Any, task: str | None, trust_remote_code: bool) -> tuple[Any, Any, str, str]:
    """(config, class to build, name, task) for a config, a name, or a model in memory."""
    check_task(task)
    if hasattr(model, "named_parameters"):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not hasattr(base, "config") or not hasattr(type(base), "_from_config"):
            raise LorakitError(f"cannot simulate a {type(base).__name__}: only transformers models rebuild "
                               "from their config", hint="pass the model's config or its name")
        return base.config, _Rebuild(type(base)), type(base).__name__, task or model_task(base)
    config, source = resolve_config(model, trust_remote_code=trust_remote_code)
    task = task or task_from_config(config)
    return config, auto_class(task), source.id, task


def _build(cls: Any, config: Any, dtype: Any, attn: str, trust_remote_code: bool) -> Any:
    """The model with the attention asked for, or the model's own when it has no such implementation
    (Gemma 2, gpt-oss and BLOOM have no sdpa; Mamba, ConvNeXt and ResNet no attention at all)."""
    config = with_architectures(config)
    try:
        return cls.from_config(config, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "attention implementation" not in str(exc) and "attn_implementation" not in str(exc):
            raise
        return cls.from_config(config, dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code)


class _Rebuild:
    """`from_config` for a model class in memory (keeps subclasses and custom modules)."""

    def __init__(self, cls: Any) -> None:
        self.cls = cls

    def from_config(self, config: Any, **kwargs: Any) -> Any:
        kwargs.pop("trust_remote_code", None)
        return self.cls._from_config(config, **kwargs)


def _config_dtype(config: Any) -> Any:
    import torch

    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if value in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def checkpoint(net: Any) -> None:
    """Gradient checkpointing as LoraTrainer turns it on (non-reentrant), through transformers 5's
    activation_checkpointing_enable; the cache off, as transformers itself switches it off for it."""
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    base.config.use_cache = False
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers before 5.2x
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _without_layerdrop(config: Any) -> tuple[Any, list[str]]:
    """A copy of the config with LayerDrop off: the memory peak is a step that skips no layer (and a random
    skip decided on a fake tensor has no value to decide by)."""
    import copy

    drops = [k for k, v in config.to_dict().items() if k.endswith("layerdrop") and v]
    if not drops:
        return config, []
    config = copy.copy(config)
    for key in drops:
        setattr(config, key, 0.0)
    return config, [f"{', '.join(drops)} set to 0: the peak is a step that skips no layer"]


@contextlib.contextmanager
def _without_value_checks() -> Iterator[None]:
    """transformers' own switch for its input checks that read tensor values (a VLM's count of image tokens
    against its image features): fake tensors have no values, and lorakit's sample batch passes them."""
    before = os.environ.get("TRANSFORMERS_DISABLE_TORCH_CHECK")
    os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRANSFORMERS_DISABLE_TORCH_CHECK")
        else:
            os.environ["TRANSFORMERS_DISABLE_TORCH_CHECK"] = before


def _position_warning(config: Any, seq_len: int) -> list[str]:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and seq_len > limit:
        text = (f"seq_len {seq_len} is beyond this model's max_position_embeddings ({limit}); "
                "simulated anyway, but the model was not trained for it")
        warnings.warn(text, stacklevel=3)
        return [text]
    return []


def _optimizer(net: Any, optimizer: str) -> Any:
    """What Trainer builds for lorakit's training_args: fused torch AdamW; or bnb's 8-bit AdamW; or SGD."""
    import torch

    params = [p for p in net.parameters() if p.requires_grad]
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=5e-5, eps=1e-8, fused=True)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=5e-5)
    import bitsandbytes as bnb
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # its quantization maps are built with .tolist(): real values, a few KiB
        return bnb.optim.AdamW8bit(params, lr=5e-5)


def _run_steps(net: Any, batch: dict, counter: Any, optimizer_name: str, autocast: str | None, steps: int,
               chunked: bool, offload: bool, uncast: bool) -> None:
    import torch

    from .stepping import module_names

    optimizer = _optimizer(net, optimizer_name)
    params = [p for p in net.parameters() if p.requires_grad]
    counter.set_phase(0, "inputs")
    # built before the fake mode (lorakit.batches, small real tensors) and counted as on the device
    inputs = batch
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            counter.track(value)
    with module_names(net, counter):
        for step in range(1, steps + 1):
            counter.set_phase(step, "forward")
            with torch.autocast("cpu", dtype=getattr(torch, autocast or "bfloat16"), enabled=autocast is not None), \
                    chunked_loss(net, "cuda") if chunked else contextlib.nullcontext(), \
                    offloaded_activations() if offload else contextlib.nullcontext(), \
                    uncast_lora_inputs(net, uncast):
                out = net(**inputs)
                loss = out.loss if getattr(out, "loss", None) is not None else out[0].float().mean()  # no head
                del out  # its logits and cache are Trainer's to drop at once too
            counter.set_phase(step, "backward")
            loss.backward()
            del loss
            for p in params:
                if p.grad is not None:
                    counter.storages[counter.storage_id(p.grad)].role = "gradients"
            counter.set_phase(step, "optimizer")
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and counter.storage_id(value) is not None:
                        counter.storages[counter.storage_id(value)].role = "optimizer state"
            optimizer.zero_grad(set_to_none=True)
            counter.set_phase(step, "end")
    counter.set_phase(steps, "done")


def _step_flops(net: Any, inputs: dict, autocast: str | None, chunked: bool) -> int:
    import torch

    counter = step_flop_counter()
    with counter, torch.autocast("cpu", dtype=getattr(torch, autocast or "bfloat16"), enabled=autocast is not None), \
            chunked_loss(net, "cuda") if chunked else contextlib.nullcontext():
        out = net(**inputs)
        loss = out.loss if getattr(out, "loss", None) is not None else out[0].float().mean()
        del out
        loss.backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def step_flop_counter() -> Any:
    """torch's FlopCounterMode, quiet, taught the FLOPs of torch's chunked cross-entropy (it computes the logits
    and the gradients in its forward: one matmul over the head, one more per gradient it computes)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    if hasattr(torch.nn.functional, "linear_cross_entropy"):
        import torch.nn.modules.linear_cross_entropy  # noqa: F401  (registers the op; torch imports it on first use)

        chunked = torch.ops.torch_nn._linear_cross_entropy_batch_chunked
        def chunked_flops(hidden_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
            rows, features = hidden_shape
            return 2 * rows * features * weight_shape[0] * (1 + bool(args[-3]) + bool(args[-2]))
        mapping[chunked] = mapping[chunked.default] = chunked_flops  # the overload too, or the mode decomposes it
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _summarise(counter: Any, setup: int, name: str, steps: int) -> Simulation:
    from .stepping import replay

    found = replay(counter, CachingAllocator())
    return Simulation(model=name, settings={}, setup_allocated=setup, **found)
