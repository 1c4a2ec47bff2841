"""One benchmark configuration in a fresh process; prints one JSON line.

    python -m benchmarks.worker --mode lorakit --size small --steps 10 --warmup 3

Modes:
  peft      raw peft.get_peft_model + transformers.Trainer (the baseline of the overhead figure)
Models load from /tmp/lorakit-bench-models/<size>, written once by `model_dir` (call it before timing).
  lorakit   lorakit.wrap + LoraTrainer, the same LoRA
  full      full fine-tuning (every parameter trainable), LoraTrainer
  lora      LoRA r=16 on every linear layer, LoraTrainer
  lora4bit  the same LoRA on a 4-bit nf4 base
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks.common import peak_rss_bytes

SIZES = {  # Llama built from a config; "100m" is ~110M parameters
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, batch=2, seq=32),
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=4096, batch=8, seq=64),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=16000, batch=2, seq=128),
}


def model_dir(size: str) -> str:
    """The model of this size saved once (seeded), so every run loads the same weights from disk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = f"/tmp/lorakit-bench-models/{size}"
    if not os.path.exists(os.path.join(path, "config.json")):
        config = {k: v for k, v in SIZES[size].items() if k not in ("batch", "seq")}
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(path + ".tmp")
        os.replace(path + ".tmp", path)
    return path


def rss_now() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", required=True, choices=["peft", "lorakit", "full", "lora", "lora4bit"])
    parser.add_argument("--size", default="small", choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import transformers
    from transformers import LlamaConfig, TrainerCallback

    import lorakit

    size = dict(SIZES[args.size])
    batch, seq = size.pop("batch"), size.pop("seq")
    path = model_dir(args.size)
    baseline_rss = rss_now()
    # from disk, as users load: a 4-bit model never holds its fp32 weights all at once
    model = lorakit.load(path, quant="4bit" if args.mode == "lora4bit" else None)
    g = torch.Generator().manual_seed(0)
    total = args.warmup + args.steps
    ids = torch.randint(0, size["vocab_size"], (batch * total, seq), generator=g).tolist()
    # a plain list serves Trainer as well as a datasets.Dataset, and the GPU machine has no datasets
    data = [{"input_ids": row, "labels": row} for row in ids]
    cuda = args.device == "cuda"
    train_args = transformers.TrainingArguments(
        output_dir="/tmp/lorakit-bench", max_steps=total, per_device_train_batch_size=batch, learning_rate=1e-4,
        save_strategy="no", eval_strategy="no", logging_steps=1, seed=0, report_to="none", disable_tqdm=True,
        use_cpu=not cuda, bf16=cuda, dataloader_drop_last=True)
    lora = lorakit.Lora(r=16, alpha=32, targets="all-linear")
    predicted = None
    if args.mode == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    if args.mode in ("lorakit", "lora", "lora4bit"):
        model = lorakit.wrap(model, lora=lora)
    if cuda:
        model = model.to("cuda")

    times: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer_cls = transformers.Trainer if args.mode == "peft" else lorakit.LoraTrainer
    trainer = trainer_cls(model=model, args=train_args, train_dataset=data, callbacks=[Clock()])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainer.train()
    measured = peak_rss_bytes()  # VmHWM: not the parent's high-water mark that ru_maxrss inherits
    if args.mode in ("full", "lora", "lora4bit"):
        # predicted from the config alone (meta device), as compare-parameters would
        report = lorakit.report(LlamaConfig(**size, architectures=["LlamaForCausalLM"]), lora=lora,
                                quant="4bit" if args.mode == "lora4bit" else None, dtype="float32",
                                batch_size=batch, seq_len=seq)
        states = report.total.full_finetune_memory_bytes if args.mode == "full" else report.total.memory_bytes
        predicted = {"weights_grads_optimizer": states, "activations": report.activation_bytes}
    result = {"mode": args.mode, "size": args.size, "batch": batch, "seq": seq, "trainable": trainable,
              "step_seconds": times[args.warmup:], "losses": losses, "peak_rss_bytes": measured,
              "baseline_rss_bytes": baseline_rss, "predicted": predicted,
              "tokens_per_second": batch * seq / statistics.median(times[args.warmup:])}
    if cuda:
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
