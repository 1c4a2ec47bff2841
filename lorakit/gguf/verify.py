"""Checking a GGUF export before it gets its name, by the strongest reader at hand.

1. llama.cpp itself, when lorakit has built it on this machine (`llama_cpp.build_probe`): its logits on a fixed
   batch against the merged safetensors model's in transformers.
2. Else transformers' GGUF loader, for the families it reads faithfully (Llama and Mistral without Llama 3
   RoPE scaling, Qwen2); it ignores rope_freqs, Qwen3's head_dim, Gemma's soft-capping and sliding
   window, so a reload of those would differ from the model and prove nothing.
3. Else every stored tensor, read back by gguf's reader and dequantized, against the merged weight as
   llama.cpp stores it: names, shapes and values, not the model's behaviour (the report says which).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import LorakitError
from ..model.batches import sample_inputs
from .families import FAMILIES, adjusted, rope
from .llama_cpp import find_probe
from .llama_cpp import logits as llama_cpp_logits

# Measured on SmolLM2-135M-Instruct and tiny models of each family (README, tests/test_gguf_llama_cpp.py): in
# llama.cpp, f32 weights give the merged logits to ~5e-7 of their largest value (Gemma 3e-4: llama.cpp's GELU),
# f16 to ~1e-3, q8_0 to ~4e-2 on tiny random models (2.3e-2 on SmolLM2). The bounds leave room above those.
TOLERANCE = {"f32": 1e-3, "f16": 0.01, "q8_0": 0.08}  # times max |logit| of the merged model
# Per tensor, times its max |value|: f16 rounds to 2^-11 relative, q8_0 to 1/254 of a 32-value block's max.
TENSOR_TOLERANCE = {"f32": 1e-6, "f16": 1e-3, "q8_0": 1e-2}
TRANSFORMERS_READS = ("llama", "mistral", "qwen2")


def verify_gguf(folder: Path, file: Path, config: Any, gguf_type: str, plan: list, extra: dict) -> dict:
    probe = find_probe()
    if probe is None and (config.model_type not in TRANSFORMERS_READS
                          or rope(config).get("rope_type", "default") != "default"):
        return _verify_tensors(folder, file, config, gguf_type, plan, extra)
    import torch
    from transformers import AutoModelForCausalLM

    inputs = sample_inputs(config)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()(**inputs).logits
        if probe is not None:
            actual = torch.stack([torch.from_numpy(llama_cpp_logits(probe, file, row.tolist()))
                                  for row in inputs["input_ids"]])
            reader = "llama.cpp (lorakit's probe of libllama)"
        else:
            reloaded = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name,
                                                            dtype=torch.float32).eval()
            actual = reloaded(**inputs).logits.float()
            reader = "transformers' GGUF loader"
    difference = float((expected - actual).abs().max())
    scale = float(expected.abs().max())
    tolerance = TOLERANCE[gguf_type] * scale
    agree = float((expected.argmax(-1) == actual.argmax(-1)).float().mean())
    figures = {"max_abs_logit_difference": difference, "max_abs_logit": scale, "tolerance": tolerance,
               "top1_agreement": agree, "reference": "the merged safetensors model, fp32", "run_by": reader,
               "sample": {k: list(v.shape) for k, v in inputs.items()},
               "summary": f"run by {reader}: max |logit difference| {difference:.2e} (tolerance {tolerance:.1e}, "
                          f"top-1 agreement {agree:.0%})"}
    if not difference <= tolerance:
        raise LorakitError(f"GGUF verification failed: logits differ by {difference:.3g} (tolerance {tolerance:.3g}, "
                           f"run by {reader})", hint="nothing was written; report this with the model and adapter")
    return figures


def _verify_tensors(folder: Path, file: Path, config: Any, gguf_type: str, plan: list, extra: dict) -> dict:
    import gguf
    import numpy as np
    from safetensors import safe_open

    reader = gguf.GGUFReader(str(file))
    stored = {t.name: t for t in reader.tensors}
    worst = 0.0
    for key, shard, gguf_name, shape, _ in plan:
        if gguf_name not in stored:
            raise LorakitError(f"GGUF verification failed: {gguf_name} is missing from the file",
                               hint="nothing was written; report this with the model and adapter")
        tensor = stored[gguf_name]
        if shard is None:
            expected = extra[key]
        else:
            with safe_open(str(shard), "pt") as handle:
                expected = adjusted(handle.get_tensor(key).float().numpy(), gguf_name, key, config,
                                    FAMILIES[config.model_type])
        values = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        error = float(np.abs(values - expected).max()) / max(float(np.abs(expected).max()), 1e-12)
        worst = max(worst, error)
        if not error <= TENSOR_TOLERANCE[gguf_type]:
            raise LorakitError(f"GGUF verification failed: {gguf_name} differs from {key} by {error:.3g} of its "
                               "largest value", hint="nothing was written; report this with the model and adapter")
    return {"max_relative_tensor_difference": worst, "tolerance": TENSOR_TOLERANCE[gguf_type],
            "tensors": len(plan), "run_by": "gguf's reader, tensor by tensor",
            "summary": f"read back by gguf's reader: {len(plan)} tensors within {worst:.1e} of the merged weights "
                       f"(tolerance {TENSOR_TOLERANCE[gguf_type]:.0e}); no llama.cpp build here, so no logits check "
                       "(python -c 'import lorakit.gguf.llama_cpp as l; l.build_probe()' adds one)"}
