"""Measured CUDA training-step memory: the ground truth the memory simulator is checked against.

    python -m benchmarks.memory_cuda                  # the whole matrix, ~3-5 min on one H100
    python -m benchmarks.memory_cuda --only smollm2-135m:lora:sdpa:0:512

Each configuration runs in a fresh process (so one run's cached blocks never
count in another's), several at a time: `max_memory_allocated` and
`max_memory_reserved` are per process. Models are Llama-style configs with
random weights (nothing downloads): TinyLlama-1.1B's shape and SmolLM2-135M's.
Memory does not depend on weight values.

One step is what `LoraTrainer` runs with `training_args()` on a bf16-capable
GPU: forward under bf16 autocast with labels (the model's own causal-LM loss),
backward, gradient clipping at Trainer's default 1.0, the optimizer Trainer
picks for those arguments, and zero_grad(set_to_none=True). Step 1 creates the
optimizer state; step 2 is the steady state.
Results: benchmarks/results/memory-cuda-<gpu>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODELS = {
    # TinyLlama-1.1B's shape: ~1.1B parameters
    "llama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       tie_word_embeddings=False),
    # SmolLM2-135M(-Instruct)'s shape
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True),
}
METHODS = ("full", "lora", "qlora")
LORA = dict(r=16, alpha=32, dropout=0.05, targets="all-linear")
BATCH = 1


def configurations() -> list[str]:
    return [f"{m}:{method}:{attn}:{int(ckpt)}:{seq}" for m, method, attn, ckpt, seq in itertools.product(
        MODELS, METHODS, ("sdpa", "eager"), (False, True), (512, 2048))]


def build(model_name: str, method: str, attn: str, checkpointing: bool):
    """The model as a user would have it before training: bf16 on the GPU, wrapped by lorakit."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import lorakit

    config = LlamaConfig(**MODELS[model_name], architectures=["LlamaForCausalLM"])
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation=attn)
    if method == "lora":
        model = lorakit.wrap(model, lora=lorakit.Lora(**LORA))
    elif method == "qlora":
        model = lorakit.wrap(model, lora=lorakit.Lora(**LORA),
                             quant=lorakit.Quant(bits=4, compute_dtype="bfloat16"))
    if checkpointing:  # what Trainer does for gradient_checkpointing=True with lorakit's kwargs
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def one(key: str) -> dict:
    """Run one configuration in this process; return its numbers."""
    import torch
    from transformers import Trainer

    import lorakit

    model_name, method, attn, ckpt, seq = key.split(":")
    checkpointing, seq = bool(int(ckpt)), int(seq)
    torch.manual_seed(0)
    model = build(model_name, method, attn, checkpointing)
    torch.cuda.synchronize()
    setup_allocated = torch.cuda.memory_allocated()
    args = lorakit.training_args("/tmp/lorakit-memory", gradient_checkpointing=checkpointing)
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], **optimizer_kwargs)
    ids = torch.randint(0, MODELS[model_name]["vocab_size"], (BATCH, seq), device="cuda")
    steps = []
    for _ in range(2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        steps.append({"peak_allocated": torch.cuda.max_memory_allocated(),
                      "peak_reserved": torch.cuda.max_memory_reserved(),
                      "allocated_after": torch.cuda.memory_allocated(), "loss": float(loss)})
    return {"key": key, "model": model_name, "method": method, "attn": attn, "gradient_checkpointing": checkpointing,
            "batch": BATCH, "seq": seq, "dtype": "bfloat16", "autocast": "bfloat16", "lora": LORA,
            "optimizer": f"{optimizer_cls.__module__}.{optimizer_cls.__name__}",
            "optimizer_kwargs": {k: v for k, v in optimizer_kwargs.items() if isinstance(v, (int, float, str, bool))},
            "max_grad_norm": args.max_grad_norm,
            "parameters": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "setup_allocated": setup_allocated, "step1": steps[0], "step2": steps[1]}


def cuda_context_bytes() -> int:
    """Device memory a bare CUDA context takes beside what the caching allocator holds."""
    import torch

    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def environment() -> dict:
    import torch

    from .common import environment as machine

    return dict(machine(), device=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                total_memory=torch.cuda.get_device_properties(0).total_memory)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="one configuration key, run in this process (prints RESULT json)")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/memory-cuda-<gpu>.json)")
    args = parser.parse_args(argv)
    if args.only:
        print("RESULT " + json.dumps(one(args.only)), flush=True)
        return {}
    # measured alone, before the workers start: mem_get_info is device-wide
    context = subprocess.run([sys.executable, "-c", "from benchmarks.memory_cuda import cuda_context_bytes as c; "
                              "print(c())"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent.parent).stdout.split()[-1]

    def run(key: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "benchmarks.memory_cuda", "--only", key], capture_output=True,
                              text=True, cwd=Path(__file__).parent.parent)
        if done.returncode != 0 or "RESULT " not in done.stdout:
            return {"key": key, "error": done.stderr[-2000:]}
        result = json.loads(done.stdout.split("RESULT ", 1)[1])
        print(f"{key:40s} peak {result['step1']['peak_allocated'] / 2**30:7.3f} GiB", flush=True)
        return result

    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(run, configurations()))
    import torch

    out = Path(args.out) if args.out else (Path(__file__).parent / "results" /
                                           f"memory-cuda-{torch.cuda.get_device_name(0).split()[-1].lower()}.json")
    result = {"environment": environment(), "cuda_context_bytes": int(context), "runs": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}: {sum('error' not in r for r in rows)} runs, {sum('error' in r for r in rows)} errors")
    return result


if __name__ == "__main__":
    main()
