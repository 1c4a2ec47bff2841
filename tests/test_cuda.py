"""On a CUDA GPU (skipped elsewhere): LoraTrainer's memory check, and LoRA / QLoRA training in bf16.

Models are Llama-style configs with random weights (SmolLM2-135M's shape): nothing downloads.
"""

from __future__ import annotations

import logging

import pytest
import torch

import lorakit

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
               tie_word_embeddings=True)


def smollm2_shaped():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**SMOLLM2, architectures=["LlamaForCausalLM"]),
                                                dtype=torch.bfloat16, attn_implementation="sdpa")


def data(n: int = 16, seq: int = 512):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (n, seq), generator=g).tolist()
    return [{"input_ids": row, "labels": row} for row in ids]


@pytest.mark.parametrize("quant,checkpointing", [(None, False), (None, True), ("4bit", False)])
def test_trainer_logs_a_simulated_peak_within_ten_percent_of_the_measured_one(tmp_path, caplog, quant,
                                                                                checkpointing):
    args = lorakit.training_args(str(tmp_path), max_steps=2, per_device_train_batch_size=2, save_strategy="no",
                                 logging_steps=1, gradient_checkpointing=checkpointing, disable_tqdm=True)
    assert args.bf16  # lorakit's default on a bf16-capable GPU
    trainer = lorakit.LoraTrainer(model=smollm2_shaped(), args=args, train_dataset=data(),
                                  lora=lorakit.Lora(r=16, alpha=32, dropout=0.05, targets="all-linear"),
                                  quant=lorakit.Quant(bits=4, compute_dtype="bfloat16") if quant else None)
    torch.cuda.reset_peak_memory_stats()
    with caplog.at_level(logging.INFO, logger="lorakit"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if "peak memory after step 1" in r.getMessage()]
    assert lines, [r.getMessage() for r in caplog.records]
    print(lines[0])
    assert not [r for r in caplog.records if "differs from the measured" in r.getMessage()]


def test_qlora_trains_on_the_gpu_and_its_loss_falls(tmp_path):
    args = lorakit.training_args(str(tmp_path), max_steps=30, per_device_train_batch_size=4, learning_rate=2e-3,
                                 save_strategy="no", logging_steps=1, disable_tqdm=True)
    repeated = data(4, 128) * 8  # four sequences to memorise
    trainer = lorakit.LoraTrainer(model=smollm2_shaped(), args=args, train_dataset=repeated,
                                  lora=lorakit.Lora(r=16), quant="4bit")
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0] - 1.0, losses  # random tokens over a 49k vocabulary: 10.9 -> 8.0 on an H100
