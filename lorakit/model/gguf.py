"""GGUF files (llama.cpp's format) as ordinary checkpoints.

transformers reads a GGUF file with `from_pretrained(folder, gguf_file=...)`
and can dequantize it, but the model it returns still carries the GGUF
quantizer (`hf_quantizer`, `config.quantization_config`): `Trainer` then
refuses to train it and `save_pretrained` to save it. lorakit converts the
file once into a plain folder (config.json, model.safetensors, the tokenizer
with its chat template, generation_config.json) in a cache keyed by the
file's sha256, and `load` reads that folder like any other checkpoint. So
training, adapter manifests (which name the folder as the base) and merging
(which streams from it and copies its tokenizer) treat it like any other base.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from ..core.errors import LorakitError, ModelNotFoundError
from ..core.files import sha256_file, write_json_atomic

ORIGIN = "lorakit_gguf_source.json"


def cache_root() -> Path:
    """`$LORAKIT_CACHE`, else `$XDG_CACHE_HOME/lorakit`, else `~/.cache/lorakit`."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit"


def gguf_path(folder: str | os.PathLike | None, gguf_file: str | os.PathLike) -> Path:
    """The GGUF file: `gguf_file` inside `folder`, or `gguf_file` itself when it is a path that exists."""
    candidates = [Path(folder).expanduser() / gguf_file] if folder is not None else []
    candidates.append(Path(gguf_file).expanduser())
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ModelNotFoundError(f"no GGUF file {gguf_file!r}" + (f" in {folder}" if folder is not None else ""),
                             hint="pass the folder that holds the .gguf file and its file name, "
                                  "e.g. load(folder, gguf_file='model.Q4_1.gguf')")


def gguf_checkpoint(folder: str | os.PathLike | None, gguf_file: str | os.PathLike) -> Path:
    """A plain transformers folder holding the dequantized weights of a GGUF file (converted once, cached).

    Pass the result to `lorakit.load`, `AutoTokenizer.from_pretrained` or `lorakit.merge` as the base.
    """
    source = gguf_path(folder, gguf_file)
    digest = sha256_file(source)
    target = cache_root() / "gguf" / f"{source.stem}-{digest[:16]}"
    if (target / ORIGIN).is_file():  # written last: its presence means the folder is complete
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.lorakit-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _convert(source, staging)
        write_json_atomic(staging / ORIGIN, {"gguf_file": str(source), "sha256": digest})
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / ORIGIN).is_file():  # not another process converting the same file at once
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(source: Path, out: Path) -> None:
    """Dequantize with transformers, drop its GGUF quantizer marker, save as safetensors."""
    if importlib.util.find_spec("gguf") is None:
        raise LorakitError("reading GGUF files needs the gguf package", hint="pip install gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, GgufConfig

    folder, name = str(source.parent), source.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        # dequantize=True: a dense model even where GGUF matmul kernels are installed (packed weights cannot train).
        model = auto.from_pretrained(folder, gguf_file=name, quantization_config=GgufConfig(dequantize=True))
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # noqa: BLE001 - transformers raises ValueError, KeyError, ... for what it cannot read
        raise LorakitError(f"transformers cannot load {source.name}: {exc}",
                           hint="check that the file is a complete GGUF model of an architecture your "
                                "transformers version reads (transformers.modeling_gguf_pytorch_utils."
                                "GGUF_SUPPORTED_ARCHITECTURES), or upgrade transformers") from None
    if getattr(model, "hf_quantizer", None) is not None:
        # transformers' own clean-up: drops hf_quantizer, config.quantization_config and is_quantized.
        model.hf_quantizer.remove_quantization_config(model)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))

