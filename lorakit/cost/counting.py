"""Counting live bytes while a training step runs: the engine under `lorakit.cost.simulate`.

`LiveBytes` is a TorchDispatchMode that sees every tensor an ATen op returns
(below autograd, so what autograd saves for backward is seen too), keys it by
its storage and drops it when the storage dies (a weakref callback, the way
torch.distributed._tools.mem_tracker does it). It works the same on real and on
fake tensors, which is how the tests check the fake count against a real one.

`cuda_kernels` makes CPU-dispatched ops keep what
the CUDA kernels keep: dropout saves a 1-byte mask (CUDA's fused
`native_dropout`) instead of a same-dtype noise tensor (CPU's), and autocast's
CUDA float32 list (softmax, log_softmax, layer_norm, group_norm without an
explicit dtype) upcasts as it does on a GPU. MoE experts in another dtype than
bf16 go through transformers' own grouped-matmul fallback op (which has fake
kernels) instead of torch's grouped_mm, whose meta kernel takes bf16 only;
both keep the same tensors: all S x top_k routed rows, however tokens spread
over the experts, so the figure needs no routing assumption.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedOperatorException,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..core.errors import LorakitError
from .allocator import round_size
from .levers import OFFLOAD_HOST

# cuBLAS takes one workspace per (handle, stream) from the caching allocator: one for the forward
# thread, one for the autograd thread. 32 MiB each on Hopper and newer (torch's default there).
CUBLAS_WORKSPACE = 32 << 20
_CUBLAS_OPS = {"mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "addmv", "mv"}


@dataclass
class Storage:
    size: int       # bytes the CUDA allocator charges (rounded)
    step: int       # 0: setup
    phase: str      # setup | forward | backward | optimizer | workspace
    module: str     # module running when it was created ("" outside modules)
    op: str = ""    # the op that made it
    role: str = ""  # gradients | optimizer state, when known


class LiveBytes(TorchDispatchMode):
    """Live storage bytes over time, as an event log: (+key) allocations and (-key) frees."""

    def __init__(self, round_bytes: bool = True, cuda: bool = True, open_custom_ops: bool = False) -> None:
        """`open_custom_ops`: run a Python custom op's own implementation inside the count, so that what it
        allocates inside itself is seen too (real tensors: benchmarks; the simulator models those instead)."""
        super().__init__()
        self.round_bytes, self.cuda, self.open_custom_ops = round_bytes, cuda, open_custom_ops
        self.host_live = self.host_peak = 0  # activations offloaded to host memory (`levers.offloaded_activations`)
        self.storages: dict[int, Storage] = {}
        self.events: list[int] = []  # +key / -key, in order
        self._refs: dict[int, weakref.ref] = {}
        self._sids: dict[int, list[int]] = {}
        self._next = 1
        self.live = self.peak = 0
        self.step, self.phase = 0, "setup"
        self.modules: list[str] = [""]
        self.marks: list[tuple[int, int, str]] = []  # (event index, step, phase) where a phase starts
        self._workspaces: set[str] = set()
        self.current_op = ""
        self.role = ""  # a role for everything allocated meanwhile (FSDP's gathered weights: `per_gpu.counted`)

    def set_phase(self, step: int, phase: str) -> None:
        self.step, self.phase = step, phase
        self.marks.append((len(self.events), step, phase))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.current_op = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        if self.cuda and self.current_op in _CUBLAS_OPS and self.phase in ("forward", "backward") \
                and self.phase not in self._workspaces:
            self._workspaces.add(self.phase)
            self.add(CUBLAS_WORKSPACE, "workspace")
        definition = _custom_op(func) if self.open_custom_ops else None
        # an opened op shows its own buffers; else what CUDA's kernel keeps inside is added for its duration
        transient = self._cuda_transient(func, args) if self.cuda and definition is None else 0
        if transient:
            key = self.add(transient, self.phase)
        try:
            if definition is not None:
                with self:
                    out = definition._init_fn(*args, **(kwargs or {}))
            else:
                out = func(*args, **(kwargs or {}))
        except (UnsupportedOperatorException, DataDependentOutputException, DynamicOutputShapeException) as exc:
            where = self.modules[-1] or "outside any module"
            raise LorakitError(f"{func} cannot run on fake tensors ({type(exc).__name__}: it has no fake/meta "
                               f"kernel, or needs tensor values); it ran in {where} during {self.phase}",
                               hint="register a fake kernel for it (torch.library.register_fake), or simulate "
                               "a model without this module") from None
        if transient:
            self.remove(key)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.track(tensor)
        return out

    def _cuda_transient(self, func, args) -> int:
        """Bytes a CUDA kernel allocates inside itself that the CPU (or fake) kernel does not show."""
        name = str(func)
        if name.startswith("bitsandbytes.gemm_4bit"):
            # bitsandbytes' CUDA gemm_4bit, past a few rows, dequantizes the weight then calls F.linear
            a, shape = args[0], args[2]
            return round_size(shape[0] * shape[1] * a.element_size())
        if name.startswith("torch_nn._linear_cross_entropy_batch_chunked."):
            return _chunked_loss_buffers(*args)
        return 0

    def track(self, tensor: torch.Tensor) -> None:
        tensor = _local(tensor)
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):  # sparse or other storage-less tensors
            return
        key = id(storage)
        ref = self._refs.get(key)
        if ref is not None and ref() is storage:
            return
        nbytes = storage.nbytes()
        size = round_size(nbytes) if self.round_bytes else nbytes
        if OFFLOAD_HOST["active"]:  # a copy in host memory: not the device's
            self.host_live += size
            self.host_peak = max(self.host_peak, self.host_live)
            self._refs[key] = weakref.ref(storage, lambda _, k=key, n=size: self._host_dead(k, n))
            return
        cell = [self.add(size, self.phase)]  # the storage's current id; 0 while resized to nothing
        self._refs[key] = weakref.ref(storage, lambda _, k=key, c=cell: self._dead(k, c))
        self._sids[key] = cell

    def elsewhere(self, tensor: torch.Tensor) -> None:
        """`tensor`'s storage is not on the device (ZeRO-3's whole parameters, which zero.Init partitions as
        each module is built): seen, never counted, unless `resized` says it holds bytes there after all."""
        storage = _local(tensor).untyped_storage()
        cell = [0]
        self._refs[id(storage)] = weakref.ref(storage, lambda _, k=id(storage), c=cell: self._dead(k, c))
        self._sids[id(storage)] = cell

    def resized(self, tensor: torch.Tensor) -> None:
        """`tensor`'s storage was resized in place (FSDP2 frees and re-allocates its gathered parameters with
        `storage.resize_`, which no op reports): count its new size from now on."""
        storage = _local(tensor).untyped_storage()
        key = id(storage)
        ref, cell = self._refs.get(key), self._sids.get(key)
        if ref is None or ref() is not storage or cell is None:
            if storage.nbytes():
                self.track(tensor)
            return
        if cell[0]:
            self.remove(cell[0])
        nbytes = storage.nbytes()
        cell[0] = self.add(round_size(nbytes) if self.round_bytes else nbytes, self.phase) if nbytes else 0

    def add(self, size: int, phase: str) -> int:
        sid = self._next
        self._next += 1
        self.storages[sid] = Storage(size, self.step, phase, self.modules[-1], self.current_op, self.role)
        self.events.append(sid)
        self.live += size
        self.peak = max(self.peak, self.live)
        return sid

    def remove(self, sid: int) -> None:
        self.events.append(-sid)
        self.live -= self.storages[sid].size

    def _host_dead(self, key: int, size: int) -> None:
        if key not in self._sids and (ref := self._refs.get(key)) is not None and ref() is None:
            del self._refs[key]  # unless a device storage took the id since, as _dead guards too
        self.host_live -= size

    def _dead(self, key: int, cell: list[int]) -> None:
        if self._sids.get(key) is cell:  # unless a new storage took the id since
            del self._refs[key], self._sids[key]
        if cell[0]:
            self.remove(cell[0])

    def storage_id(self, tensor: torch.Tensor) -> int | None:
        """The id this counter gave `tensor`'s storage, or None if it never saw it."""
        storage = _local(tensor).untyped_storage()
        ref, cell = self._refs.get(id(storage)), self._sids.get(id(storage))
        return (cell[0] or None) if ref is not None and ref() is storage and cell is not None else None


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's own shard (FSDP2's DTensors): what this rank's device holds."""
    local = getattr(tensor, "_local_tensor", None)
    return local if isinstance(local, torch.Tensor) else tensor


def _custom_op(func) -> Any:
    """The Python definition of a `torch.library.custom_op` (such as torch's chunked cross-entropy), if any."""
    from torch._library.custom_ops import OPDEFS

    name = func.name() if hasattr(func, "name") else ""
    return OPDEFS.get(name.partition(".")[0]) if "::" in name else None


def _chunked_loss_buffers(hidden, weight, target, bias, class_weight, reduction, ignore_index, smoothing, rows,
                          policy, accumulate, *flags) -> int:
    """What torch's chunked linear_cross_entropy allocates inside itself on CUDA (its `_ChunkContext`), beyond
    the gradients it returns: one chunk of logits in the accumulator's dtype, their 16-bit copy for the input
    gradient's matmul, and a float32 weight-gradient scratch unless the policy is "compact"; vectors of one
    value per row are left out."""
    rows, classes = min(rows, hidden.shape[0]), weight.shape[0]
    mixed = accumulate != hidden.dtype
    memory_like = policy in ("balanced", "compact")
    logits_size = hidden.element_size() if not mixed or (hidden.dtype == torch.float16 and memory_like) \
        else accumulate.itemsize
    total = round_size(rows * classes * logits_size)
    if mixed and logits_size != hidden.element_size():
        total += round_size(rows * classes * hidden.element_size())
    weight_gradient = flags[2] if len(flags) > 2 else False
    if weight_gradient and policy != "compact":
        total += round_size(weight.numel() * accumulate.itemsize)
    return total


_FP32_ON_CUDA = ("softmax", "log_softmax")  # with no explicit dtype
_NORMS_FP32_ON_CUDA = ("layer_norm", "group_norm")


@contextlib.contextmanager
def cuda_kernels():
    """See the module docstring. Functions of torch.nn.functional are swapped for the duration (not a
    TorchFunctionMode: the autograd engine does not carry one into checkpoint recomputation)."""
    functional = torch.nn.functional
    originals = {name: getattr(functional, name) for name in ("dropout",) + _FP32_ON_CUDA + _NORMS_FP32_ON_CUDA}

    def dropout(x, p=0.5, training=True, inplace=False):
        if training and 0 < p < 1 and not inplace and x.numel() > 0:
            return torch.native_dropout(x, p, True)[0]
        return originals["dropout"](x, p, training, inplace)

    def upcast_softmax(name):
        def run(x, dim=None, _stacklevel=3, dtype=None):
            if dtype is None and x.dtype in _LOW and torch.is_autocast_enabled("cpu"):
                dtype = torch.float32
            return originals[name](x, dim=dim, _stacklevel=_stacklevel, dtype=dtype)
        return run

    def upcast_norm(name):
        def run(x, *args, **kwargs):
            if x.dtype in _LOW and torch.is_autocast_enabled("cpu"):
                with torch.autocast("cpu", enabled=False):
                    args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
                    kwargs = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                              for k, v in kwargs.items()}
                    return originals[name](x.float(), *args, **kwargs)
            return originals[name](x, *args, **kwargs)
        return run

    replacements = {"dropout": dropout, **{n: upcast_softmax(n) for n in _FP32_ON_CUDA},
                    **{n: upcast_norm(n) for n in _NORMS_FP32_ON_CUDA}}
    from transformers.integrations import moe

    can_use_grouped_mm = moe._can_use_grouped_mm
    try:
        for name, function in replacements.items():
            setattr(functional, name, function)
        moe._can_use_grouped_mm = lambda input, weight, offs: (weight.dtype == torch.bfloat16
                                                               and can_use_grouped_mm(input, weight, offs))
        yield
    finally:
        for name, function in originals.items():
            setattr(functional, name, function)
        moe._can_use_grouped_mm = can_use_grouped_mm


_LOW = (torch.bfloat16, torch.float16)
