"""The quantization half of planning: which layers bitsandbytes replaces (`wrap(quant=...)`, `load(quant=...)`),
which it keeps in full precision and why, and a model that arrived quantized, taken as it is."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..core.errors import QuantizationError
from ..spec.names import adaptable_kind, bnb_bits, is_packed, under
from ..spec.specs import Quant


def quant_skips(model: Any, quant: Quant, full: list[str], ruled: dict) -> dict[str, str]:
    """Modules kept in full precision, with the reason: transformers' own skip list (output embeddings,
    tied weights, the last module), `_keep_in_fp32_modules`, what lorakit trains in full, the user's list."""
    from transformers import PreTrainedModel
    from transformers.quantizers.base import get_keys_to_not_convert

    skips = {}
    if isinstance(model, PreTrainedModel):
        skips.update(dict.fromkeys(get_keys_to_not_convert(model), "transformers keeps it unquantized"))
        skips.update(dict.fromkeys(getattr(model, "_keep_in_fp32_modules", None) or [], "kept in fp32 by the model"))
    skips.update(dict.fromkeys(full, "trained in full"))
    skips.update({n: f"kept unquantized: {rule.reason}" for n, rule in ruled.items() if not rule.quantize})
    skips.update(dict.fromkeys(quant.skip_modules, "Quant.skip_modules"))
    return skips


def quantized_layers(model: Any, skip: list[str]) -> list[str]:
    import torch
    from transformers.quantizers.quantizers_utils import should_convert_module

    names = [n for n, m in model.named_modules()
             if (type(m) is torch.nn.Linear or adaptable_kind(m) == "Conv1D") and should_convert_module(n, skip)]
    if not names:
        subclassed = sorted({type(m).__name__ for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                             and type(m) is not torch.nn.Linear and should_convert_module(n, skip)})
        if subclassed:
            raise QuantizationError(f"this model's Linear layers are {', '.join(subclassed)}, subclasses of "
                                    "nn.Linear that transformers' bitsandbytes integration does not replace (it takes "
                                    "nn.Linear and Conv1D only), so neither wrap(quant=...) nor from_pretrained("
                                    "quantization_config=...) would quantize anything",
                                    hint="train it in bf16 without quant=..., or use a checkpoint of this family "
                                         "that transformers quantizes")
        raise QuantizationError("this model has no Linear layer to quantize outside its heads",
                                hint="quantization applies to Linear/Conv1D layers; drop quant=...")
    return names


def as_loaded(model: Any, loaded: Quant, full: list[str],
               ruled: dict) -> tuple[Quant, list[str], dict[str, str], list[str]]:
    """A model that arrived quantized, as it is: (the Quant, which names the Linear / Conv1D layers its loader
    kept in full precision, so that `load(path, quant=plan.quant)` rebuilds the same layers; its bitsandbytes
    layers; the layers in full precision, with why; the 8/4-bit layers that wrap dequantizes: those trained in
    full (transformers quantizes a new classification head with the rest, and a head must learn) and those
    that cannot work quantized, as wrap(quant=...) keeps them)."""
    import torch

    why: dict[str, str] = {}
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear or adaptable_kind(module) == "Conv1D":
            why[name] = "kept in full precision by the quantization the model was loaded with"
    kept = list(why)
    quantized = [n for n, m in model.named_modules() if bnb_bits(m)]
    unfilled = [n for n, m in model.named_modules() if bnb_bits(m) and not is_packed(m.weight)]
    for name in quantized:
        if under(name, full):
            why[name] = "loaded 8/4-bit, and trained in full: wrap dequantizes it (transformers' dequantization)"
        elif name in ruled and not ruled[name].quantize:
            why[name] = f"loaded 8/4-bit; wrap dequantizes it, as it cannot work quantized: {ruled[name].reason}"
    empty = [n for n in unfilled if n not in why]  # a head the checkpoint lacked is new anyway, and trains in full
    if empty:
        raise QuantizationError(f"{len(empty)} bitsandbytes layers of this model hold no quantized weight, e.g. "
                                f"{empty[0]}: the checkpoint did not fill them (transformers read it in another "
                                "layout), so they hold random values",
                                hint="load the full-precision checkpoint with lorakit.load(path, quant=...)")
    dequantized = [n for n in quantized if n in why]
    return (dataclasses.replace(loaded, skip_modules=kept), [n for n in quantized if n not in why], why,
            dequantized)
