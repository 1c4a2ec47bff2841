"""Streamed merge against transformers load + peft merge_and_unload + save_pretrained.

A Llama built from a config (hidden 1024, 16 blocks, ~271M parameters, ~1.08 GB
in fp32) is saved in 200 MB shards with a LoRA r=16 adapter on every linear
layer. Each run is a fresh process; A (baseline) and B (lorakit, --no-verify,
like the baseline) alternate, then A and C (lorakit with its verification on).
Targets: B/A wall time <= 0.8, peak RSS <= 0.5; C/A peak RSS <= 0.5 (issue 15).

    python -m benchmarks.merge [--repeats 3] [--workdir /tmp/lorakit-merge-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .common import alternate, python_code, save

BASELINE = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="200MB")
"""
STREAMED = """
import sys
import lorakit
base, adapter, out = sys.argv[1:4]
lorakit.merge(base, adapter, out, verify=False, force=True)
"""
VERIFIED = STREAMED.replace("verify=False", "verify=True")


def prepare(workdir: Path) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    base, adapter = workdir / "base", workdir / "adapter"
    if (base / "model.safetensors.index.json").exists() and (adapter / "adapter_model.safetensors").exists():
        return base, adapter
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000)
    LlamaForCausalLM(config).save_pretrained(base, max_shard_size="200MB")
    model = lorakit.wrap(lorakit.load(base), lora=lorakit.Lora(r=16, targets="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    model.save_pretrained(adapter)
    return base, adapter


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/lorakit-merge-bench")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # built in a child process: the parent stays small
    subprocess.run([sys.executable, "-c", f"from benchmarks.merge import prepare; from pathlib import Path; "
                    f"prepare(Path({str(workdir)!r}))"], check=True, cwd=Path(__file__).parent.parent)
    base, adapter = workdir / "base", workdir / "adapter"
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    shards = len(list(base.glob("*.safetensors")))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out_a, out_b = workdir / "out-baseline", workdir / "out-streamed"
    for out in (out_a, out_b):
        shutil.rmtree(out, ignore_errors=True)
    figures = alternate(python_code(BASELINE) + [str(base), str(adapter), str(out_a)],
                        python_code(STREAMED) + [str(base), str(adapter), str(out_b)],
                        repeats=args.repeats, warmup=0, env=env)
    figures.update({"base_bytes": size, "base_shards": shards, "targets": {"wall_ratio": 0.8, "peak_rss_ratio": 0.5},
                    "note": "A: from_pretrained + PeftModel + merge_and_unload + save_pretrained; "
                            "B: lorakit.merge streamed, verify=False (the baseline verifies nothing either)"})
    path = save("cpu", "merge_1gb", figures)
    out_c = workdir / "out-verified"
    shutil.rmtree(out_c, ignore_errors=True)
    verified = alternate(python_code(BASELINE) + [str(base), str(adapter), str(out_a)],
                         python_code(VERIFIED) + [str(base), str(adapter), str(out_c)],
                         repeats=args.repeats, warmup=0, env=env)
    verified.update({"base_bytes": size, "base_shards": shards, "targets": {"peak_rss_ratio": 0.5},
                     "note": "A as above; B: lorakit.merge streamed with verification on (peft reference "
                             "forward, then the merged model's)"})
    save("cpu", "merge_1gb_verified", verified)
    print(f"verified: {verified['b_wall_s']:.1f} s {verified['b_peak_rss_bytes'] / 2**20:.0f} MiB; "
          f"peak RSS ratio {verified['peak_rss_ratio']:.2f}")
    figures["verified"] = verified
    print(f"base {size / 2**30:.2f} GiB in {shards} shards; baseline {figures['a_wall_s']:.1f} s "
          f"{figures['a_peak_rss_bytes'] / 2**20:.0f} MiB, streamed {figures['b_wall_s']:.1f} s "
          f"{figures['b_peak_rss_bytes'] / 2**20:.0f} MiB; wall ratio {figures['wall_ratio']:.2f}, "
          f"peak RSS ratio {figures['peak_rss_ratio']:.2f} -> {path}")
    return figures


if __name__ == "__main__":
    main()
