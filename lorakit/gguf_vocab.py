"""A tokenizer as llama.cpp's GGUF vocabulary, the way its converter writes one (TextModel._set_vocab_gpt2).

llama.cpp names a BPE pre-tokenizer (`tokenizer.ggml.pre`) by what the tokenizer does, not by what its
tokenizer.json says: the converter encodes a fixed test string and looks the sha256 of the ids up in a table
(`get_vocab_base_pre`). lorakit does the same with that table (gguf_pre_tokenizers.json, copied from
llama.cpp b11434), so SmolLM2's tokenizer is `smollm`, Llama 3's `llama-bpe`, Qwen's `qwen2`; a tokenizer the
table does not know is refused, as the converter refuses it. SentencePiece vocabularies are refused too.
"""

from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

from .errors import LorakitError
from .gguf_families import CONVERT_HINT

# llama.cpp's test string (conversion/base.py get_vocab_base_pre), character for character.
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
              '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')


def pre_tokenizers() -> dict:
    return json.loads(Path(__file__).with_name("gguf_pre_tokenizers.json").read_text())


def has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file())


def check_tokenizer(folder: Path) -> tuple[Any, str]:
    """(the transformers tokenizer, llama.cpp's pre-tokenizer name), or a LorakitError saying why not."""
    if not (folder / "tokenizer.json").is_file():
        raise LorakitError(f"GGUF export writes BPE tokenizers (tokenizer.json); {folder} has a SentencePiece "
                           "tokenizer.model only", hint=CONVERT_HINT)
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    if model["type"] != "BPE" or model.get("byte_fallback"):
        raise LorakitError(f"GGUF export writes byte-level BPE tokenizers; {folder / 'tokenizer.json'} is "
                           f"{'SentencePiece-style BPE (byte_fallback)' if model['type'] == 'BPE' else model['type']}",
                           hint=CONVERT_HINT)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = pre_tokenizers().get(digest)
    if name is None:
        raise LorakitError(f"llama.cpp does not know the pre-tokenizer of {folder} (its check hash is {digest[:16]}…)",
                           hint="llama.cpp would refuse it too; " + CONVERT_HINT + " once llama.cpp supports it")
    return tokenizer, name


def _looks_special(token: str) -> bool:
    """The converter's does_token_look_special: added tokens some models forget to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> bool:
    """Every id's token and type (added tokens: control when special, user-defined otherwise, normalized
    as llama.cpp expects), the pre-tokenizer, then gguf's SpecialVocab for merges, special ids, add_bos/eos
    and the chat template. Without a tokenizer, llama.cpp's "none" vocabulary (it runs on token ids; the
    export writes the vocabulary size); False then."""
    if not has_tokenizer(folder):
        writer.add_tokenizer_model("none")
        return False
    import gguf

    tokenizer, pre = check_tokenizer(folder)
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        token = by_id[i]
        if i not in added:
            types.append(T.NORMAL)
        else:
            if not added[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if added[i].special or _looks_special(token):
                types.append(T.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(T.USER_DEFINED)
        tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens))
    if "bos" not in special.add_special_token:  # what transformers does when it encodes: BOS or not
        with_bos = tokenizer.encode("a")
        special.add_special_token["bos"] = bool(with_bos) and with_bos[0] == tokenizer.bos_token_id
    special.add_to_gguf(writer, quiet=True)
    return True
