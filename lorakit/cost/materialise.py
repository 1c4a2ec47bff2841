"""A wrapped model on the meta device, made of fake tensors: what the memory simulator trains.

`lorakit.wrap` runs on the meta device (peft, freezing, bitsandbytes layers:
shapes and dtypes, no values; on meta bitsandbytes leaves 4/8-bit weights
unquantized). Then every parameter and buffer becomes a fake tensor under
torch's FakeTensorMode, and each bitsandbytes weight is quantized for real by
bitsandbytes' own ops through their fake kernels: packed storage and quant
state come out with the exact shapes and dtypes a GPU run has. (Building under
FakeTensorMode directly fails: peft's `.to()` swaps fake parameters, and a fake
tensor cannot become a `Params4bit`.)
"""

from __future__ import annotations

from typing import Any


# How a quantized model gets onto the GPU: one text for simulate, fit and the CLI's --quant-path
QUANT_PATHS = {"load": "quantized weight by weight while it loads (lorakit.load(quant=...), "
                       "from_pretrained(quantization_config=...))",
               "wrap": "quantized on the GPU after a full-precision load (wrap(model, quant=...))"}


def materialise(net: Any, loaded_dtype: Any = None, quant_path: str = "load") -> None:
    """Replace every meta parameter and buffer of `net` by a fake one, in place (call under FakeTensorMode).

    `loaded_dtype`, for a quantized model: replay how it got onto the GPU, for the caching allocator's sake.
    quant_path "load" (`lorakit.load(quant=...)`, `from_pretrained(quantization_config=...)`): transformers
    quantizes weight by weight as it loads them, so one weight at a time lives in that dtype before it is
    quantized (or upcast) and freed. "wrap" (`wrap(model, quant=...)` on a model already on the GPU): every
    weight lives in that dtype first, then each is quantized or upcast and the original freed. Freed
    segments stay reserved either way.
    """
    import torch

    def original(param: Any) -> Any:
        if loaded_dtype is not None and (param.is_floating_point() or hasattr(param, "quant_type")):
            return torch.empty(param.shape, dtype=loaded_dtype)
        return None

    whole = {id(p): original(p) for p in net.parameters()} if quant_path == "wrap" else {}
    done: dict[int, Any] = {}  # tied parameters stay tied
    for module in net.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                done[id(param)] = _fake_parameter(param, whole.pop(id(param)) if whole else original(param))
            module._parameters[name] = done[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                if id(buffer) not in done:
                    done[id(buffer)] = torch.empty(buffer.shape, dtype=buffer.dtype)
                module._buffers[name] = done[id(buffer)]
        if hasattr(module, "quant_state") and getattr(module, "weight", None) is not None:
            module.quant_state = getattr(module.weight, "quant_state", None)


def prepare_bitsandbytes(net: Any) -> None:
    """Build bitsandbytes' quantization map for real, once, before fake mode (it is computed with .tolist())."""
    if any(type(p).__name__ in ("Params4bit", "Int8Params") for p in net.parameters()):
        import bitsandbytes as bnb

        if "dynamic" not in bnb.functional.name2qmap:
            bnb.functional.name2qmap["dynamic"] = bnb.functional.create_dynamic_map()


def _fake_parameter(param: Any, original: Any = None) -> Any:
    import torch

    kind = type(param).__name__
    if kind == "Params4bit" and not param.bnb_quantized:
        import bitsandbytes as bnb

        weight = original if original is not None else torch.empty(param.shape, dtype=param.dtype)
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=param.blocksize,
                                                     compress_statistics=param.compress_statistics,
                                                     quant_type=param.quant_type, quant_storage=param.quant_storage)
        del weight, original
        out = torch.nn.Parameter(packed, requires_grad=False)
        for attribute in ("blocksize", "compress_statistics", "quant_type", "quant_storage", "module"):
            setattr(out, attribute, getattr(param, attribute, None))
        out.quant_state, out.bnb_quantized = state, True
        return out
    if kind == "Int8Params" and getattr(param, "CB", None) is None:
        import bitsandbytes as bnb

        weight = torch.empty(param.shape, dtype=torch.float16)
        cb, scb, _ = bnb.functional.int8_vectorwise_quant(weight)
        del weight
        out = torch.nn.Parameter(cb, requires_grad=False)
        out.CB, out.SCB, out.has_fp16_weights = cb, scb, False
        return out
    return torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype), requires_grad=param.requires_grad)


def state_tensors(net: Any) -> list[Any]:
    """Every tensor the model holds: parameters, buffers, and bitsandbytes' quant state and scales."""
    import torch

    out = list(net.parameters()) + list(net.buffers())
    for param in net.parameters():
        state = getattr(param, "quant_state", None)
        while state is not None:
            out += [v for v in (state.absmax, state.code, state.offset) if isinstance(v, torch.Tensor)]
            state = state.state2 if state.nested else None
        scb = getattr(param, "SCB", None)
        if isinstance(scb, torch.Tensor):
            out.append(scb)
    return out
