"""Memory levers that `LoraTrainer` pulls and `simulate` models with the same code.

* **Chunked causal-LM loss.** The model's own forward runs with `lm_head`
  passing its input through, and with its `loss_function` replaced by torch's
  `linear_cross_entropy` over `lm_head`'s weight in chunks: the
  `[tokens, vocab]` logits, their float32 upcast and the log-softmax backward
  never exist at once. Everything else the forward does is kept as it is
  (label shift, `-100`, `num_items_in_batch`, an MoE's auxiliary loss, a
  linear logit scale, which commutes with the head). Where the forward does
  something to the logits that does not commute with the head (Gemma-2's
  soft-capping, a sliced vocabulary), where `lm_head` carries LoRA, is
  quantized or trained in full, or where torch has no `linear_cross_entropy`,
  the standard loss runs instead and `chunked_loss_blocker` says why.
* **LoRA inputs left in the autocast dtype.** peft casts a LoRA layer's input
  to its float32 weights' dtype; under autocast the matmul casts it straight
  back to 16 bits, so the float32 copy (448 MiB per `down_proj` of an 8B
  model at 8k tokens) buys nothing. peft's bitsandbytes LoRA layers skip that
  cast under autocast already; `uncast_lora_inputs` does it for all, through
  peft's own switch.
* **Activation offload.** Tensors saved for backward during the forward are
  copied to host memory and back when backward needs them: under gradient
  checkpointing these are above all the checkpointed layer inputs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Iterator
from typing import Any

from ..core.errors import LorakitError

# What a forward may do to the logits between `self.lm_head(...)` and its loss: linear scales, which give the
# same logits when applied to the head's input (lm_head has no bias), and the lines around them.
_KEPT_LINES = re.compile(r"^(#.*|loss = None|if labels is not None:|logits = logits \* self\.logit_scale.*|"
                         r"logits = logits / self\.config\.logits_scaling.*|)$")
_SCALES = ("logit_scale", "logits_scaling")
_SOFTCAP_BRANCH = re.compile(r"^if .*final_logit_softcapping.* is not None:$")
MIN_CHUNK_ROWS = {"cpu": 256}  # else 16
OFFLOAD_HOST = {"active": False}  # set while lorakit's offload copies a tensor to the host (counting reads it)


def _base(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def chunked_loss_blocker(model: Any) -> str | None:
    """None when the chunked loss computes exactly what the model's forward would; else the reason it cannot."""
    import torch

    if not hasattr(torch.nn.functional, "linear_cross_entropy"):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy (torch >= 2.13 does)"
    base = _base(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is None:
        return f"{type(base).__name__} has no output embeddings (lm_head)"
    if type(head) is not torch.nn.Linear:
        what = ("carries LoRA" if hasattr(head, "lora_A") else "is trained in full (modules_to_save)"
                if hasattr(head, "modules_to_save") else f"is a {type(head).__name__}")
        return f"lm_head {what}: its logits come from more than one weight"
    if "_loss_function" in vars(base):
        return "the model has a loss_function of its own"
    text = getattr(base.config, "get_text_config", lambda: base.config)()
    if getattr(text, "final_logit_softcapping", None) is not None:
        return "its logits are soft-capped (tanh), which the chunked loss cannot apply"
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        return "the source of its forward is not available to check what it does after lm_head"
    _, call, after = source.partition("self.lm_head(")
    block, found, _ = after.partition("self.loss_function(")
    if not call or not found:
        return "its forward does not compute the loss with self.loss_function over self.lm_head's output"
    unknown = [line for line in _unskipped(block.splitlines()[1:-1]) if not _KEPT_LINES.match(line)]
    if unknown:
        return f"its forward changes the logits after lm_head ({unknown[0]!r})"
    if head.bias is not None and any(scale in block for scale in _SCALES):
        return "its logits are scaled after an lm_head with a bias"
    return None


def _unskipped(lines: list[str]) -> Iterator[str]:
    """The stripped lines that can run: a soft-capping branch is dead code once the config has no soft-cap."""
    dead_below = None
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if dead_below is not None and (indent > dead_below or not line.strip()):
            continue
        dead_below = indent if _SOFTCAP_BRANCH.match(line.strip()) else None
        if dead_below is None:
            yield line.strip()


def use_chunked_loss(model: Any, task: str, asked: bool | None, blocker: str | None = None) -> tuple[bool, str | None]:
    """Whether a training step of `model` uses the chunked loss, as `LoraTrainer` and `simulate` decide it:
    (yes or no, why not). `asked` is the user's chunked_loss (None: wherever it gives the standard loss);
    `blocker`, a reason of the caller's own. Asked for where it cannot be: a `LorakitError` with the fix."""
    if asked is False:
        return False, None
    if task != "causal-lm":
        if asked:
            raise LorakitError(f"chunked_loss=True is a causal-LM loss; this model's task is {task}",
                               hint="leave chunked_loss unset: the model's own loss is used")
        return False, None
    blocker = chunked_loss_blocker(model) or blocker
    if blocker and asked:
        raise LorakitError(f"chunked_loss=True, but it would not give this model's loss: {blocker}",
                           hint="leave chunked_loss unset to train with the standard loss")
    return blocker is None, blocker


def chunked_loss_options(device_type: str, dtype: Any, rows: int, features: int, classes: int) -> Any:
    """torch's chunking options as its "auto" picks them for this device and dtype (the simulator asks for
    CUDA's on its CPU fakes), with a float32 accumulator for 16-bit inputs, as the standard loss's upcast, and
    chunks of at least `MIN_CHUNK_ROWS` rows. On the CPU, torch's pick for a small hidden size is a few rows per
    chunk: matrix-vector products, 3.7x slower than the standard loss at 16 rows and 1.05x at 256 (2048 x 256
    inputs, 32k classes), and with single rows 10x further from a float64 reference (real SmolLM2)."""
    import torch
    from torch.nn.modules import linear_cross_entropy_options as options

    policy, chunking = options._AUTO_DEFAULTS.get((device_type, dtype), options._AUTO_FALLBACK)
    accumulate = torch.float32 if dtype in (torch.float16, torch.bfloat16) else None
    auto = torch.nn.LinearCrossEntropyOptions(acc_policy=policy, chunking_method=chunking, acc_dtype=accumulate)
    chunk = auto._adjust(rows, features, classes, dtype).batch_chunk_size  # torch's own heuristic
    return torch.nn.LinearCrossEntropyOptions(acc_policy=policy, chunking_method=None, acc_dtype=accumulate,
                                              batch_chunk_size=max(chunk, min(MIN_CHUNK_ROWS.get(device_type, 16), rows)))


def _chunked_causal_lm_loss(logits: Any, labels: Any, vocab_size: int, *, head: Any, device_type: str | None,
                            num_items_in_batch: Any = None, ignore_index: int = -100, shift_labels: Any = None,
                            **_: Any) -> Any:
    """transformers' ForCausalLMLoss on `lm_head(logits)`, where `logits` are the head's inputs."""
    import torch
    from torch.nn import functional

    hidden, weight = logits, head.weight
    if torch.is_autocast_enabled(hidden.device.type):  # the dtype autocast would run lm_head in
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    if shift_labels is None:
        shift_labels = functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    options = chunked_loss_options(device_type or hidden.device.type, hidden.dtype, *hidden.shape, weight.shape[0])
    reduction = "sum" if num_items_in_batch is not None else "mean"
    with torch.autocast(hidden.device.type, enabled=False):
        loss = functional.linear_cross_entropy(hidden, weight, shift_labels, linear_bias=head.bias,
                                               reduction=reduction, ignore_index=ignore_index, options=options)
    loss = loss.float()  # 16-bit inputs give a 16-bit scalar; the standard loss is float32
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


@contextlib.contextmanager
def chunked_loss(model: Any, device_type: str | None = None) -> Iterator[None]:
    """Within the block, the model's forward returns the chunked loss (and the head's inputs as `logits`).
    `device_type` chooses torch's chunking as on that device (the simulator: "cuda"); default: the inputs'."""
    base = _base(model)
    head = base.get_output_embeddings()
    base.loss_function = functools.partial(_chunked_causal_lm_loss, head=head, device_type=device_type)
    head.forward = _pass_through
    try:
        yield
    finally:
        del head.forward
        del base._loss_function


def _pass_through(hidden: Any) -> Any:
    return hidden


@contextlib.contextmanager
def offloaded_activations() -> Iterator[None]:
    """torch's save_on_cpu, always copying (on a CPU-only machine too, where torch's pinned variant fails), and
    marking its copies as host memory for `counting.LiveBytes`."""
    import torch

    pin = torch.cuda.is_available()

    def pack(tensor: Any) -> tuple[Any, Any]:
        OFFLOAD_HOST["active"] = True
        try:
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, device="cpu",
                               pin_memory=pin and not tensor.is_sparse)
            host.copy_(tensor, non_blocking=pin)
        finally:
            OFFLOAD_HOST["active"] = False
        return tensor.device, host

    def unpack(packed: tuple[Any, Any]) -> Any:
        device, host = packed
        # the copy back to the device; on a host device (the simulator's fakes stand for CUDA) a copy as well
        return host.to(device, non_blocking=pin) if host.device != device else host.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


@contextlib.contextmanager
def uncast_lora_inputs(model: Any, autocast: bool) -> Iterator[None]:
    """Under autocast (`autocast` True), peft's LoRA layers take their inputs in the dtype they come in."""
    if not autocast or not hasattr(model, "peft_config"):
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(model):
        yield
