"""The tiled MLP, a memory lever of `LoraTrainer` that `simulate` replays with the same code.

A decoder block's MLP acts on each position alone, so it may run over the sequence in tiles: an autograd
function runs each tile's forward without a graph and recomputes it, one tile at a time, in backward (with the
same random state and autocast), so only the tiles' outputs, written into one tensor, and their input (the
block's own) outlive it. A long sequence's gate, up and activation tensors (3 x intermediate size per
token) then never exist whole: the backward peak is one tile's. The tiles are as long as the model is wide
(ALST's and Liger's TiledMLP choice), never fewer than two. The result is exact: the same outputs, and gradients
summed over tiles instead of in one matmul. It costs one more MLP forward per step, recomputed in backward.

It applies to the repeated blocks' position-wise MLPs (LoRA on gate/up/down and 4-bit bases included); an MoE
block, whose routing and auxiliary loss see all tokens together, or a feed-forward module that is not an MLP
of Linear layers, is refused with the reason (`tiled_mlp_blocker`).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

from ..core.errors import LorakitError
from ..spec.names import adaptable_kind, expert_tensors, is_router
from ..spec.zoo import find_block_lists, preset_for


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


FEED_FORWARD = ("mlp", "feed_forward", "ffn", "block_sparse_moe")  # a block's feed-forward child, by name


def block_mlps(model: Any) -> dict[str, Any]:
    """The feed-forward module of each repeated block, by name: the child named like one (`FEED_FORWARD`), or
    whose class says MLP or MoE."""
    base = _base(model)
    modules = dict(base.named_modules())
    found = {}
    for stack in find_block_lists(base, preset_for(base)):
        for index, block in enumerate(modules[stack]):
            for name, child in block.named_children():
                kind = type(child).__name__.lower()
                if name in FEED_FORWARD or kind.endswith(("mlp", "moe", "moeblock")):
                    found[f"{stack}.{index}.{name}"] = child
    return found


def tiled_mlp_blocker(model: Any) -> str | None:
    """None when every repeated block's MLP can run in tiles; else the reason it cannot."""
    mlps = block_mlps(model)
    if not mlps:
        return f"{type(_base(model)).__name__} has no MLP in its repeated blocks to tile"
    for name, mlp in mlps.items():
        parts = list(mlp.modules())
        if hasattr(mlp, "experts") or any(expert_tensors(m) or is_router(m) for m in parts):
            return (f"{name} is a mixture-of-experts block: its routing (and auxiliary loss) sees all tokens "
                    "together, so it does not run in tiles")
        weighted = [m for m in parts if not list(m.children()) and list(m.parameters(recurse=False))]
        if not weighted or any(adaptable_kind(m) not in ("Linear", "Conv1D") for m in weighted):
            return (f"{name} ({type(mlp).__name__}) is not an MLP of Linear layers, so lorakit cannot tell that it "
                    "acts on each position alone")
    return None


def use_tiled_mlp(model: Any, wanted: bool | None) -> tuple[bool, str | None]:
    """(tile the MLPs?, why not): `wanted` True insists (a model that cannot is a LorakitError), None means
    wherever they can, False never."""
    if wanted is False:
        return False, None
    why_not = tiled_mlp_blocker(model)
    if why_not and wanted:
        raise LorakitError(f"the tiled MLP cannot apply: {why_not}", hint="train without tiled_mlp=True")
    return why_not is None, why_not


def tile_count(seq_len: int, hidden_size: int) -> int:
    """Tiles as long as the model is wide, at least two."""
    return max(2, math.ceil(seq_len / max(1, hidden_size)))


def _spans(length: int, tiles: int) -> list[tuple[int, int]]:
    bounds = [round(i * length / tiles) for i in range(tiles + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class _TiledMLP:
    """The autograd function, built on first use (importing torch at lorakit's import would not be cheap)."""

    function: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.function is None:
            cls.function = _make_function()
        return cls.function


def _make_function() -> Any:
    import torch

    def rng_state(device: Any) -> tuple:
        return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    class TiledMLP(torch.autograd.Function):
        """forward: the MLP tile by tile without a graph, its input kept; backward: each tile again with its
        graph (the same random state and autocast as in forward), its gradient sent back at once: parameters
        get theirs accumulated as usual, the input its slice."""

        @staticmethod
        def forward(ctx: Any, hidden: Any, forward: Any, spans: list, run: int | None, *params: Any) -> Any:
            ctx.forward, ctx.spans = forward, spans[:run]
            ctx.autocast = [(d, torch.get_autocast_dtype(d)) for d in ("cpu", "cuda") if torch.is_autocast_enabled(d)]
            ctx.rng = []
            ctx.save_for_backward(hidden)
            out, values = None, hidden.detach()  # no view of a tensor that needs a gradient, without its graph
            with torch.no_grad():
                for start, stop in ctx.spans:
                    ctx.rng.append(rng_state(hidden.device))
                    tile = forward(values[..., start:stop, :])
                    if out is None:
                        out = tile.new_empty((*hidden.shape[:-1], tile.shape[-1]))  # every tile's output
                    out[..., start:stop, :] = tile
                    del tile
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple:
            (hidden,) = ctx.saved_tensors
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            devices = [hidden.device] if hidden.device.type == "cuda" else []
            for (start, stop), (cpu_state, device_state) in zip(ctx.spans, ctx.rng):
                with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as casts:
                    torch.set_rng_state(cpu_state)
                    if device_state is not None:
                        torch.cuda.set_rng_state(device_state, hidden.device)
                    for device, dtype in ctx.autocast:
                        casts.enter_context(torch.autocast(device, dtype=dtype))
                    with torch.enable_grad():
                        part = hidden[..., start:stop, :].detach().requires_grad_(grad_hidden is not None)
                        tile = ctx.forward(part)
                torch.autograd.backward(tile, grad[..., start:stop, :])
                if grad_hidden is not None:
                    grad_hidden[..., start:stop, :] = part.grad
                del tile, part
            return (grad_hidden, None, None, None) + (None,) * (len(ctx.needs_input_grad) - 4)

    return TiledMLP


def _tiled_forward(mlp: Any, forward: Any, run: int | None, hidden: Any) -> Any:
    import torch

    if hidden.dim() < 2 or hidden.shape[-2] < 2 or not torch.is_grad_enabled():
        return forward(hidden)
    spans = _spans(hidden.shape[-2], tile_count(hidden.shape[-2], hidden.shape[-1]))
    trained = [p for p in mlp.parameters() if p.requires_grad]  # so that the output needs a gradient
    return _TiledMLP.get().apply(hidden, forward, spans, run, *trained)


@contextlib.contextmanager
def tiled_mlp(model: Any, run: int | None = None) -> Iterator[None]:
    """Within the block, every repeated block's MLP runs over the sequence in tiles (see the module docstring).
    `run`: compute only the first `run` tiles of each MLP, the simulator's replay on fake tensors, which have no
    values to get wrong: every tile allocates and frees the same, so two tell the peak (FLOPs are counted apart,
    with every tile)."""
    use_tiled_mlp(model, True)  # a model whose MLPs cannot run in tiles is refused with the reason
    mlps = list(block_mlps(model).values())
    for mlp in mlps:
        mlp.forward = functools.partial(_tiled_forward, mlp, type(mlp).forward.__get__(mlp), run)
    try:
        yield
    finally:
        for mlp in mlps:
            del mlp.forward
