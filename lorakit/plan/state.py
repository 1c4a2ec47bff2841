"""What lorakit remembers about a model: two small typed records.

* `Source`, set by `lorakit.load`: where the model came from, its task, and
  which weights the checkpoint lacked (new heads, which `wrap` then trains).
* `State`, set by `lorakit.wrap`: the Plan it executed, the source, and the
  fingerprint of the base as loaded. The adapter manifest saves exactly this.

Both live on the model as `model.lorakit_source` / `model.lorakit_state`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..core.errors import QuantizationError
from ..spec.names import bnb_bits, is_packed
from ..spec.specs import Quant
from .plan import Plan


@dataclass(frozen=True)
class Source:
    kind: str                 # "dir", "package", "zoo", "hub", "config"
    id: str                   # portable where possible: a Hub id, or "package:NAME/path" (see load)
    revision: str | None = None
    task: str | None = None
    missing_keys: tuple[str, ...] = ()
    path: str | None = None   # the folder on this machine; not saved (it is not portable)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for local in ("missing_keys", "path"):
            data.pop(local)
        return {k: v for k, v in data.items() if v is not None}


@dataclass(frozen=True)
class State:
    plan: Plan
    source: Source | None
    fingerprint: dict
    # PiSSA/OLoRA: the adapters as initialised, in a temporary folder, so that a final save can turn them into a
    # plain LoRA of the untouched base (peft's path_initial_model_for_weight_conversion). Local: never saved.
    initial_adapter: str | None = None

    def to_dict(self) -> dict:
        return {"plan": self.plan.to_dict(), "source": self.source.to_dict() if self.source else None,
                "fingerprint": self.fingerprint}


def source_of(model: Any) -> Source | None:
    return getattr(model, "lorakit_source", None)


def state_of(model: Any) -> State | None:
    return getattr(model, "lorakit_state", None)


def is_quantized(model: Any) -> bool:
    """Loaded or wrapped with 8/4-bit bitsandbytes layers, or quantized by another of transformers' methods."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return True
    if getattr(model, "hf_quantizer", None) is not None:
        return True
    return any(bnb_bits(m) for m in model.modules())


def loaded_quant(model: Any) -> Quant | None:
    """The `Quant` a model already quantized by bitsandbytes holds (`load(quant=...)`, `from_pretrained(
    quantization_config=BitsAndBytesConfig(...))`, a quantized checkpoint loaded again), read from its layers
    themselves, whatever config they came from; None for a model with no bitsandbytes layer."""
    layers = [m for m in model.modules() if bnb_bits(m) and is_packed(m.weight)]
    if not layers:
        if not is_quantized(model):
            return None
        method = getattr(getattr(getattr(model, "hf_quantizer", None), "quantization_config", None),
                         "quant_method", None)
        method = getattr(method, "value", method)  # transformers' QuantizationMethod enum: "bitsandbytes", ...
        if method == "bitsandbytes":  # Falcon's FalconLinear layers, say: subclasses transformers does not replace
            raise QuantizationError("this model was loaded with a bitsandbytes quantization_config, but none of its "
                                    "layers is quantized: transformers replaces plain nn.Linear and Conv1D layers "
                                    "only", hint="load it without quantization_config and train it in bf16")
        raise QuantizationError(f"this model is quantized{f' by {method}' if method else ''}, and lorakit counts, "
                                "trains and merges bitsandbytes 8/4-bit layers only",
                                hint="load it in full precision, or with lorakit.load(path, quant='4bit')")
    kinds = {_quant_kind(m) for m in layers}
    if len(kinds) > 1:
        raise QuantizationError(f"this model's bitsandbytes layers are quantized in {len(kinds)} different ways "
                                f"({'; '.join(sorted(map(str, kinds)))}), and one Quant spec describes one",
                                hint="load it again with one BitsAndBytesConfig")
    bits, quant_type, double_quant, storage, compute = kinds.pop()
    if bits == 8:
        return Quant(bits=8)
    return Quant(bits=4, quant_type=quant_type, double_quant=double_quant, compute_dtype=compute,
                 quant_storage=None if storage == "uint8" else storage)


def _quant_kind(layer: Any) -> tuple:
    """(bits, quant type, double quantization, storage dtype, compute dtype) of a bitsandbytes layer."""
    weight = layer.weight
    if bnb_bits(layer) == 8:
        return (8, None, None, None, None)
    compute = getattr(layer, "compute_dtype", None)
    return (4, weight.quant_type, bool(weight.compress_statistics), str(weight.dtype).removeprefix("torch."),
            str(compute).removeprefix("torch.") if compute is not None else None)


def is_wrapped(model: Any) -> bool:
    return hasattr(model, "peft_config") or state_of(model) is not None or any(
        "lora_A" in n for n, _ in model.named_modules())
