"""One training step as `LoraTrainer` runs it, on the tensors the model holds (fake for the simulator, real
for its tests): the optimizer Trainer builds, the forward under autocast with LoraTrainer's levers and the
task's loss, backward, clipping, the optimizer step, zero_grad; and the FLOPs of a step."""

from __future__ import annotations

import contextlib
import math
from typing import Any

from . import zero_replay
from .levers import chunked_loss, offloaded_activations, uncast_lora_inputs
from .tiled_mlp import tiled_mlp
from .stepping import module_names


def _loss(net: Any, inputs: dict, autocast: str | None, chunked: bool, offload: bool, call: Any = None) -> Any:
    """`call`: what runs the forward, if not `net` itself (DeepSpeed's engine around it)."""
    import torch

    with torch.autocast("cpu", dtype=getattr(torch, autocast or "bfloat16"), enabled=autocast is not None), \
            chunked_loss(net, "cuda") if chunked else contextlib.nullcontext(), \
            offloaded_activations() if offload else contextlib.nullcontext():
        out = (call or net)(**inputs)
        loss = out.loss if getattr(out, "loss", None) is not None else out[0].float().mean()  # no head
        del out  # its logits and cache are Trainer's to drop at once too
    return loss


def optimizer_for(net: Any, optimizer: str) -> Any:
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


def run_steps(net: Any, batch: dict, counter: Any, optimizer_name: str, autocast: str | None, steps: int,
               chunked: bool, offload: bool, uncast: bool, engine: Any = None, tiled: bool = False,
               replayed_tiles: int | None = None) -> None:
    """`engine`: DeepSpeed's, around `net` (`zero_replay`); it runs the backward, clipping and the step.
    `tiled`: the MLPs run in tiles (`tiled_mlp`), of which only `replayed_tiles` are computed on fake tensors."""
    import torch

    optimizer = optimizer_for(net, optimizer_name) if engine is None else None
    params = [p for p in net.parameters() if p.requires_grad]
    counter.set_phase(0, "inputs")
    # built before the fake mode (lorakit.model.batches, small real tensors) and counted as on the device
    inputs = batch
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            counter.track(value)
    # LoRA inputs stay uncast, and MLPs tiled, in backward too: checkpointing recomputes the forward there
    with module_names(net, counter), uncast_lora_inputs(net, uncast), \
            tiled_mlp(net, replayed_tiles) if tiled else contextlib.nullcontext():
        for step in range(1, steps + 1):
            counter.set_phase(step, "forward")
            loss = _loss(net, inputs, autocast, chunked, offload, engine)
            counter.set_phase(step, "backward")
            loss.backward() if engine is None else engine.backward(loss)
            del loss
            if engine is not None:
                counter.set_phase(step, "optimizer")
                zero_replay.label(engine, counter)
                engine.step()  # clips, steps and zeroes the gradients
                zero_replay.label(engine, counter)
                counter.set_phase(step, "end")
                continue
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


def step_flops(net: Any, inputs: dict, autocast: str | None, chunked: bool, engine: Any = None,
               tiled: bool = False) -> int:
    """One step's FLOPs (forward, backward with its recomputation), in a step of its own: FlopCounterMode beside
    LiveBytes changes what checkpointing keeps. `engine`: DeepSpeed's, around `net`."""
    counter = step_flop_counter()
    with counter, tiled_mlp(net) if tiled else contextlib.nullcontext():
        loss = _loss(net, inputs, autocast, chunked, False, engine)
        loss.backward() if engine is None else engine.backward(loss)
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
    gemm_4bit = getattr(getattr(torch.ops, "bitsandbytes", None), "gemm_4bit", None)
    if gemm_4bit is not None:  # a 4-bit matmul: A [..., in] x the dequantized weight [out, in]
        def gemm_4bit_flops(a_shape, packed_shape, shape, *args, out_shape=None, **kwargs) -> int:
            return 2 * math.prod(a_shape[:-1]) * shape[0] * shape[1]
        mapping[gemm_4bit] = mapping[gemm_4bit.default] = gemm_4bit_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)
