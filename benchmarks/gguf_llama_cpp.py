"""How close llama.cpp runs lorakit's GGUF files to transformers, per family and weight type.

Each family of the GGUF test list (tests/gguf_models.py: one list, that the tests and the README table share)
gets a tiny model with a trained-looking LoRA adapter, merged; the merged folder is exported as f32, f16 and
q8_0 and run by llama.cpp (lorakit's probe of libllama, built once: lorakit.gguf.llama_cpp.build_probe). Figures:
max |llama.cpp - transformers| over the largest logit, and top-1 agreement, on 2 x 24 random ids.

    python -m benchmarks.gguf_llama_cpp
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from .common import save  # noqa: E402


def main() -> dict:
    import numpy as np
    import torch
    from gguf_models import FAMILIES, tiny_family
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.gguf import llama_cpp
    from lorakit.gguf.export import export_gguf

    probe = llama_cpp.build_probe()
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(7))
    figures = {}
    for name in FAMILIES:
        folder = Path(tempfile.mkdtemp())
        base, adapter = tiny_family(name, folder)
        lorakit.merge(base, adapter, folder / "merged", verify=False)
        with torch.no_grad():
            expected = AutoModelForCausalLM.from_pretrained(folder / "merged", dtype=torch.float32).eval()(
                input_ids=ids).logits.numpy()
        row = {}
        for gguf_type in ("f32", "f16", "q8_0"):
            export_gguf(folder / "merged", folder / f"{gguf_type}.gguf", gguf_type, verify=False)
            actual = np.stack([llama_cpp.logits(probe, folder / f"{gguf_type}.gguf", r.tolist()) for r in ids])
            row[gguf_type] = {"relative": float(np.abs(expected - actual).max() / np.abs(expected).max()),
                              "top1": float((expected.argmax(-1) == actual.argmax(-1)).mean())}
        figures[name] = row
        print(name, " | ".join(f"{t} {v['relative']:.2e} top-1 {v['top1']:.1%}" for t, v in row.items()), flush=True)
    save("gguf-llama-cpp-cpu", "tiny_families", figures)
    return figures


if __name__ == "__main__":
    main()
