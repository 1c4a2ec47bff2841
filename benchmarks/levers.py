"""Issue 22's targets for the memory levers, side by side in one run (CPU; no GPU needed):

    python -m benchmarks.levers            # writes benchmarks/results/levers-cpu.json

1. Llama-3.1-8B, LoRA r=16 all-linear, checkpointing, batch 1, seq 8192: the simulated peak allocated with
   LoraTrainer's levers (chunked loss, LoRA inputs left in bf16) vs a plain loop's step. Target: <= 20 GiB.
2. QLoRA 8B: simulated weights (setup allocated). Target: <= 6.0 GiB.
3. A real LoraTrainer step of a tiny Llama with a 32k vocabulary at seq 1024, on CPU: peak live tensor bytes
   (`counting.LiveBytes(real tensors, open_custom_ops=True)`: every storage, also inside torch's chunked op)
   and step time, chunked loss vs standard. Targets: <= 0.5x the bytes, <= 1.1x the time.
4. `lorakit fit` for 8B on 24 GiB at seq 8192, global batch 32: the configuration each method gets.
5. A real LoraTrainer step with checkpointing of a tiny Llama with a wide MLP at seq 4096, on CPU: peak live bytes,
   step time and gradients, MLPs whole vs tiled. Targets: <= 0.5x the bytes, <= 1.2x the time, equal gradients.
6. `lorakit fit --max-seq-len` for 8B, QLoRA r=32 and LoRA r=16, on 24 and 80 GiB, with every lever and with
   checkpointing alone. Goals: QLoRA on 80 GB >= 342,733 tokens, LoRA on 24 GB >= 32,768.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
GIB = 2**30


def simulated_8b() -> dict:
    import lorakit
    from lorakit.cost.simulate import simulate

    lora = lorakit.Lora(r=16, targets="all-linear")
    common = dict(lora=lora, batch_size=1, seq_len=8192, gradient_checkpointing=True)
    plain = simulate("meta-llama/Llama-3.1-8B", chunked_loss=False, peft_input_cast=True, **common)
    levers = simulate("meta-llama/Llama-3.1-8B", **common)
    offload = simulate("meta-llama/Llama-3.1-8B", activation_offload=True, **common)
    qlora = simulate("meta-llama/Llama-3.1-8B", lora=lora, quant=lorakit.Quant(bits=4, compute_dtype="bfloat16"),
                     batch_size=1, seq_len=8192, gradient_checkpointing=True)
    return {"lora_seq8192_plain_loop_gib": plain.peak_allocated / GIB,
            "lora_seq8192_loratrainer_gib": levers.peak_allocated / GIB,
            "lora_seq8192_loratrainer_peak_module": levers.peak_module,
            "lora_seq8192_with_offload_gib": offload.peak_allocated / GIB,
            "lora_seq8192_offloaded_host_gib": offload.host_peak / GIB,
            "qlora_weights_gib": qlora.setup_allocated / GIB,
            "qlora_seq8192_loratrainer_gib": qlora.peak_allocated / GIB,
            "targets": {"lora_seq8192_loratrainer_gib": 20.0, "qlora_weights_gib": 6.0}}


def measured_steps(trainer, model, batch: dict, repeats: int) -> tuple[int, float]:
    """One more training step (after the caller's warm-up) counted by `LiveBytes` on real tensors, then `repeats`
    timed: its peak live bytes and the median step time."""
    from lorakit.cost.counting import LiveBytes

    counter = LiveBytes(cuda=False, open_custom_ops=True)
    with counter:
        trainer.training_step(model, dict(batch))
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        trainer.training_step(model, dict(batch))
        times.append(time.perf_counter() - started)
    return counter.peak, statistics.median(times)


def real_step(vocab: int = 32000, seq: int = 1024, repeats: int = 5) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=seq)
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0))
    out: dict = {"model": f"tiny Llama (hidden 256, 2 layers, vocab {vocab})", "batch": 2, "seq": seq}
    for name, chunked in (("standard", False), ("chunked", None)):
        torch.manual_seed(0)
        args = lorakit.training_args("/tmp/lorakit-levers-bench", chunked_loss=chunked, save_strategy="no")
        trainer = lorakit.LoraTrainer(model=LlamaForCausalLM(config), args=args, train_dataset=[{"input_ids": ids[0]}],
                                      lora=lorakit.Lora(r=8, targets="all-linear"), check_gradients=False)
        model = trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which is not run here
        batch = {"input_ids": ids, "labels": ids}
        trainer.training_step(model, dict(batch))  # warm-up
        peak, seconds = measured_steps(trainer, model, batch, repeats)
        out[name] = {"peak_live_bytes": peak, "step_seconds": seconds, "uses_chunked_loss": trainer._chunked_loss}
    out["bytes_ratio"] = out["chunked"]["peak_live_bytes"] / out["standard"]["peak_live_bytes"]
    out["time_ratio"] = out["chunked"]["step_seconds"] / out["standard"]["step_seconds"]
    out["targets"] = {"bytes_ratio": 0.5, "time_ratio": 1.1}
    return out


def real_tiled_step(seq: int = 4096, repeats: int = 5) -> dict:
    """A real LoraTrainer step with checkpointing of a tiny Llama whose MLP is 16 times as wide as the model, on
    CPU, with the MLPs whole and tiled: peak live bytes, median step time, and the largest difference between the
    two steps' gradients. Targets: <= 0.5x the bytes, <= 1.2x the time, gradients equal (1e-6)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    config = LlamaConfig(hidden_size=256, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=seq)
    ids = torch.randint(0, 512, (1, seq), generator=torch.Generator().manual_seed(0))
    out: dict = {"model": "tiny Llama (hidden 256, MLP 4096, 2 layers), LoRA r=8 all-linear, checkpointing",
                 "batch": 1, "seq": seq}
    grads = {}
    for name, tiled in (("whole", False), ("tiled", True)):
        torch.manual_seed(0)
        args = lorakit.training_args("/tmp/lorakit-levers-bench", tiled_mlp=tiled, save_strategy="no",
                                     gradient_checkpointing=True)
        trainer = lorakit.LoraTrainer(model=LlamaForCausalLM(config), args=args, train_dataset=[{"input_ids": ids[0]}],
                                      lora=lorakit.Lora(r=8, targets="all-linear", dropout=0.0),
                                      check_gradients=False)
        model = trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's own loop, which is not run here
        batch = {"input_ids": ids, "labels": ids}
        model.zero_grad()
        trainer.training_step(model, dict(batch))  # warm-up, and the gradients of the first step
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        peak, seconds = measured_steps(trainer, model, batch, repeats)
        out[name] = {"peak_live_bytes": peak, "step_seconds": seconds}
    out["bytes_ratio"] = out["tiled"]["peak_live_bytes"] / out["whole"]["peak_live_bytes"]
    out["time_ratio"] = out["tiled"]["step_seconds"] / out["whole"]["step_seconds"]
    out["max_gradient_difference"] = max(float((grads["tiled"][k] - grads["whole"][k]).abs().max())
                                         for k in grads["whole"])
    out["targets"] = {"bytes_ratio": 0.5, "time_ratio": 1.2, "max_gradient_difference": 1e-6}
    return out


def longest_8b() -> list[dict]:
    """Issue 35's table: the longest context that fits for Llama-3.1-8B, QLoRA r=32 and LoRA r=16 (all-linear), on
    24 and 80 GiB, with every lever LoraTrainer has and with a plain recipe (gradient checkpointing alone, the
    standard loss: Hugging Face's Trainer with peft). Goals: QLoRA r=32 on 80 GB >= 342,733 tokens (unsloth's
    published figure), LoRA r=16 on 24 GB >= 32,768."""
    import lorakit
    from lorakit.cost.longest import longest

    rows = []
    for method, rank in (("qlora", 32), ("lora", 16)):
        for gib in (24, 80):
            for recipe, levers in (("LoraTrainer's levers", None), ("plain: checkpointing only", ("checkpointing",))):
                started = time.perf_counter()
                answer, = longest("meta-llama/Llama-3.1-8B", gib * GIB, methods=(method,), levers=levers,
                                  lora=lorakit.Lora(r=rank, targets="all-linear"))
                rows.append({"method": method, "r": rank, "gpu_gib": gib, "recipe": recipe,
                             "longest": answer.seq_len, "levers": answer.levers,
                             "device_gib": answer.device_bytes / GIB, "host_gib": answer.host_bytes / GIB,
                             "peak": f"{answer.peak_phase} in {answer.peak_module}",
                             "seconds": time.perf_counter() - started})
    return rows


def fit_8b() -> list[dict]:
    from lorakit.cost.fit import choices_json, fit

    choices = fit("meta-llama/Llama-3.1-8B", "24GiB", seq_len=8192, global_batch=32)
    return [{k: v for k, v in c.items() if k != "tried"} | {"simulated_runs": len(c["tried"])}
            for c in choices_json(choices)]


def main() -> dict:
    import torch

    results = {"machine": f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}",
               "date": time.strftime("%Y-%m-%d"), "simulated_llama_3_1_8b": simulated_8b(),
               "real_cpu_step": real_step(), "real_cpu_tiled_mlp_step": real_tiled_step()}
    started = time.perf_counter()
    results["fit_llama_3_1_8b_24gib_seq8192_global32"] = fit_8b()
    results["fit_seconds"] = time.perf_counter() - started
    results["longest_context_llama_3_1_8b"] = longest_8b()
    results["longest_context_goals"] = {"qlora_r32_80gib": 342733, "lora_r16_24gib": 32768}
    path = HERE / "results" / "levers-cpu.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    json.dump(results, sys.stdout, indent=2)
    return results


if __name__ == "__main__":
    main()
