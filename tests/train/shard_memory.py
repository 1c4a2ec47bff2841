"""Helper for test_sharding: the live bytes of one rank while LoraTrainer trains a causal LM, for real.

usage: shard_memory.py MODES   (fsdp,fsdp-qlora | ddp,zero2,zero3,zero3-qlora; under torchrun, 2 processes, gloo;
                                 DDP before DeepSpeed: DeepSpeed's arguments set os.environ for the process;
                                 a mode ending in -full trains every parameter instead of LoRA r=8)
Every rank counts what it holds with `counting.LiveBytes` (the counter the simulator uses, here on real
tensors) from before Trainer wraps the model to the end of 2 training steps, and prints
(rank 0, for every rank) `PEAK {"mode": m, "rank": r, "peak": bytes, "setup": bytes, "reserved": bytes}`: the
most it held during the steps, what it held when the first began, and what CUDA's caching allocator would have
reserved for those allocations (`lorakit.cost.allocator`'s replay of them). The model is big enough that its weights, not cuBLAS's
workspaces, decide the figure: 50M parameters in float32.
"""

import contextlib
import json
import os
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]  # and tests/

import torch  # noqa: E402

import lorakit  # noqa: E402
from lorakit.cost import per_gpu  # noqa: E402
from lorakit.cost.allocator import CachingAllocator  # noqa: E402
from lorakit.cost.counting import LiveBytes  # noqa: E402
from lorakit.cost.materialise import state_tensors  # noqa: E402
from lorakit.cost.stepping import replay  # noqa: E402
from shard_train import fsdp_on_cpu, leave_together, zero  # noqa: E402

PER_DEVICE, SEQ = 2, 128


def config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=16384, attention_dropout=0.0, tie_word_embeddings=False)


def main(mode: str) -> None:
    import datasets
    from transformers import LlamaForCausalLM, TrainerCallback

    sharding = {"fsdp": {"fsdp": True}, "ddp": {}, "zero2": zero(2), "zero3": zero(3)}[mode.split("-")[0]]
    args = lorakit.training_args(
        "/tmp/unused", max_steps=2, per_device_train_batch_size=PER_DEVICE, learning_rate=1e-3, save_strategy="no",
        logging_steps=1, seed=0, use_cpu=True, disable_tqdm=True, ddp_backend="gloo", chunked_loss=False,
        **sharding)
    if mode.startswith("fsdp"):  # accelerate would silently train with DDP on CPU
        fsdp_on_cpu()
    torch.manual_seed(0)
    ids = torch.randint(0, config().vocab_size, (8 * PER_DEVICE, SEQ))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    counter = LiveBytes()
    setup = {}

    class Phases(TrainerCallback):
        """The counter's phases, as the simulator marks them (it takes a cuBLAS workspace per phase)."""

        def on_step_begin(self, args, state, control, **kwargs):
            if not setup:  # the wrapped model, before the first step; the peak counts from here, as the
                setup["bytes"] = counter.peak = counter.live  # simulator's (max_memory_allocated reset there)
            counter.set_phase(state.global_step + 1, "forward")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            counter.set_phase(state.global_step + 1, "optimizer")

    class Counted(lorakit.LoraTrainer):
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            counter.set_phase(self.state.global_step + 1, "backward")
            return loss

    model = LlamaForCausalLM(config())
    trainer = Counted(model=model, args=args, train_dataset=data,
                      lora=None if mode.endswith("full") else lorakit.Lora(r=8, dropout=0.0),
                      quant=lorakit.Quant(bits=4) if mode.endswith("qlora") else None, callbacks=[Phases()])
    trainer.model.train()  # bitsandbytes 0.50 repacks 4-bit weights in eval mode (see shard_train.py)
    with counter:
        if mode.split("-")[0] in ("ddp", "zero2"):  # trained where it is, whole: on a GPU it is there from the start
            for tensor in state_tensors(trainer.model):
                counter.track(tensor)
        # FSDP2 shards the model as accelerate moves it to the device, ZeRO-3 as it loads (zero.Init): only the
        # shards are ever counted there; per_gpu.counted tells the counter of the storages FSDP2 resizes in
        # place (no op reports those)
        with per_gpu.counted(counter) if mode.startswith("fsdp") else contextlib.nullcontext():
            trainer.train()
    mine = {"mode": mode, "rank": int(os.environ["RANK"]), "peak": counter.peak, "setup": setup["bytes"],
            "reserved": replay(counter, CachingAllocator())["peak_reserved"],
            "sharded": type(trainer.model_wrapped).__name__}
    every = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, mine)  # rank 0 prints them all: two ranks' prints interleave
    if mine["rank"] == 0:
        for seen in every:
            print("PEAK", json.dumps(seen), flush=True)

if __name__ == "__main__":
    if "zero" in sys.argv[1]:  # gloo's collectives, not DeepSpeed's CPU op compiled on first use
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    for each in sys.argv[1].split(","):  # several modes of one kind in one launch: fsdp,fsdp-qlora
        main(each)
    leave_together()
