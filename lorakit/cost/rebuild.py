"""The model a simulation trains: its config, class and task from a config, a name or a model in memory;
built with the attention asked for, or the model's own; LayerDrop off; checkpointing as `LoraTrainer` turns
it on; and whether its blocks are identical, so that 2 and 3 of them tell the rest (`simulate`)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any

from ..core.errors import LorakitError, SpecError
from ..model.load import resolve_config
from ..model.tasks import auto_class, check_task, task_from_config, with_architectures
from ..plan.make import make_plan, model_task
from ..plan.state import state_of


def uniform_blocks(config: Any, cls: Any, dtype: Any, trust_remote_code: bool, freeze: Any, lora: Any) -> int | None:
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
        small = build(cls, with_blocks(config, 3), dtype, "eager", trust_remote_code)
    stacks = [m for m in small.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == 3]
    if len(stacks) != 1:
        return None
    shapes = [[(n, type(m).__name__, tuple(p.shape)) for n, m in block.named_modules() for p in
               m.parameters(recurse=False)] for block in stacks[0]]
    return blocks if shapes[0] == shapes[1] == shapes[2] else None


def with_blocks(config: Any, count: int) -> Any:
    import copy

    config = copy.copy(config)
    config.num_hidden_layers = count
    return config


def architecture(model: Any, task: str | None, trust_remote_code: bool) -> tuple[Any, Any, str, str]:
    """(config, class to build, name, task) for a config, a name, or a model in memory."""
    check_task(task)
    if hasattr(model, "named_parameters"):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not hasattr(base, "config") or not hasattr(type(base), "_from_config"):
            raise LorakitError(f"cannot simulate a {type(base).__name__}: only transformers models rebuild "
                               "from their config", hint="pass the model's config or its name")
        return base.config, Rebuild(type(base)), type(base).__name__, task or model_task(base)
    config, source = resolve_config(model, trust_remote_code=trust_remote_code)
    task = task or task_from_config(config)
    return config, auto_class(task), source.id, task


def specs_of(model: Any, lora: Any, freeze: Any, quant: Any, preset: str | None) -> tuple[Any, Any, Any, Any]:
    """(lora, freeze, quant, preset) to simulate: a model in memory brings its own. A wrapped one, its Plan's
    (a spec given beside it is refused, as `report` refuses it); one loaded quantized, the Quant of its
    bitsandbytes layers, as its Plan says."""
    if not hasattr(model, "named_parameters"):
        return lora, freeze, quant, preset
    state = state_of(model)
    if state is None:
        return lora, freeze, quant or make_plan(model, quant=quant).quant, preset
    if lora or freeze or quant:
        raise SpecError("this model is already wrapped; its own spec is simulated",
                        hint="pass the unwrapped model (or a config) to simulate other specs")
    plan = state.plan
    return plan.lora, plan.freeze, plan.quant, plan.preset


def build(cls: Any, config: Any, dtype: Any, attn: str, trust_remote_code: bool) -> Any:
    """The model with the attention asked for, or the model's own when it has no such implementation
    (Gemma 2, gpt-oss and BLOOM have no sdpa; Mamba, ConvNeXt and ResNet no attention at all)."""
    config = with_architectures(config)
    try:
        return cls.from_config(config, dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "attention implementation" not in str(exc) and "attn_implementation" not in str(exc):
            raise
        return cls.from_config(config, dtype=dtype, attn_implementation="eager", trust_remote_code=trust_remote_code)


class Rebuild:
    """`from_config` for a model class in memory (keeps subclasses and custom modules)."""

    def __init__(self, cls: Any) -> None:
        self.cls = cls

    def from_config(self, config: Any, **kwargs: Any) -> Any:
        kwargs.pop("trust_remote_code", None)
        return self.cls._from_config(config, **kwargs)


def config_dtype(config: Any) -> Any:
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


def without_layerdrop(config: Any) -> tuple[Any, list[str]]:
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
def without_value_checks() -> Iterator[None]:
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


@contextlib.contextmanager
def unpadded_unpacked_rows() -> Iterator[None]:
    """transformers decides from the batch's values whether attention needs a mask: rows packed together (from
    the position ids), padding (from the 2D attention mask). Fake tensors have no values, so it would build the
    full (batch, 1, S, S) mask that a real run of lorakit's sample batch, one unpadded sequence a row, never
    holds, and send sdpa to a kernel that takes one. Here it answers as for that batch: no packing, no padding.
    Masks that are real stay: eager attention's, sliding windows' (Mistral's, Gemma 2's)."""
    from transformers import masking_utils
    from transformers.utils.import_utils import is_fake_tensor

    saved = {name: getattr(masking_utils, name) for name in
             ("find_packed_sequence_indices", "_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa")}

    def unpadded(original: Any) -> Any:
        def check(padding_mask: Any, *args: Any, **kwargs: Any) -> bool:
            return original(None if is_fake_tensor(padding_mask) else padding_mask, *args, **kwargs)
        return check

    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    masking_utils._ignore_causal_mask_sdpa = unpadded(saved["_ignore_causal_mask_sdpa"])
    masking_utils._ignore_bidirectional_mask_sdpa = unpadded(saved["_ignore_bidirectional_mask_sdpa"])
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(masking_utils, name, value)


def position_warning(config: Any, seq_len: int) -> list[str]:
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and seq_len > limit:
        text = (f"seq_len {seq_len} is beyond this model's max_position_embeddings ({limit}); "
                "simulated anyway, but the model was not trained for it")
        warnings.warn(text, stacklevel=3)
        return [text]
    return []
