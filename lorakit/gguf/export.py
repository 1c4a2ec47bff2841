"""Export a merged checkpoint to GGUF (llama.cpp, Ollama), written with the `gguf` package.

What llama.cpp's converter does, done with gguf's own pieces: its GGUFWriter and key names, its TensorNameMap
for the tensor names, its quantizers for q8_0, its SpecialVocab for merges, special ids and the chat template.
What differs per family (architecture, tensor changes, metadata) is in gguf/families.py, the tokenizer in
gguf/vocab.py. Tensors are read one at a time from the merged safetensors and written as they come: the writer
holds the header, not the model. The file is checked before it gets its name: by llama.cpp itself when
lorakit has built it on this machine (llama_cpp.build_probe), else by loading it back with transformers.
With `ollama`, an Ollama Modelfile (modelfile.py: FROM the file, the chat template, stop words) is written beside it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..core.errors import LorakitError, SpecError
from ..core.files import atomic_path, refuse_existing, write_text_atomic
from .families import FAMILIES, adjusted, check_family, extra_tensors
from .families import add_metadata as add_family_metadata
from .modelfile import MODELFILE, modelfile
from .verify import verify_gguf
from .vocab import add_tokenizer, check_tokenizer, has_tokenizer

GGUF_TYPES = ("f16", "q8_0", "f32")  # f32: exact weights, for checking a model in llama.cpp
ARCHITECTURES = tuple(sorted(FAMILIES))  # transformers model types the export writes


def check_gguf(config: Any, tokenizer_dir: Path | None, gguf_type: str, ollama: bool = False) -> None:
    """Everything that would make the export fail, raised before any weight is merged or written (with `ollama`,
    a chat template the Modelfile cannot carry too)."""
    if gguf_type not in GGUF_TYPES:
        raise SpecError(f"unknown GGUF type {gguf_type!r}", hint=f"GGUF types are: {', '.join(GGUF_TYPES)}")
    check_family(config)
    if has_tokenizer(tokenizer_dir):
        check_tokenizer(tokenizer_dir)
        if ollama:
            modelfile(tokenizer_dir, "model.gguf")


def _shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [folder / "model.safetensors"]


def _tensor_plan(folder: Path, config: Any, gguf_type: str) -> list[tuple[str, Path | None, str, tuple, Any]]:
    """(safetensors key, shard, gguf name, shape, ggml type) per tensor, from the headers only; tensors
    llama.cpp needs beyond the checkpoint's (Llama 3's rope_freqs) come last, with no shard."""
    import gguf
    from safetensors import safe_open

    arch = getattr(gguf.MODEL_ARCH, FAMILIES[config.model_type].arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    plan = []
    for shard in _shards(folder):
        with safe_open(str(shard), "pt") as handle:
            for key in handle.keys():
                stem, _, suffix = key.rpartition(".")
                mapped = names.get_name(stem)
                if mapped is None:
                    raise LorakitError(f"GGUF export has no llama.cpp name for tensor {key}",
                                       hint=f"this model differs from the {config.model_type} layout llama.cpp expects")
                if mapped == "output" and (config.tie_word_embeddings or config.model_type == "gemma2"):
                    continue  # llama.cpp reuses token_embd, as transformers does
                shape = tuple(handle.get_slice(key).get_shape())
                plan.append((key, shard, f"{mapped}.{suffix}", shape, _ggml_type(shape, gguf_type)))
    for name, array in extra_tensors(config).items():
        plan.append((name, None, name, array.shape, gguf.GGMLQuantizationType.F32))
    return plan


def _ggml_type(shape: tuple, gguf_type: str) -> Any:
    """llama.cpp's choice: 1-D tensors (norms) stay F32; matrices take the requested type, and q8_0
    falls back to F16 for rows that are not whole 32-value blocks."""
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2 or gguf_type == "f32":
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


def _encoded(array: Any, ggml_type: Any) -> Any:
    import gguf
    import numpy as np

    T = gguf.GGMLQuantizationType
    if ggml_type == T.F32:
        return array.astype(np.float32)
    if ggml_type == T.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, ggml_type)


def _add_general(writer: Any, gguf_type: str, name: str, plan: list) -> None:
    """general.*: name, type, size label (from the parameter count, as the converter's), file type."""
    import math

    import gguf

    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    total = sum(math.prod(shape) for *_, shape, _ in plan)
    writer.add_size_label(gguf.size_label(total, total, 0, 0))
    writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "f32": gguf.LlamaFileType.ALL_F32}[gguf_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def export_gguf(folder: Path, path: Path, gguf_type: str, *, name: str = "merged", verify: bool = True,
                ollama: bool = False) -> dict:
    """Write `folder` (a merged checkpoint) to the GGUF file `path`, via a temp name beside it, renamed only
    after llama.cpp (or, without a llama.cpp build, transformers) runs it with logits close to the merged model's;
    with `ollama`, then the Modelfile beside it (its chat template recognised before the GGUF file is written)."""
    import gguf
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    check_gguf(config, None, gguf_type)  # the tokenizer is checked as it is written, before the file is named
    found = FAMILIES[config.model_type]
    plan = _tensor_plan(folder, config, gguf_type)
    extra = extra_tensors(config)
    ollama_file = modelfile(folder, path.name) if ollama else None
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, found.arch)])
        _add_general(writer, gguf_type, name, plan)
        add_family_metadata(writer, config)
        has_tokenizer = add_tokenizer(writer, folder, config.vocab_size)
        if not has_tokenizer and config.model_type not in ("llama", "mistral"):  # those write it in any case
            writer.add_vocab_size(config.vocab_size)
        for _, _, gguf_name, shape, ggml_type in plan:  # the header first: names, shapes, types, sizes
            writer.add_tensor_info(gguf_name, *_stored(shape, ggml_type), raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for key, shard, gguf_name, _, ggml_type in plan:  # one tensor resident at a time
            if shard is None:
                array = extra[key]
            else:
                with safe_open(str(shard), "pt") as handle:
                    array = adjusted(handle.get_tensor(key).float().numpy(), gguf_name, key, config, found)
            writer.write_tensor_data(_encoded(array, ggml_type))
        writer.close()
        figures = verify_gguf(folder, Path(tmp), config, gguf_type, plan, extra) if verify else None
    if ollama_file is not None:
        write_text_atomic(path.parent / MODELFILE, ollama_file[0])
    return {"path": str(path), "type": gguf_type, "bytes": path.stat().st_size, "tensors": len(plan),
            "tokenizer": "in the metadata" if has_tokenizer
            else "none (the base had no tokenizer.json or tokenizer.model)",
            "verification": figures,
            "modelfile": None if ollama_file is None else {"path": str(path.parent / MODELFILE), **ollama_file[1]}}


def prepare_gguf(path: str | os.PathLike | None, gguf_type: str, force: bool, ollama: bool = False) -> Path | None:
    """The GGUF output path (None: no GGUF asked for), checked like every output: refused if it exists, or with
    `ollama` if the Modelfile beside it does (unless `force`)."""
    if path is None:
        if ollama:
            raise SpecError("an Ollama Modelfile goes beside a GGUF file", hint="add --gguf FILE.gguf")
        return None
    if gguf_type not in GGUF_TYPES:
        raise SpecError(f"unknown GGUF type {gguf_type!r}", hint=f"GGUF types are: {', '.join(GGUF_TYPES)}")
    path = Path(path)
    if path.suffix != ".gguf":
        raise SpecError(f"{path} does not end in .gguf", hint="name the GGUF output like out.gguf")
    refuse_existing(path, force)
    if ollama:
        refuse_existing(path.parent / MODELFILE, force)
    return path
