"""GGUF export: read back by gguf's own reader and by transformers, against independent expectations."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import look_trained

import lorakit
from lorakit.adapter.format import save_extras

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_llama(folder: Path, sharp: bool = True) -> Path:
    """A tiny Llama whose attention is far from uniform (Q/K weights x5), so a wrong RoPE layout shows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                         tie_word_embeddings=False))
    if sharp:
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(5)
                layer.self_attn.k_proj.weight.mul_(5)
    model.save_pretrained(folder / "base")
    wrapped = look_trained(lorakit.wrap(lorakit.load(folder / "base"), lora=dict(r=4, targets="all-linear")), 0.1)
    wrapped.save_pretrained(folder / "adapter")
    save_extras(wrapped, folder / "adapter")
    return folder / "adapter"


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute, written out from its source for this test."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# f16 on the sharpened model: stored without the permutation, its logits differ by ~25% of their max
# (measured), so the bound shows the RoPE layout is right. q8_0 rounds too coarsely for that sharpened
# model (8% measured; 6% unsharpened, 2.3% on SmolLM2); its permutation is checked on the stored tensor below.
@pytest.mark.parametrize("gguf_type,bound,sharp", [("f16", 1e-2, True), ("q8_0", 8e-2, False)])
def test_tiny_llama_gguf_reloads_with_the_merged_logits(gguf_type, bound, sharp, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    adapter = tiny_llama(tmp_path, sharp)
    out = tmp_path / f"m.{gguf_type}.gguf"
    report = lorakit.merge(tmp_path / "base", adapter, tmp_path / "merged", gguf=out, gguf_type=gguf_type)
    assert report["gguf"]["type"] == gguf_type and out.is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 100, (3, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected, actual = merged(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert (expected - actual).abs().max() <= bound * expected.abs().max()
    assert (expected.argmax(-1) == actual.argmax(-1)).float().mean() >= 0.9  # random tiny logits lie close together

    # The file itself, read by gguf's reader: llama.cpp's names, types and RoPE layout.
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * 9 + 3  # per block 7 linears + 2 norms; embeddings, final norm, untied output
    q = merged.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    stored = tensors["blk.1.attn_q.weight"]
    expected_type = gguf.GGMLQuantizationType.F16 if gguf_type == "f16" else gguf.GGMLQuantizationType.Q8_0
    assert stored.tensor_type == expected_type
    assert tensors["blk.1.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    values = gguf.dequantize(stored.data, stored.tensor_type).reshape(q.shape)
    assert np.abs(values - llama_cpp_permute(q, 4)).max() <= (1e-3 if gguf_type == "f16" else 2e-2) * np.abs(q).max()
    assert not np.allclose(values, q, atol=np.abs(q).max() * 0.05)  # really permuted, not stored as is
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2


def test_bad_gguf_requests_are_refused_before_anything_is_written(tmp_path):
    adapter = tiny_llama(tmp_path, sharp=False)
    with pytest.raises(lorakit.LorakitError, match="unknown GGUF type 'q4_k'"):
        lorakit.merge(tmp_path / "base", adapter, tmp_path / "merged", gguf=tmp_path / "m.gguf", gguf_type="q4_k")
    (tmp_path / "old.gguf").write_bytes(b"mine")
    with pytest.raises(lorakit.LorakitError, match="--force"):
        lorakit.merge(tmp_path / "base", adapter, tmp_path / "merged", gguf=tmp_path / "old.gguf")
    assert (tmp_path / "old.gguf").read_bytes() == b"mine"
    from conftest import build

    from lorakit.adapter.format import save_extras as save

    build("gpt2").save_pretrained(tmp_path / "gpt2")
    wrapped = lorakit.wrap(lorakit.load(tmp_path / "gpt2"), lora=dict(r=4, targets="attention"))
    wrapped.save_pretrained(tmp_path / "gpt2-adapter")
    save(wrapped, tmp_path / "gpt2-adapter")
    with pytest.raises(lorakit.LorakitError, match="does not know the gpt2 architecture"):
        lorakit.merge(tmp_path / "gpt2", tmp_path / "gpt2-adapter", tmp_path / "merged", gguf=tmp_path / "g.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "gpt2", "gpt2-adapter", "old.gguf"]
    lorakit.merge(tmp_path / "base", adapter, tmp_path / "merged", gguf=tmp_path / "old.gguf", force=True,
                  verify=False)
    assert (tmp_path / "old.gguf").read_bytes()[:4] == b"GGUF"


def test_killed_export_leaves_nothing_under_the_final_name(tmp_path):
    adapter = tiny_llama(tmp_path, sharp=False)
    code = f"""
import os, signal
import gguf
real = gguf.GGUFWriter.write_tensor_data
calls = []
def dying(self, *a, **k):
    calls.append(1)
    if len(calls) == 5:  # header and some tensors written, the rest on their way
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *a, **k)
gguf.GGUFWriter.write_tensor_data = dying
import lorakit
lorakit.merge({str(tmp_path / 'base')!r}, {str(adapter)!r}, {str(tmp_path / 'merged')!r},
              gguf={str(tmp_path / 'out.gguf')!r})
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert not (tmp_path / "out.gguf").exists() and not (tmp_path / "merged").exists()


def test_cli_writes_a_gguf(tmp_path, capsys):
    from lorakit.cli import main

    adapter = tiny_llama(tmp_path, sharp=False)
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(adapter), "--out",
                 str(tmp_path / "m"), "--gguf", str(tmp_path / "m.gguf"), "--gguf-type", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "m.gguf (q8_0" in out and "verified: run by" in out


@pytest.fixture
def smollm2_base(smollm2):
    """SmolLM2-135M-Instruct as a plain safetensors folder with its tokenizer (the session's one conversion)."""
    return smollm2.folder


def test_smollm2_merged_to_gguf_replies_like_the_merged_model(smollm2_base, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wrapped = look_trained(lorakit.wrap(lorakit.load(smollm2_base), lora=dict(r=8, targets="attention")), 0.01)
    wrapped.save_pretrained(tmp_path / "adapter")
    save_extras(wrapped, tmp_path / "adapter")
    del wrapped
    # verify=False: this test does the checks itself, on chat prompts (the tiny models cover merge's own)
    lorakit.merge(smollm2_base, tmp_path / "adapter", tmp_path / "merged", gguf=tmp_path / "s.gguf", verify=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    gguf_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="s.gguf", dtype=torch.float32).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="s.gguf")
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    for question in ("What is the capital of France?", "Name three colours."):
        chat = [{"role": "user", "content": question}]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gguf_ids = gguf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)
        assert torch.equal(ids["input_ids"], gguf_ids["input_ids"])
        with torch.no_grad():
            expected, actual = merged(**ids).logits, gguf_model(**ids).logits
            assert (expected - actual).abs().max() <= 0.01 * expected.abs().max()  # f16: 1.4e-3 measured
            reply = merged.generate(**ids, max_new_tokens=10, do_sample=False)
            gguf_reply = gguf_model.generate(**gguf_ids, max_new_tokens=10, do_sample=False)
        assert tokenizer.decode(reply[0]) == gguf_tokenizer.decode(gguf_reply[0])


# ---- every family the export writes (tests/gguf_models.py), read back by gguf's reader ----------------------

@pytest.mark.parametrize("name", list(__import__("gguf_models").FAMILIES))
def test_each_family_exports_what_llama_cpp_expects(name, tmp_path):
    import gguf
    from gguf_models import FAMILIES, tiny_family
    from safetensors.torch import load_file

    base, adapter = tiny_family(name, tmp_path)
    out = tmp_path / "m.gguf"
    report = lorakit.merge(base, adapter, tmp_path / "merged", gguf=out)
    assert report["gguf"]["verification"]["summary"]
    config = __import__("transformers").AutoConfig.from_pretrained(tmp_path / "merged")
    reader = gguf.GGUFReader(str(out))
    fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    arch = FAMILIES[name][2]
    assert fields["general.architecture"] == arch and fields["general.type"] == "model"
    assert fields["tokenizer.ggml.model"] == "none"  # no tokenizer in the folder: llama.cpp runs on ids
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if getattr(config, "head_dim", None) is not None:
        assert fields[f"{arch}.attention.key_length"] == fields[f"{arch}.attention.value_length"] == head_dim
    # Every tensor is one llama.cpp's table has for the architecture (gguf.MODEL_TENSORS), block by block.
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    allowed = {gguf.TENSOR_NAMES[t].format(bid=b) for t in gguf.MODEL_TENSORS[arch_enum] for b in range(2)}
    names = {t.name: t for t in reader.tensors}
    assert {n.rpartition(".")[0] for n in names} <= allowed
    merged = load_file(tmp_path / "merged" / "model.safetensors")

    def stored(gguf_name):
        tensor = names[gguf_name]
        return gguf.dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))

    if name.startswith("gemma"):  # Gemma's RMSNorm scales by 1 + weight: llama.cpp stores the sum
        assert np.allclose(stored("blk.0.attn_norm.weight"), merged["model.layers.0.input_layernorm.weight"] + 1)
        assert fields[f"{arch}.attention.sliding_window"] == 8
        assert list(fields[f"{arch}.attention.sliding_window_pattern"]) == [t == "sliding_attention"
                                                                            for t in config.layer_types]
    if name == "gemma2":
        assert fields["gemma2.attn_logit_softcapping"] == 50.0 and fields["gemma2.final_logit_softcapping"] == 30.0
    if name == "llama-3":  # rope_freqs: transformers' llama3 frequencies divided into the default ones
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
        default = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        assert np.allclose(stored("rope_freqs.weight"), (default / scaled).numpy(), rtol=1e-5)
        assert (default / scaled).max() == 8.0  # some frequencies really are scaled in this tiny config
    if name == "llama-head_dim-32":
        assert fields["llama.rope.dimension_count"] == 32


def test_families_llama_cpp_would_run_differently_are_refused(tmp_path):
    from gguf_models import tiny_family

    base, adapter = tiny_family("gemma2", tmp_path, query_pre_attn_scalar=32)
    with pytest.raises(lorakit.LorakitError, match=r"llama.cpp scales Gemma attention by 1/sqrt\(16\)"):
        lorakit.merge(base, adapter, tmp_path / "merged", gguf=tmp_path / "g.gguf")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "g.gguf").exists()


def _tiny_tokenizer(folder: Path, byte_fallback: bool) -> None:
    """A BPE tokenizer trained here on a few words: byte-level (a pre-tokenizer llama.cpp's table cannot know)
    or byte-level with byte fallback (neither kind llama.cpp has: its spaces are not SentencePiece's \u2581)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(byte_fallback=byte_fallback, unk_token=None if not byte_fallback else "<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.train_from_iterator(["hello world", "a tiny tokenizer for a test"] * 5,
                                  trainers.BpeTrainer(vocab_size=90, special_tokens=["<unk>", "<s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>").save_pretrained(folder)


@pytest.mark.parametrize("byte_fallback,message", [(False, "llama.cpp does not know the pre-tokenizer"),
                                                   (True, "BPE with byte fallback but not SentencePiece")])
def test_tokenizers_llama_cpp_cannot_name_are_refused_before_merging(byte_fallback, message, tmp_path):
    adapter = tiny_llama(tmp_path, sharp=False)
    _tiny_tokenizer(tmp_path / "base", byte_fallback)
    with pytest.raises(lorakit.LorakitError, match=message):
        lorakit.merge(tmp_path / "base", adapter, tmp_path / "merged", gguf=tmp_path / "t.gguf")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "t.gguf").exists()
