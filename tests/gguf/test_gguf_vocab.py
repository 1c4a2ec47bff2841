"""SentencePiece tokenizers in the GGUF export, read back by gguf's reader and by transformers' GGUF tokenizer
loader, against sentencepiece's own reading of tokenizer.model (llama.cpp itself: test_gguf_llama_cpp.py)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

import lorakit
from lorakit.gguf.export import export_gguf

sentencepiece = pytest.importorskip("sentencepiece")

TEXTS = ["Café naïve, Zoë à Noël: ñ, ü, ø", "Call 0800 123 4567 or 3.14159", "emoji 🦙🚀 ok", "a</s>b<s>c",
         "<|im_start|>user\nhi<|im_end|>", "<start_of_turn>user\nhi<end_of_turn>\n", "<bos>x<eos>y"]


def _folder(tmp_path, name):
    """A tiny model of SPM family `name` with its tokenizer, as a merged folder would be (no adapter needed)."""
    from gguf_models import SPM_FAMILIES, SPM_STYLES, SPM_VOCAB, family_config, spm_tokenizer
    from transformers import AutoModelForCausalLM

    style = SPM_FAMILIES[name][3]
    config = family_config(name, vocab_size=SPM_VOCAB, **SPM_STYLES[style][3])
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / name)
    spm_tokenizer(tmp_path / name, style)
    return tmp_path / name, style


def _fields(file):
    import gguf

    return {k: f.contents() for k, f in gguf.GGUFReader(str(file)).fields.items() if k.startswith("tokenizer.")}


@pytest.mark.parametrize("name", ["llama-2", "gemma3-spm"])
def test_sentencepiece_vocabulary_is_written_as_llama_cpp_converter_writes_it(name, tmp_path):
    import gguf
    from gguf_models import SPM_STYLES, SPM_VOCAB
    from transformers import AutoTokenizer

    folder, style = _folder(tmp_path, name)
    export_gguf(folder, tmp_path / "t.gguf", "f32", verify=False)
    fields = _fields(tmp_path / "t.gguf")
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    T = gguf.TokenType
    user_defined = set(SPM_STYLES[style][0].get("user_defined_symbols", ()))

    def expected_type(i):  # the converter's rules, on sentencepiece's own flags
        if i >= len(tokenizer):
            return T.UNUSED
        if i >= pieces.vocab_size():
            return T.CONTROL  # the ChatML tokens a fine-tune added, special
        if pieces.IdToPiece(i) in user_defined:
            return T.USER_DEFINED
        if pieces.IsControl(i) or pieces.IsUnknown(i):  # transformers marks <unk> special: control, as the converter
            return T.CONTROL
        return T.BYTE if pieces.IsByte(i) else T.NORMAL

    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert len(fields["tokenizer.ggml.tokens"]) == SPM_VOCAB
    assert fields["tokenizer.ggml.tokens"][:pieces.vocab_size()] == [pieces.IdToPiece(i)
                                                                     for i in range(pieces.vocab_size())]
    assert list(fields["tokenizer.ggml.token_type"]) == [expected_type(i) for i in range(SPM_VOCAB)]
    normal = [i for i in range(pieces.vocab_size()) if expected_type(i) in (T.NORMAL, T.BYTE)]
    assert np.array_equal(np.array(fields["tokenizer.ggml.scores"])[normal], [pieces.GetScore(i) for i in normal])
    assert fields["tokenizer.ggml.add_space_prefix"] == (style == "llama")  # Gemma's trainer: no dummy prefix
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id)
    # transformers' own GGUF tokenizer loader, from the scores and types alone, tokenizes text as the original
    # (it knows no legacy flag, so text right after a special token is left to test_gguf_llama_cpp.py)
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    for text in [t for t in TEXTS if "<" not in t] + ["end</s>"]:
        assert from_gguf(text)["input_ids"] == tokenizer(text)["input_ids"], text


def test_without_tokenizer_model_scores_follow_tokenizer_json_merges(tmp_path):
    """tokenizer.json alone: scores from its merge order rank the merged pieces as sentencepiece's scores do."""
    import gguf

    folder, _ = _folder(tmp_path, "llama-2")
    pieces = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    (folder / "tokenizer.model").unlink()
    export_gguf(folder, tmp_path / "t.gguf", "f32", verify=False)
    fields = _fields(tmp_path / "t.gguf")
    merged = [i for i in range(pieces.vocab_size()) if fields["tokenizer.ggml.token_type"][i] == gguf.TokenType.NORMAL
              and len(pieces.IdToPiece(i)) > 1]
    scores = np.array(fields["tokenizer.ggml.scores"])[merged]
    assert len(merged) > 100 and len(set(scores)) == len(merged)
    assert list(np.argsort(-scores)) == list(np.argsort([-pieces.GetScore(i) for i in merged]))


def test_legacy_false_tokenizer_warns_that_llama_cpp_spaces_text_after_special_tokens(tmp_path, caplog):
    folder, _ = _folder(tmp_path, "llama-2")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": False}))
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        export_gguf(folder, tmp_path / "t.gguf", "f32", verify=False)
    assert "tokenize text after a special token with a leading space" in caplog.text


def test_sentencepiece_tokenizers_the_export_cannot_write_are_refused_before_merging(tmp_path):
    from importlib.util import find_spec

    from gguf_models import tiny_family
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    base, adapter = tiny_family("llama-2", tmp_path)
    (base / "tokenizer.json").unlink()  # tokenizer.model alone: transformers needs sentencepiece and protobuf
    if find_spec("google") is None or find_spec("google.protobuf") is None:
        with pytest.raises(lorakit.LorakitError, match="tokenizer.model and no tokenizer.json"):
            lorakit.merge(base, adapter, tmp_path / "merged", gguf=tmp_path / "t.gguf")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (base / name).unlink()
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], unk_id=0, byte_fallback=True))
    PreTrainedTokenizerFast(tokenizer_object=unigram, unk_token="<unk>").save_pretrained(base)  # T5/ALBERT-style
    with pytest.raises(lorakit.LorakitError, match="BPE tokenizers; .* is Unigram"):
        lorakit.merge(base, adapter, tmp_path / "merged", gguf=tmp_path / "t.gguf")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "t.gguf").exists()
