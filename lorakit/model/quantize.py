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

from ..core.errors import QuantizationError
from ..plan.plan import Plan
from ..spec.names import is_packed
from ..spec.specs import Quant, torch_dtype


def require_bitsandbytes() -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationError("quantization needs bitsandbytes, which is not installed",
                                hint="pip install 'bitsandbytes>=0.48'")


def bnb_config(quant: Quant, skip: list[str] | tuple[str, ...], model_dtype: Any) -> Any:
    """The `BitsAndBytesConfig` for a `Quant` spec and a plan's skip list."""
    import torch
    from transformers import BitsAndBytesConfig

    compute = torch_dtype(quant.compute_dtype) or model_dtype or torch.float32
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(skip))
    storage = {"uint8": torch.uint8, None: torch.uint8}.get(quant.quant_storage) or torch_dtype(quant.quant_storage)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type,
                              bnb_4bit_use_double_quant=quant.double_quant, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_storage=storage, llm_int8_skip_modules=list(skip))


def loftq_factors(weight: Any, quantized: Any, rank: int, scaling: float) -> tuple[Any, Any]:
    """LoftQ's one-step initialisation, as peft's `replace_lora_weights_loftq` does it: (A, B) such that
    scaling·B·A is the best rank-`rank` fit (truncated SVD) of the quantization error W - dequant(Q(W)).
    peft's own code moves every weight to CUDA, so lorakit runs the same steps on the weight's device."""
    import bitsandbytes as bnb
    import torch

    error = weight.float() - bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state).float()
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    return vh[:rank] * root[:, None], u[:, :rank] * root


def quantize(model: Any, plan: Plan) -> tuple[Any, dict[str, tuple[Any, Any]]]:
    """Quantize the plan's Linear (and Conv1D) layers in place and freeze the model (for k-bit training).
    Returns the model and, for a plan with `Lora(init="loftq")`, the LoftQ (A, B) of each 4-bit target."""
    import torch
    from transformers import PreTrainedModel
    from transformers.pytorch_utils import Conv1D

    require_bitsandbytes()
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    quant = plan.quant
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    config = bnb_config(quant, plan.quant_skipped, model_dtype)
    chosen = set(plan.quantized)
    lora = plan.lora
    # LoftQ: the quantized targets only (a target kept in full precision has no rounding error to fit)
    loftq = {t.name: (t.r, t.alpha / (t.r ** 0.5 if lora.use_rslora else t.r)) for t in plan.targets
             if t.name in chosen} if lora is not None and lora.init == "loftq" else {}
    originals = {name: (module.weight.detach(), module.bias, module.training, isinstance(module, Conv1D))
                 for name, module in model.named_modules() if name in chosen}
    device = next(iter(model.parameters())).device
    replace_with_bnb_linear(model, modules_to_not_convert=config.llm_int8_skip_modules, quantization_config=config)
    for name, module in model.named_modules():
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) or name not in originals:
            continue
        weight, bias, training, transposed = originals[name]
        value = weight.T.contiguous() if transposed else weight
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight = bnb.nn.Params4bit(value, requires_grad=False, **module.weight.__dict__).to(device)
            if name in loftq:
                loftq[name] = loftq_factors(value.to(device), module.weight, *loftq[name])
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
    # peft's prepare_model_for_kbit_training freezes the model and upcasts every other 16-bit parameter to
    # float32: on an 8B model the embeddings and lm_head alone are 2 GiB more. They stay in the dtype they were
    # loaded in, as `lorakit.load(quant=...)` / from_pretrained leave them (and TRL and unsloth train them);
    # gradient checkpointing is LoraTrainer's choice (non-reentrant: no input-grad hook needed).
    for param in model.parameters():
        param.requires_grad_(False)
    factors = {name: pair for name, pair in loftq.items() if isinstance(pair[0], torch.Tensor)}
    return model, factors


def dequantize(model: Any, names: tuple[str, ...] | list[str]) -> None:
    """Turn the bitsandbytes layers `names` of a model loaded quantized back into plain Linear layers, in the
    dtype of the model's other weights, with transformers' own dequantization (`dequantize_bnb_weight`)."""
    import torch
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and not is_packed(p)), torch.float32)
    for name in names:
        layer = model.get_submodule(name)
        weight = dequantize_bnb_weight(layer.weight, getattr(layer, "state", None)).to(dtype)
        plain = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                device=weight.device, dtype=dtype)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if layer.bias is not None:
                plain.bias.copy_(layer.bias)
        plain.train(layer.training)
        model.set_submodule(name, plain)
