"""What each model family needs in a GGUF file, read from llama.cpp's converter (conversion/*.py, build b11434)
and its loader (src/models/*.cpp): the llama.cpp architecture, how tensors change on the way (Q/K RoPE
layout, Gemma's `1 + weight` norms, Llama 3's `rope_freqs`), the metadata keys, and what llama.cpp would
run differently from transformers (refused before anything is written).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..core.errors import LorakitError

CONVERT_HINT = "merge to safetensors and convert with llama.cpp's convert_hf_to_gguf.py"


@dataclass(frozen=True)
class Family:
    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's LLAMA graph rotates adjacent pairs; transformers rotates halves
    norm_shift: float = 0.0  # Gemma's RMSNorm scales by (1 + weight); llama.cpp stores the sum
    rope_types: tuple = ("default", "linear", "yarn")


# transformers model_type -> what llama.cpp's converter does for it. Mistral is written as arch llama, as the
# converter does; SmolLM and Llama 3.x are model_type llama.
FAMILIES = {
    "llama": Family("LLAMA", permute_qk=True, rope_types=("default", "linear", "yarn", "llama3")),
    "mistral": Family("LLAMA", permute_qk=True, rope_types=("default", "linear", "yarn", "llama3")),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
    "gemma2": Family("GEMMA2", norm_shift=1.0, rope_types=("default",)),
    "gemma3_text": Family("GEMMA3", norm_shift=1.0, rope_types=("default", "linear")),
    "phi3": Family("PHI3", rope_types=("default", "longrope")),
}
# llama.cpp derives Gemma's attention scale from the layer count (gemma2.cpp, gemma3.cpp): the 27B models
# scale by hidden/heads, every other size by head_dim. transformers reads query_pre_attn_scalar.
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def family(config: Any) -> Family:
    if config.model_type not in FAMILIES:
        raise LorakitError(f"GGUF export does not know the {config.model_type} architecture",
                           hint=f"it writes {', '.join(sorted(FAMILIES))} models; {CONVERT_HINT} for others")
    return FAMILIES[config.model_type]


def rope(config: Any, kind: str = "full_attention") -> dict:
    """transformers 5's rope_parameters (per layer kind for Gemma 3), or the older rope_scaling + rope_theta."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = params.get(kind, params) if isinstance(params.get(kind), dict) else params
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return {**params, "rope_theta": theta} if theta is not None else dict(params)


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_family(config: Any) -> Family:
    """The family, after refusing what llama.cpp would compute differently from transformers."""
    found = family(config)
    rope_type = rope(config).get("rope_type", "default")
    if rope_type not in found.rope_types:
        raise LorakitError(f"GGUF export does not write {rope_type!r} RoPE scaling for {config.model_type}",
                           hint=CONVERT_HINT)
    if config.model_type in GEMMA_27B_LAYERS:
        is_27b = config.num_hidden_layers == GEMMA_27B_LAYERS[config.model_type]
        used = config.hidden_size // config.num_attention_heads if is_27b else head_dim(config)
        if config.query_pre_attn_scalar != used:
            raise LorakitError(f"llama.cpp scales Gemma attention by 1/sqrt({used}), this model by "
                               f"1/sqrt({config.query_pre_attn_scalar}) (query_pre_attn_scalar)",
                               hint="llama.cpp would run a different model; nothing was written")
        if getattr(config, "attn_logit_softcapping", None) is not None and config.model_type == "gemma3_text":
            raise LorakitError("llama.cpp's Gemma 3 has no attention soft-capping", hint=CONVERT_HINT)
    if config.model_type == "phi3" and rope_type == "longrope" and not rope(config).get("long_factor"):
        raise LorakitError("Phi-3 longrope without long_factor/short_factor", hint=CONVERT_HINT)
    return found


def add_metadata(writer: Any, config: Any) -> None:
    """The hyperparameter keys llama.cpp's converter writes for the family (TextModel.set_gguf_parameters
    and the family's own additions)."""
    import gguf

    kind = config.model_type
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    full = rope(config)
    if full.get("rope_theta") is not None:
        writer.add_rope_freq_base(float(full["rope_theta"]))
    rope_type = full.get("rope_type", "default")
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(full["factor"])
        writer.add_rope_scaling_orig_ctx_len(full["original_max_position_embeddings"])
    if getattr(config, "head_dim", None) is not None or kind in GEMMA_27B_LAYERS:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if kind in ("llama", "mistral"):
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim(config))
    if kind in GEMMA_27B_LAYERS:
        _add_gemma(writer, config)
    if kind == "phi3":
        rotary = int(full.get("partial_rotary_factor", 1.0) * config.hidden_size) // config.num_attention_heads
        writer.add_rope_dimension_count(rotary)
        writer.add_rope_scaling_orig_ctx_len(getattr(config, "original_max_position_embeddings", None)
                                             or config.max_position_embeddings)
        writer.add_sliding_window(getattr(config, "sliding_window", None) or 0)
        if rope_type == "longrope":
            scale = config.max_position_embeddings / config.original_max_position_embeddings
            factor = math.sqrt(1 + math.log(scale) / math.log(config.original_max_position_embeddings))
            writer.add_rope_scaling_attn_factors(factor if scale > 1.0 else 1.0)


def _add_gemma(writer: Any, config: Any) -> None:
    """Soft-capping and sliding-window attention: which layers slide, the window, their own RoPE base."""
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in types and config.sliding_window:
        writer.add_sliding_window(config.sliding_window)
        # per layer, from layer_types: the converter leaves llama.cpp's default (every 2nd / 6th layer full),
        # which is not the model's when its pattern differs (a 2-layer Gemma 3: sliding, full)
        writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in types])
        local = rope(config, "sliding_attention").get("rope_theta")
        if config.model_type == "gemma3_text" and local is not None:
            writer.add_rope_freq_base_swa(float(local))


def extra_tensors(config: Any) -> dict:
    """Tensors llama.cpp needs that the checkpoint does not hold (name -> float32 numpy array)."""
    import numpy as np

    full = rope(config)
    rope_type = full.get("rope_type", "default")
    if rope_type == "llama3":  # Llama 3.1+: per-frequency factors, as transformers' _compute_llama3_parameters
        dim = head_dim(config)
        freqs = 1.0 / (full["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor, low, high = full.get("factor", 8.0), full.get("low_freq_factor", 1.0), full.get("high_freq_factor", 4.0)
        old = full.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / freqs
        smooth = (old / wavelen - low) / (high - low)
        factors = np.where(wavelen < old / high, 1.0,
                           np.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth)))
        return {"rope_freqs.weight": factors.astype(np.float32)}
    if rope_type == "longrope":
        return {"rope_factors_long.weight": np.array(full["long_factor"], dtype=np.float32),
                "rope_factors_short.weight": np.array(full["short_factor"], dtype=np.float32)}
    return {}


def adjusted(array: Any, gguf_name: str, hf_key: str, config: Any, found: Family) -> Any:
    """A checkpoint tensor as llama.cpp stores it."""
    if found.permute_qk and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
        return permute(array, config.num_attention_heads)
    if found.permute_qk and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
        return permute(array, config.num_key_value_heads or config.num_attention_heads)
    if found.norm_shift and hf_key.endswith("norm.weight"):
        return array + found.norm_shift
    return array


def permute(weight: Any, heads: int) -> Any:
    """llama.cpp's RoPE layout: per head, interleave the two halves (transformers' loader reverses it)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2
                                                                                               ).reshape(weight.shape)
