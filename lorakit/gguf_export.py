"""Export a merged Llama-family checkpoint to GGUF (llama.cpp, Ollama), written with the `gguf` package.

What llama.cpp's converter does for Llama, done with gguf's own pieces: its GGUFWriter and key names,
its TensorNameMap for the tensor names, its quantizers for q8_0, its SpecialVocab for merges, special
ids and the chat template. Q and K weights are permuted so that llama.cpp's RoPE (adjacent pairs)
equals transformers' (halves); transformers' GGUF loader undoes exactly this. Tensors are read one at
a time from the merged safetensors and written as they come: the writer holds the header, not the model.
The file is checked by loading it back with transformers (`gguf_file=`) and comparing logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import LorakitError, SpecError
from .files import atomic_path, refuse_existing
from .verify import sample_inputs

GGUF_TYPES = ("f16", "q8_0")
ARCHITECTURES = ("llama",)  # transformers model_type -> llama.cpp's "llama" architecture
# llama.cpp names a BPE pre-tokenizer by what it splits on; these are the ones whose split we can
# read off tokenizer.json with certainty. Others are refused rather than guessed.
PRE_TOKENIZERS = {("ByteLevel",): "gpt-2", ("Digits", "ByteLevel"): "smollm"}
# Measured on SmolLM2-135M-Instruct and tiny Llamas (README): f16 weights move logits by ~1e-3 of
# their largest value, q8_0 by ~1e-2. The bounds leave room above those figures.
TOLERANCE = {"f16": 0.01, "q8_0": 0.08}  # times max |logit| of the merged model


def check_gguf(config: Any, tokenizer_dir: Path | None, gguf_type: str) -> None:
    """Everything that would make the export fail, raised before any weight is merged or written."""
    if gguf_type not in GGUF_TYPES:
        raise SpecError(f"unknown GGUF type {gguf_type!r}", hint=f"GGUF types are: {', '.join(GGUF_TYPES)}")
    if config.model_type not in ARCHITECTURES:
        raise LorakitError(f"GGUF export does not know the {config.model_type} architecture",
                           hint=f"it writes {', '.join(ARCHITECTURES)} models; merge to safetensors and use "
                                "llama.cpp's convert_hf_to_gguf.py for others")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise LorakitError(f"GGUF export does not write {rope['rope_type']!r} RoPE scaling",
                           hint="merge to safetensors and convert with llama.cpp's convert_hf_to_gguf.py")
    if tokenizer_dir is not None and (tokenizer_dir / "tokenizer.json").is_file():
        _pre_tokenizer(tokenizer_dir)


def _pre_tokenizer(folder: Path) -> str:
    data = json.loads((folder / "tokenizer.json").read_text())
    if data["model"]["type"] != "BPE" or data["model"].get("byte_fallback"):
        raise LorakitError("GGUF export writes byte-level BPE tokenizers only (GPT-2 style, as SmolLM2's)",
                           hint="merge to safetensors and convert with llama.cpp's convert_hf_to_gguf.py")
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    key = tuple(step.get("type") for step in steps)
    if key not in PRE_TOKENIZERS or (key[0] == "Digits" and not steps[0].get("individual_digits")):
        raise LorakitError(f"GGUF export does not know the pre-tokenizer {key} of {folder / 'tokenizer.json'}",
                           hint="merge to safetensors and convert with llama.cpp's convert_hf_to_gguf.py")
    return PRE_TOKENIZERS[key]


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"]


def _tensor_plan(folder: Path, config: Any, gguf_type: str) -> list[tuple[str, Path, str, tuple, Any]]:
    """(safetensors key, shard, gguf name, shape, ggml type) per tensor, from the headers only."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    plan = []
    for shard in _shards(folder):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                stem, _, suffix = key.rpartition(".")
                mapped = names.get_name(stem)
                if mapped is None:
                    raise LorakitError(f"GGUF export has no llama.cpp name for tensor {key}",
                                       hint="this model differs from the Llama layout llama.cpp expects")
                if mapped == "output" and config.tie_word_embeddings:
                    continue  # llama.cpp reuses token_embd, as transformers does
                shape = tuple(handle.get_slice(key).get_shape())
                plan.append((key, shard, f"{mapped}.{suffix}", shape, _ggml_type(shape, gguf_type)))
    return plan


def _ggml_type(shape: tuple, gguf_type: str) -> Any:
    """llama.cpp's choice: 1-D tensors (norms) stay F32; matrices take the requested type, and q8_0
    falls back to F16 for rows that are not whole 32-value blocks."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return T.F32
    if gguf_type == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[T.Q8_0][0] == 0:
        return T.Q8_0
    return T.F16


def _stored(shape: tuple, ggml_type: Any) -> tuple[tuple, Any, int]:
    """(shape as stored, numpy dtype, bytes) of a tensor of `shape` written as `ggml_type`."""
    import math

    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if ggml_type in (T.F32, T.F16):
        dtype = np.dtype(np.float32 if ggml_type == T.F32 else np.float16)
        return shape, dtype, math.prod(shape) * dtype.itemsize
    stored = gguf.quants.quant_shape_to_byte_shape(shape, ggml_type)
    return stored, np.dtype(np.uint8), math.prod(stored)


def _permute(weight: Any, heads: int) -> Any:
    """llama.cpp's RoPE layout: per head, interleave the two halves (transformers' loader reverses it)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2
                                                                                               ).reshape(weight.shape)


def _encoded(tensor: Any, gguf_name: str, ggml_type: Any, config: Any) -> Any:
    import gguf
    import numpy as np

    array = tensor.float().numpy()
    if gguf_name.endswith("attn_q.weight"):
        array = _permute(array, config.num_attention_heads)
    elif gguf_name.endswith("attn_k.weight"):
        array = _permute(array, config.num_key_value_heads or config.num_attention_heads)
    T = gguf.GGMLQuantizationType
    if ggml_type == T.F32:
        return array.astype(np.float32)
    if ggml_type == T.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, ggml_type)


def _add_metadata(writer: Any, config: Any, gguf_type: str, name: str) -> None:
    import gguf

    heads = config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if gguf_type == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer: Any, folder: Path, vocab_size: int) -> bool:
    """llama.cpp's BPE vocabulary: every id's token, its type (control for special added tokens,
    user-defined for other added ones), then gguf's SpecialVocab for merges, special ids, chat template."""
    if not (folder / "tokenizer.json").is_file():
        return False
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(max(vocab_size, len(by_id))):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(T.NORMAL if i not in added else T.CONTROL if added[i].special else T.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(folder))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    return True


def export_gguf(folder: Path, path: Path, gguf_type: str, *, name: str = "merged", verify: bool = True) -> dict:
    """Write `folder` (a merged Llama checkpoint) to the GGUF file `path`, via a temp name beside it,
    renamed only after it loads back in transformers with logits close to the safetensors model's."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    check_gguf(config, folder, gguf_type)
    plan = _tensor_plan(folder, config, gguf_type)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        _add_metadata(writer, config, gguf_type, name)
        has_tokenizer = _add_tokenizer(writer, folder, config.vocab_size)
        for _, _, gguf_name, shape, ggml_type in plan:  # the header first: names, shapes, types, sizes
            writer.add_tensor_info(gguf_name, *_stored(shape, ggml_type), raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for key, shard, gguf_name, _, ggml_type in plan:  # one tensor resident at a time
            with safe_open(str(shard), "pt") as handle:
                writer.write_tensor_data(_encoded(handle.get_tensor(key), gguf_name, ggml_type, config))
        writer.close()
        figures = verify_gguf(folder, Path(tmp), config, gguf_type) if verify else None
    return {"path": str(path), "type": gguf_type, "bytes": path.stat().st_size, "tensors": len(plan),
            "tokenizer": "in the metadata" if has_tokenizer else "none (the base had no tokenizer.json)",
            "verification": figures}


def verify_gguf(folder: Path, file: Path, config: Any, gguf_type: str) -> dict:
    """Logits of the GGUF loaded back by transformers against the merged safetensors model's."""
    import torch
    from transformers import AutoModelForCausalLM

    inputs = sample_inputs(config)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()(**inputs).logits
        reloaded = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                        dtype=torch.float32).eval()
        actual = reloaded(**inputs).logits.float()
    difference = float((expected - actual).abs().max())
    scale = float(expected.abs().max())
    tolerance = TOLERANCE[gguf_type] * scale
    agree = float((expected.argmax(-1) == actual.argmax(-1)).float().mean())
    figures = {"max_abs_logit_difference": difference, "max_abs_logit": scale, "tolerance": tolerance,
               "top1_agreement": agree, "reference": "the merged safetensors model, fp32",
               "sample": {k: list(v.shape) for k, v in inputs.items()}}
    if not difference <= tolerance:
        raise LorakitError(f"GGUF verification failed: logits differ by {difference:.3g} (tolerance {tolerance:.3g})",
                           hint="nothing was written; report this with the model and adapter")
    return figures


def prepare_gguf(path: str | os.PathLike, gguf_type: str, force: bool) -> Path:
    """The GGUF output path, checked like every output: refused if it exists (unless `force`)."""
    if gguf_type not in GGUF_TYPES:
        raise SpecError(f"unknown GGUF type {gguf_type!r}", hint=f"GGUF types are: {', '.join(GGUF_TYPES)}")
    path = Path(path)
    if path.suffix != ".gguf":
        raise SpecError(f"{path} does not end in .gguf", hint="name the GGUF output like out.gguf")
    refuse_existing(path, force)
    return path
