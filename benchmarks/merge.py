"""Streamed merge against transformers load + peft merge_and_unload + save_pretrained.

A Llama built from a config (hidden 1024, 16 blocks, ~271M parameters, ~1.08 GB
in fp32) is saved in 200 MB shards with a LoRA r=16 adapter on every linear
layer. Each run is a fresh process; A (baseline) and B (lorakit, --no-verify,
like the baseline) alternate, then A and C (lorakit with its verification on).
Targets: B/A wall time <= 0.8, peak RSS <= 0.5; C/A peak RSS <= 0.5 (issues 15, 24). C checks every
merged tensor against base + scale·B·A (lorakit.deploy.verify_streamed); the logits check is skipped by its size
rule (938 MiB of fp32 weights > 768 MiB).

Then a 70B-shaped synthetic merge (`--big`): two decoder layers of Llama-3-70B's shape (hidden 8192,
intermediate 28672, 64 heads, 8 KV heads; vocabulary 8192 to keep it ~3.5 GB of bf16 on disk), written tensor
by tensor, an r=16 peft adapter on every linear layer, merged and verified by streaming in a fresh process:
its peak RSS is bounded by the largest tensor (28672 x 8192), not the model. Needs ~7.5 GB of disk, removed after.

    python -m benchmarks.merge [--repeats 3] [--workdir /tmp/lorakit-merge-bench] [--big | --only-big]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .common import alternate, python_code, run_measured, save

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


def prepare_70b_shaped(workdir: Path) -> tuple[Path, Path]:
    """A bf16 checkpoint of 2 Llama-3-70B-shaped layers, one shard per tensor group, and an r=16 adapter."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    base, adapter = workdir / "base-70b-shaped", workdir / "adapter-70b-shaped"
    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=2, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=8192, dtype="bfloat16", tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    config.save_pretrained(base)
    hidden, inner, kv = 8192, 28672, 8 * 128
    shapes = {"model.embed_tokens.weight": (8192, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (8192, hidden)}
    linear = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inner, hidden), "mlp.up_proj": (inner, hidden), "mlp.down_proj": (hidden, inner)}
    for layer in range(2):
        shapes.update({f"model.layers.{layer}.{m}.weight": shape for m, shape in linear.items()})
        shapes.update({f"model.layers.{layer}.{n}.weight": (hidden,)
                       for n in ("input_layernorm", "post_attention_layernorm")})
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for number, (name, shape) in enumerate(shapes.items()):
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16) if len(shape) == 2 else \
            torch.ones(shape, dtype=torch.bfloat16)
        file = f"model-{number:05d}.safetensors"
        save_file({name: tensor}, str(base / file), metadata={"format": "pt"})
        weight_map[name] = file
        del tensor
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    lora = {}
    for layer in range(2):
        for module, (out_features, in_features) in linear.items():
            key = f"base_model.model.model.layers.{layer}.{module}"
            lora[f"{key}.lora_A.weight"] = torch.randn(16, in_features, generator=generator) / in_features ** 0.5
            lora[f"{key}.lora_B.weight"] = torch.randn(out_features, 16, generator=generator) * 0.01
    LoraConfig(r=16, lora_alpha=32, target_modules=sorted({m.split(".")[1] for m in linear}),
               base_model_name_or_path=str(base)).save_pretrained(adapter)
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    return base, adapter


BIG = """
import json, sys
import lorakit
base, adapter, out = sys.argv[1:4]
report = lorakit.merge(base, adapter, out, force=True)
print(json.dumps(report["verification"]))
"""


def big(workdir: Path) -> dict:
    """The 70B-shaped merge, verified, in a fresh process: wall time and peak RSS."""
    big_dir = workdir / "70b-shaped"
    big_dir.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run([sys.executable, "-c", f"from benchmarks.merge import prepare_70b_shaped; "
                        f"from pathlib import Path; prepare_70b_shaped(Path({str(big_dir)!r}))"], check=True,
                       cwd=Path(__file__).parent.parent)
        base, adapter = big_dir / "base-70b-shaped", big_dir / "adapter-70b-shaped"
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        largest = max(p.stat().st_size for p in base.glob("*.safetensors"))
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        wall, peak = run_measured(python_code(BIG) + [str(base), str(adapter), str(big_dir / "merged")], env)
        report = json.loads((big_dir / "merged" / "merge_report.json").read_text())
        figures = {"base_bytes": size, "largest_tensor_bytes": largest, "wall_s": wall, "peak_rss_bytes": peak,
                   "peak_rss_over_base": peak / size, "verification": report["verification"],
                   "note": "2 layers of Llama-3-70B shape (vocabulary 8192), bf16, r=16 on every linear layer; "
                           "lorakit.merge with verification on (module by module; the logits check skipped by "
                           "its size rule)"}
    finally:
        shutil.rmtree(big_dir, ignore_errors=True)
    save("cpu", "merge_70b_shaped_verified", figures)
    print(f"70B-shaped: base {size / 2**30:.2f} GiB, largest tensor {largest / 2**20:.0f} MiB; verified merge "
          f"{wall:.1f} s, peak RSS {peak / 2**30:.2f} GiB")
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/lorakit-merge-bench")
    parser.add_argument("--big", action="store_true", help="also the 70B-shaped synthetic merge (~7.5 GB of disk)")
    parser.add_argument("--only-big", action="store_true", help="only the 70B-shaped synthetic merge")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.only_big:
        return big(workdir)
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
                     "note": "A as above; B: lorakit.merge streamed with verification on: every merged tensor "
                             "against base + scale·B·A on random probes (verify_streamed); the logits check "
                             "skipped by its size rule"})
    save("cpu", "merge_1gb_verified", verified)
    print(f"verified: {verified['b_wall_s']:.1f} s {verified['b_peak_rss_bytes'] / 2**20:.0f} MiB; "
          f"peak RSS ratio {verified['peak_rss_ratio']:.2f}")
    figures["verified"] = verified
    print(f"base {size / 2**30:.2f} GiB in {shards} shards; baseline {figures['a_wall_s']:.1f} s "
          f"{figures['a_peak_rss_bytes'] / 2**20:.0f} MiB, streamed {figures['b_wall_s']:.1f} s "
          f"{figures['b_peak_rss_bytes'] / 2**20:.0f} MiB; wall ratio {figures['wall_ratio']:.2f}, "
          f"peak RSS ratio {figures['peak_rss_ratio']:.2f} -> {path}")
    if args.big:
        figures["big"] = big(workdir)
    return figures


if __name__ == "__main__":
    main()
