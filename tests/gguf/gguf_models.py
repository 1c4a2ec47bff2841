"""Tiny models of every family the GGUF export writes, with a trained-looking LoRA adapter: the list the GGUF
tests walk (and the README's support table is made from). Q/K weights are sharpened so that a wrong RoPE layout
shows in the logits, and norm weights moved off 1 so that a missing Gemma `1 + weight` shift shows."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import look_trained

import lorakit
from lorakit.adapter.format import save_extras

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

    model_type, extra, *_ = FAMILIES[name] if name in FAMILIES else SPM_FAMILIES[name]
    return AutoConfig.for_model(model_type, **{**SHAPE, **extra, **overrides})


def tiny_family(name: str, folder: Path, **overrides) -> tuple[Path, Path]:
    """(base folder, adapter folder) of a tiny `name` model (FAMILIES, or SPM_FAMILIES with its SentencePiece
    tokenizer) with an all-linear r=4 adapter that looks trained."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    style = SPM_FAMILIES[name][3] if name in SPM_FAMILIES else None
    if style is not None:
        overrides = {"vocab_size": SPM_VOCAB, **SPM_STYLES[style][3], **overrides}
    model = AutoModelForCausalLM.from_config(family_config(name, **overrides))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "norm" in key:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
            if any(part in key for part in ("q_proj", "k_proj", "qkv_proj")):
                param.mul_(3)
    model.save_pretrained(folder / "base")
    if style is not None:
        spm_tokenizer(folder / "base", style)
    wrapped = look_trained(lorakit.wrap(lorakit.load(folder / "base"), lora=dict(r=4, targets="all-linear")), 0.05)
    wrapped.save_pretrained(folder / "adapter")
    save_extras(wrapped, folder / "adapter")
    return folder / "base", folder / "adapter"


# ---- SentencePiece tokenizers (Llama 2, Mistral v0.1, Gemma), trained here -------------------------------------
# sentencepiece's trainer with each family's own settings (read off their tokenizer.model protos), and beside the
# tokenizer.model the tokenizer.json that transformers makes of it (its SentencePieceExtractor: vocabulary by id,
# merges from generate_merges, control pieces special, user-defined pieces not).
SPM_TRAINER = dict(model_type="bpe", vocab_size=480, byte_fallback=True, split_digits=True, character_coverage=1.0,
                   remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
                   minloglevel=2)
SPM_STYLES = {  # style -> (trainer settings beyond SPM_TRAINER, transformers class, its keywords, model config ids)
    "llama": (dict(add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1), "LlamaTokenizer",
              dict(legacy=True, bos_token="<s>", eos_token="</s>", unk_token="<unk>", add_bos_token=True),
              dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)),
    "gemma": (dict(add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                   eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", control_symbols=["<mask>"],
                   user_defined_symbols=["<start_of_turn>", "<end_of_turn>"]), "GemmaTokenizer",
              dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", add_bos_token=True),
              dict(bos_token_id=2, eos_token_id=1, pad_token_id=0)),
}
# name -> (model_type, config beyond SHAPE, llama.cpp architecture, tokenizer style), with a SentencePiece tokenizer
SPM_FAMILIES = {"llama-2": ("llama", {}, "llama", "llama"), "mistral-v0.1": (*FAMILIES["mistral"], "llama"),
                "gemma2-spm": (*FAMILIES["gemma2"], "gemma"), "gemma3-spm": (*FAMILIES["gemma3"], "gemma")}
SPM_VOCAB = 512  # the model's vocabulary: the tokenizer's 480 pieces (+2 added to the Llama one), then padding
WORDS = ("the model merges adapters into weights and exports files that llama run on a laptop with quantized "
         "tensors tokenizer vocabulary pieces scores bytes Café naïve Zoë Noël à ñ ü ø déjà vu straße "
         "Hello world leading spaces tabs new lines 0 1 2 3 4 5 6 7 8 9 3.14159 x 10^3 , . ! ? : ; ( ) - + = ^").split()


def spm_corpus() -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) for _ in range(400)]


def spm_tokenizer(folder: Path, style: str) -> None:
    """A SentencePiece tokenizer (tokenizer.model and tokenizer.json) of `style` in `folder`."""
    import io

    import sentencepiece
    import transformers
    from transformers.tokenization_utils_base import generate_merges
    from transformers.tokenization_utils_tokenizers import AddedToken

    trainer, class_name, keywords, _ = SPM_STYLES[style]
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(spm_corpus()), model_writer=proto,
                                             **SPM_TRAINER, **trainer)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(proto.getvalue())
    pieces = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = {pieces.IdToPiece(i): i for i in range(pieces.vocab_size())}
    user_defined = set(trainer.get("user_defined_symbols", ()))
    added = [AddedToken(piece, normalized=False, special=piece not in user_defined) for i, piece in
             enumerate(vocab) if pieces.IsControl(i) or piece in user_defined]
    tokenizer = getattr(transformers, class_name)(vocab=vocab, merges=generate_merges(vocab), **keywords)
    tokenizer.add_tokens(added)
    if style == "llama":  # a chat fine-tune's ChatML tokens, added after the SentencePiece vocabulary
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())  # what the published configs say
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **{k: keywords[k] for k in ("legacy",)
                                                                           if k in keywords}}))
