"""A tokenizer as llama.cpp's GGUF vocabulary, the way its converter writes one (TextModel._set_vocab_gpt2 for
byte-level BPE, _set_vocab_sentencepiece for SentencePiece).

llama.cpp names a BPE pre-tokenizer (`tokenizer.ggml.pre`) by what the tokenizer does, not by what its
tokenizer.json says: the converter encodes a fixed test string and looks the sha256 of the ids up in a table
(`get_vocab_base_pre`). lorakit does the same with that table (pre_tokenizers.json, copied from
llama.cpp b11434), so SmolLM2's tokenizer is `smollm`, Llama 3's `llama-bpe`, Qwen's `qwen2`; a tokenizer the
table does not know is refused, as the converter refuses it.

SentencePiece tokenizers (Llama 2, Mistral v0.1, Gemma: BPE with byte fallback and "\u2581" for spaces) are
llama.cpp's "llama" model, which merges by per-token scores. The tokens and types come from the tokenizer
transformers loads (so tokens added in fine-tuning are there), the scores from tokenizer.model when the
sentencepiece package reads it (the converter's), else from the order of tokenizer.json's merges.
"""

from __future__ import annotations

import json
import logging
import re
from hashlib import sha256
from pathlib import Path
from typing import Any

from ..core.errors import LorakitError
from .families import CONVERT_HINT

logger = logging.getLogger("lorakit")

# llama.cpp's test string (conversion/base.py get_vocab_base_pre), character for character.
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) '
              '✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')


def pre_tokenizers() -> dict:
    return json.loads(Path(__file__).with_name("pre_tokenizers.json").read_text())


def has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file())


def _load(folder: Path) -> Any:
    """transformers' tokenizer of `folder`; a tokenizer.model alone is converted by transformers, which needs the
    sentencepiece and protobuf packages for it."""
    from importlib.util import find_spec

    if not (folder / "tokenizer.json").is_file() and (find_spec("sentencepiece") is None or find_spec("google") is None
                                                      or find_spec("google.protobuf") is None):
        raise LorakitError(f"{folder} has a SentencePiece tokenizer.model and no tokenizer.json; transformers "
                           "reads it with the sentencepiece and protobuf packages, which are not installed",
                           hint="pip install sentencepiece protobuf, or save the tokenizer with transformers "
                                "(tokenizer.save_pretrained writes tokenizer.json)")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as exc:
        raise LorakitError(f"transformers cannot read the tokenizer in {folder}: {exc}", hint=CONVERT_HINT) from None
    if not getattr(tokenizer, "is_fast", False):
        raise LorakitError(f"GGUF export reads tokenizers through the tokenizers library; {folder}'s is "
                           f"{type(tokenizer).__name__}", hint=CONVERT_HINT)
    return tokenizer


def check_tokenizer(folder: Path) -> tuple[Any, str, str]:
    """(the transformers tokenizer, llama.cpp's tokenizer model, its pre-tokenizer name), or a LorakitError
    saying why not. Byte-level BPE is llama.cpp's "gpt2" model; BPE with byte fallback whose spaces are
    SentencePiece's "▁" (Llama 2, Mistral v0.1, Gemma) is its "llama" model (SPM)."""
    tokenizer = _load(folder)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend["model"]
    spaces = json.dumps([backend.get("normalizer"), backend.get("pre_tokenizer")], ensure_ascii=False)
    if model["type"] == "BPE" and model.get("byte_fallback"):
        if "\u2581" in spaces and "ByteLevel" not in spaces:
            return tokenizer, "llama", "default"
        raise LorakitError(f"GGUF export writes byte-level BPE and SentencePiece tokenizers; {folder}'s is BPE "
                           "with byte fallback but not SentencePiece's spaces (▁)", hint=CONVERT_HINT)
    if model["type"] != "BPE":
        raise LorakitError(f"GGUF export writes BPE tokenizers; {folder}'s is {model['type']}", hint=CONVERT_HINT)
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = pre_tokenizers().get(digest)
    if name is None:
        raise LorakitError(f"llama.cpp does not know the pre-tokenizer of {folder} (its check hash is {digest[:16]}…)",
                           hint="llama.cpp would refuse it too; " + CONVERT_HINT + " once llama.cpp supports it")
    return tokenizer, "gpt2", name


def _looks_special(token: str) -> bool:
    """The converter's does_token_look_special: added tokens some models forget to mark special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def _tokens(tokenizer: Any, vocab_size: int, spm: bool) -> tuple[list[str], list[int]]:
    """Every id's token and type, as the converter's _set_vocab_gpt2 / _create_vocab_sentencepiece: added tokens
    control when special, user-defined otherwise (normalized as llama.cpp expects); SentencePiece's byte pieces
    <0xNN> byte; ids the tokenizer lacks up to the model's vocabulary size unused padding."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        token = by_id.get(i, f"[PAD{i}]")
        if i not in by_id:
            types.append(T.UNUSED)
        elif i in added:
            if not spm and not added[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if added[i].special or _looks_special(token):
                types.append(T.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(T.USER_DEFINED)
        elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types.append(T.BYTE)
        else:
            types.append(T.UNKNOWN if spm and i == tokenizer.unk_token_id else T.NORMAL)
        tokens.append(token)
    return tokens, types


def _sentencepiece(folder: Path) -> Any:
    """sentencepiece's reader of folder/tokenizer.model (a protobuf file), or None without one or the package."""
    try:
        import sentencepiece
    except ImportError:
        return None
    pieces = sentencepiece.SentencePieceProcessor()
    try:
        pieces.LoadFromFile(str(folder / "tokenizer.model"))
    except (OSError, RuntimeError):
        return None
    return pieces


def _scores(folder: Path, tokenizer: Any, tokens: list[str], types: list[int]) -> list[float]:
    """Per token, the score llama.cpp's SentencePiece tokenizer merges by (the pair whose token scores highest
    first). SentencePiece's own scores, as the converter writes them, when tokenizer.model is there, sentencepiece
    reads it and its pieces are the tokenizer's; else minus the rank of the first tokenizer.json merge that makes
    the token, which is BPE's order (the merges transformers derives from a tokenizer.model are in score order).
    Added tokens and padding -1000, as the converter."""
    import gguf

    T = gguf.TokenType
    scores = [-1000.0 if kind in (T.CONTROL, T.USER_DEFINED, T.UNUSED) else 0.0 for kind in types]
    pieces = _sentencepiece(folder) if (folder / "tokenizer.model").is_file() else None
    base = (T.NORMAL, T.BYTE, T.UNKNOWN)
    if pieces is not None and pieces.vocab_size() <= len(tokens) and all(
            pieces.IdToPiece(i) == tokens[i] for i in range(pieces.vocab_size()) if types[i] in base):
        for i in range(pieces.vocab_size()):
            if types[i] in base:
                scores[i] = pieces.GetScore(i)
        return scores
    vocab = tokenizer.get_vocab()
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    for rank, merge in reversed(list(enumerate(merges))):  # the first merge making a token wins
        i = vocab.get("".join(merge.split(" ", 1) if isinstance(merge, str) else merge))
        if i is not None and i < len(types) and types[i] == T.NORMAL:
            scores[i] = -float(rank)
    return scores


def _adds_space_prefix(tokenizer: Any) -> bool:
    """Whether the tokenizer puts SentencePiece's "\u2581" before the text (Llama 2, Mistral; not Gemma). llama.cpp
    then puts one before every run of text, after special tokens too, as sentencepiece does; transformers does
    so only with legacy=True (said in a warning, for prompts with special tokens tokenize differently then)."""
    def token(text: str, index: int) -> str:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
        return tokens[index] if len(tokens) > index else ""

    prefix = token("a", 0).startswith("\u2581")
    if prefix and tokenizer.bos_token and not token(tokenizer.bos_token + "a", 1).startswith("\u2581"):
        logger.warning("llama.cpp will tokenize text after a special token with a leading space (as sentencepiece "
                       "does) and this tokenizer (legacy=False) without: prompts with special tokens in them will "
                       "differ by one token in llama.cpp")
    return prefix


def add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> bool:
    """The tokenizer model, pre-tokenizer, tokens, scores (SentencePiece) and types, then gguf's SpecialVocab
    for merges (BPE), special ids and the chat template, and add_bos/add_eos as transformers encodes. Without a
    tokenizer, llama.cpp's "none" vocabulary (it runs on token ids; the export writes the vocabulary size);
    False then."""
    if not has_tokenizer(folder):
        writer.add_tokenizer_model("none")
        return False
    import gguf

    tokenizer, model, pre = check_tokenizer(folder)
    spm = model == "llama"
    tokens, types = _tokens(tokenizer, vocab_size, spm)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if spm:
        writer.add_token_scores(_scores(folder, tokenizer, tokens, types))
    writer.add_token_types(types)
    if spm:
        writer.add_add_space_prefix(_adds_space_prefix(tokenizer))
    special = gguf.SpecialVocab(folder, load_merges=not spm, n_vocab=len(tokens))
    encoded = tokenizer.encode("a")  # what transformers does when it encodes: BOS, EOS or not
    special.add_special_token["bos"] = bool(encoded) and encoded[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = bool(encoded) and encoded[-1] == tokenizer.eos_token_id
    special.add_to_gguf(writer, quiet=True)
    return True
