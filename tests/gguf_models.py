"""Tiny models of every family the GGUF export writes, with a trained-looking LoRA adapter: the list the GGUF
tests walk (and the README's support table is made from). Q/K weights are sharpened so that a wrong RoPE layout
shows in the logits, and norm weights moved off 1 so that a missing Gemma `1 + weight` shift shows."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import look_trained

import lorakit
from lorakit.adapter import save_extras

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
             pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}
# name -> (transformers model_type, config beyond SHAPE, llama.cpp architecture the file must name)
FAMILIES = {
    "llama-3": ("llama", dict(rope_parameters=LLAMA3_ROPE), "llama"),
    "llama-head_dim-32": ("llama", dict(head_dim=32), "llama"),  # head_dim != hidden / heads
    "mistral": ("mistral", dict(head_dim=16), "llama"),
    "qwen2": ("qwen2", {}, "qwen2"),
    "qwen3": ("qwen3", dict(head_dim=16), "qwen3"),
    "gemma2": ("gemma2", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=True,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0), "gemma2"),
    "gemma3": ("gemma3_text", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, tie_word_embeddings=True,
                                   layer_types=["sliding_attention", "full_attention"]), "gemma3"),
    "phi3": ("phi3", {}, "phi3"),
    # Phi-3 128k's scaling: per-frequency long/short factors (rope_factors_long/short) and an attention factor
    "phi3-longrope": ("phi3", dict(original_max_position_embeddings=256, max_position_embeddings=1024, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "long_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
        "short_factor": [1.0, 1.0, 1.1, 1.2, 1.3, 1.5, 1.8, 2.0]}), "phi3"),
}


def family_config(name: str, **overrides):
    from transformers import AutoConfig

    model_type, extra, _ = FAMILIES[name]
    return AutoConfig.for_model(model_type, **{**SHAPE, **extra, **overrides})


def tiny_family(name: str, folder: Path, **overrides) -> tuple[Path, Path]:
    """(base folder, adapter folder) of a tiny `name` model with an all-linear r=4 adapter that looks trained."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(name, **overrides))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "norm" in key:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
            if any(part in key for part in ("q_proj", "k_proj", "qkv_proj")):
                param.mul_(3)
    model.save_pretrained(folder / "base")
    wrapped = look_trained(lorakit.wrap(lorakit.load(folder / "base"), lora=dict(r=4, targets="all-linear")), 0.05)
    wrapped.save_pretrained(folder / "adapter")
    save_extras(wrapped, folder / "adapter")
    return folder / "base", folder / "adapter"
