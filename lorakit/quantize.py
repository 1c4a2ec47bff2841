"""bitsandbytes quantization of a model already in memory.

transformers only quantizes inside `from_pretrained`. For a model the user
already holds, we do the same two steps it does: swap Linear/Conv1D modules
for bnb layers with `transformers.integrations.replace_with_bnb_linear`, then
build each weight exactly as transformers' `Bnb4bitQuantize` /
`Bnb8bitQuantize` ops do. Same layer types, same quantized bytes as
`lorakit.load(..., quant=...)` (tested).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from .errors import QuantizationError
from .specs import Quant


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError("quantization needs bitsandbytes, which is not installed",
                                hint="pip install 'bitsandbytes>=0.48'")


def is_quantized(model: Any) -> bool:
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    if getattr(model, "hf_quantizer", None) is not None:
        return True
    if importlib.util.find_spec("bitsandbytes") is None or "bitsandbytes" not in _imported():
        return False
    import bitsandbytes as bnb

    return any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())


def _imported() -> set[str]:
    import sys

    return {name.split(".")[0] for name in sys.modules}


def skip_modules(model: Any, quant: Quant, preset: Any = None) -> list[str]:
    """Modules kept in full precision: transformers' defaults (output embeddings,
    tied weights, the last module, `_keep_in_fp32_modules`), everything lorakit trains in full (task heads
    and the head path), and the user's list."""
    from transformers import PreTrainedModel
    from transformers.quantizers.base import get_keys_to_not_convert

    from .wrap import trained_in_full
    from .zoo import preset_for

    skip = set(quant.skip_modules)
    if isinstance(model, PreTrainedModel):
        skip.update(get_keys_to_not_convert(model))
        skip.update(getattr(model, "_keep_in_fp32_modules", None) or [])
    skip.update(trained_in_full(model, preset or preset_for(model), None))
    return sorted(skip)


def check_quantizable(model: Any) -> None:
    require_bitsandbytes()
    if is_quantized(model):
        raise QuantizationError("this model is already quantized",
                                hint="drop quant=..., or start from the full-precision model")


def will_quantize(model: Any, quant: Quant, preset: Any = None) -> list[str]:
    """Names of the modules `quantize` would convert (decided before anything changes)."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = skip_modules(model, quant, preset)
    names = [n for n, m in model.named_modules() if (type(m) is torch.nn.Linear or isinstance(m, Conv1D))
             and should_convert_module(n, skip)]
    if not names:
        raise QuantizationError("this model has no Linear layer to quantize outside its heads",
                                hint="quantization applies to Linear/Conv1D layers; drop quant=...")
    return names


def quantize(model: Any, quant: Quant, preset: Any = None) -> Any:
    """Quantize `model`'s Linear (and Conv1D) layers in place, then prepare it for k-bit training."""
    import torch
    from transformers import PreTrainedModel
    from transformers.pytorch_utils import Conv1D

    check_quantizable(model)
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    from .load import bnb_config

    config = bnb_config(quant, skip_modules(model, quant, preset), model_dtype)
    originals = {name: (module.weight.detach(), module.bias, module.training, isinstance(module, Conv1D))
                 for name, module in model.named_modules() if type(module) is torch.nn.Linear
                 or isinstance(module, Conv1D)}
    device = next(iter(model.parameters())).device
    replace_with_bnb_linear(model, modules_to_not_convert=config.llm_int8_skip_modules, quantization_config=config)
    for name, module in model.named_modules():
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) or name not in originals:
            continue
        weight, bias, training, transposed = originals[name]
        value = weight.T.contiguous() if transposed else weight
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight = bnb.nn.Params4bit(value, requires_grad=False, **module.weight.__dict__).to(device)
        else:
            kwargs = dict(module.weight.__dict__)
            kwargs.pop("SCB", None)
            module.weight = bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, **kwargs).to(device)
        if bias is not None:
            module.bias = torch.nn.Parameter(bias.detach().to(device), requires_grad=False)
        module.train(training)
    flag = "is_loaded_in_4bit" if quant.bits == 4 else "is_loaded_in_8bit"
    setattr(model, flag, True)
    if isinstance(model, PreTrainedModel):
        from transformers.quantizers import AutoHfQuantizer

        model.config.quantization_config = config
        model.hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=False)
    # Gradient checkpointing is a training choice (LoraTrainer's), not a side effect of quantizing.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
