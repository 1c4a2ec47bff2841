"""Helper for test_sharding: one LoraTrainer run, plain (one process) or sharded under torchrun (gloo, CPU).

usage: shard_train.py OUT MODE ADAPTER PER_DEVICE [--save-steps N] [--resume] [--stop-after N]
MODE: single | fsdp | zero2 | zero3; ADAPTER: lora | qlora.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import lorakit  # noqa: E402
from test_trainer import token_data  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("mode", choices=["single", "fsdp", "zero2", "zero3"])
parser.add_argument("adapter", choices=["lora", "qlora"])
parser.add_argument("per_device", type=int)
parser.add_argument("--save-steps", type=int, default=0)
parser.add_argument("--resume", action="store_true")
parser.add_argument("--stop-after", type=int, default=0, help="end training after this step (an interrupted run)")
options = parser.parse_args()

torch.manual_seed(0)
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback  # noqa: E402

# dropout off: each process draws its own masks, so with dropout the runs could not match
model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, vocab_size=100, num_labels=3,
                                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
sharding = {
    "single": {},
    "fsdp": {"fsdp": "full_shard auto_wrap",
             "fsdp_config": {"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}},
    "zero2": {"deepspeed": {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                            "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}},
    "zero3": {"deepspeed": {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                            "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}},
}[options.mode]
args = lorakit.training_args(
    options.out, max_steps=4, per_device_train_batch_size=options.per_device, learning_rate=5e-3,
    save_strategy="steps" if options.save_steps else "no", save_steps=options.save_steps or 500,
    eval_strategy="no", logging_steps=1, seed=0, use_cpu=True, disable_tqdm=True,
    ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None, **sharding)
if options.mode == "fsdp":
    # accelerate keeps FSDP for accelerator devices: on CPU it silently trains with DDP instead. Relabelling
    # its state as multi-GPU (after the args built it) makes Trainer shard with FSDP2 on CPU and gloo, so that
    # this test runs the code path of a GPU run. Test-only: a real run on GPUs needs no such line.
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


class InOrder(lorakit.LoraTrainer):
    """Same data order in every run: one process shuffles with torch's RandomSampler, several with
    accelerate's seeded sampler, and those permutations differ. LoraTrainer itself is unchanged."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


class Report(TrainerCallback):
    """What the sharded model really is, seen inside training (after accelerate/DeepSpeed wrapped it)."""

    def __init__(self):
        self.seen = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.seen is None:
            from torch.distributed.tensor import DTensor

            params = dict(trainer.model.named_parameters())
            self.seen = {"dtensors": sum(isinstance(p, DTensor) for p in params.values()),
                         "zero3_params": sum(hasattr(p, "ds_id") for p in params.values()),
                         "engine": type(trainer.model_wrapped).__name__, "parameters": len(params),
                         "linear4bit": sum(type(m).__name__ == "Linear4bit" for m in trainer.model.modules())}
        if options.stop_after and state.global_step >= options.stop_after:
            control.should_training_stop = True


quant = lorakit.Quant(bits=4) if options.adapter == "qlora" else None
report = Report()
trainer = InOrder(model=model, args=args, train_dataset=token_data(64), lora=lorakit.Lora(r=4, dropout=0.0),
                  quant=quant, callbacks=[report])
trainer.model.train()  # bitsandbytes repacks 4-bit weights in eval mode; training starts in train mode
trainer.train(resume_from_checkpoint=True if options.resume else None)
trainer.save_model(os.path.join(options.out, "final"))
if trainer.args.process_index == 0:
    print("SEEN", json.dumps(report.seen))
    print("WORLD", trainer.args.world_size)
    print("LOSSES", [e["loss"] for e in trainer.state.log_history if "loss" in e])
