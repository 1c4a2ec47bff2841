"""Helper for test_sharding: LoraTrainer runs, in one process or sharded under torchrun (gloo, CPU).

usage: shard_train.py OUT MODE PER_DEVICE [--adapters lora,qlora,unused] [--stop-after N] [--resume]
MODE: single | fsdp | zero2 | zero3; "unused" is LoRA plus a trainable layer the loss never reaches.
Each adapter trains 4 steps into OUT/ADAPTER (checkpoint every 2 steps), then saves OUT/ADAPTER/final;
--stop-after 2 ends after the first checkpoint (an interrupted run), --resume continues from the last one. Rank 0 prints `SEEN {adapter: what the model was inside training}`.
"""

import argparse
import json
import os
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]  # and tests/

import torch  # noqa: E402

import lorakit  # noqa: E402


def build_model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    # dropout off: each process draws its own masks, so with dropout the runs could not match
    return BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def zero(stage):
    return {"deepspeed": {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
                          "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}}


SHARDING = {"single": {}, "zero2": zero(2), "zero3": zero(3),
            "fsdp": {"fsdp": True, "fsdp_config": {"transformer_layer_cls_to_wrap": ["BertLayer"]}}}


def fsdp_on_cpu():
    """accelerate keeps FSDP for accelerator devices: on CPU it silently trains with DDP instead. Relabelling its
    state as multi-GPU (after the args built it) makes Trainer shard with FSDP2 on CPU and gloo, so that the
    tests run the code path of a GPU run. Test-only: a run on GPUs needs no such line."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


def run(out, mode, per_device, adapter, stop_after, resume):
    from test_trainer import token_data
    from transformers import TrainerCallback

    args = lorakit.training_args(
        out, max_steps=4, per_device_train_batch_size=per_device, learning_rate=5e-3, save_strategy="steps",
        save_steps=2, logging_steps=1, seed=0, use_cpu=True, disable_tqdm=True,
        ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None, **SHARDING[mode])
    if mode == "fsdp":
        fsdp_on_cpu()

    class InOrder(lorakit.LoraTrainer):
        """Same data order in every run: one process shuffles with torch's RandomSampler, several with
        accelerate's seeded sampler, and those permutations differ. LoraTrainer itself is unchanged."""

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    seen = {}

    class Inspect(TrainerCallback):
        """What the model really is inside training, after accelerate or DeepSpeed wrapped it."""

        def on_step_end(self, args, state, control, **kwargs):
            if not seen:
                from torch.distributed.tensor import DTensor

                params = dict(trainer.model.named_parameters())
                seen.update(dtensors=sum(isinstance(p, DTensor) for p in params.values()),
                            zero3_params=sum(hasattr(p, "ds_id") for p in params.values()),
                            parameters=len(params), engine=type(trainer.model_wrapped).__name__,
                            linear4bit=sum(type(m).__module__.startswith("bitsandbytes")
                                           for m in trainer.model.modules()))
            if stop_after and state.global_step >= stop_after:
                control.should_training_stop = True

    quant = lorakit.Quant(bits=4) if adapter == "qlora" else None
    model = build_model()
    if adapter == "qlora-loaded":  # quantized as it loads, the way users load it; sharding needs the storage dtype
        base = os.path.join(out, "base")
        model.save_pretrained(base)  # rank 0 writes it (transformers' rule); the others wait for it
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if mode.startswith("zero"):  # accelerate starts DeepSpeed's comm on GPUs only; from_pretrained needs it
            import deepspeed

            deepspeed.init_distributed(dist_backend="gloo")
        storage = "float32" if mode in ("fsdp", "zero3") else None
        model = lorakit.load(base, quant=lorakit.Quant(bits=4, quant_storage=storage))
    trainer = InOrder(model=model, args=args, train_dataset=token_data(64), quant=quant,  # sets storage
                      lora=lorakit.Lora(r=4, dropout=0.0), callbacks=[Inspect()])
    if adapter == "unused":  # a trainable layer outside the forward: the gradient check must say so
        trainer.model.base_model.model.unused = torch.nn.Linear(2, 2)
    trainer.model.train()  # bitsandbytes 0.50 repacks 4-bit weights in eval mode: start training in train mode
    try:
        trainer.train(resume_from_checkpoint=True if resume else None)
    except lorakit.LorakitError as error:
        return {"error": error.message}
    if not stop_after:
        trainer.save_model(os.path.join(out, "final"))
    return seen


def leave_together():
    """End a torchrun worker without its interpreter's teardown. Gloo's C++ worker threads can still hold work
    whose tensors reference Python objects; destroying them while the interpreter finalizes aborts the process
    ("terminate called without an active exception", SIGABRT) about one run in ten here, FSDP2 and ZeRO-3 alike,
    even after destroy_process_group (pytorch/pytorch#179291 describes the race). Everything this script writes
    is on disk by now, so it leaves with os._exit once the ranks are past a last barrier."""
    sys.stdout.flush()
    sys.stderr.flush()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("mode", choices=sorted(SHARDING))
    parser.add_argument("per_device", type=int)
    parser.add_argument("--adapters", default="lora,qlora")
    parser.add_argument("--stop-after", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    options = parser.parse_args()
    if options.mode.startswith("zero"):
        # DeepSpeed compiles a shared-memory all-reduce for CPUs on first use (minutes, with g++ and ninja); gloo's
        # own collectives do the same job here. Test-only: on GPUs DeepSpeed uses NCCL and builds nothing.
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # the package's `torch` is torch
    seen = {name: run(os.path.join(options.out, name), options.mode, options.per_device, name, options.stop_after,
                      options.resume) for name in options.adapters.split(",")}
    if int(os.environ.get("RANK", "0")) == 0:
        print("SEEN", json.dumps(seen))
    leave_together()
