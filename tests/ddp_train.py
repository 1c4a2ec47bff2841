"""Helper for test_ddp: the same LoraTrainer run, launched plainly or under torchrun (gloo, CPU)."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import lorakit  # noqa: E402
from conftest import build  # noqa: E402
from test_trainer import token_data  # noqa: E402

out, per_device = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
model = build("bert")
args = lorakit.training_args(out, max_steps=4, per_device_train_batch_size=per_device, learning_rate=5e-3,
                             save_strategy="no", eval_strategy="no", logging_steps=1, seed=0, use_cpu=True,
                             disable_tqdm=True, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None)
trainer = lorakit.LoraTrainer(model=model, args=args, train_dataset=token_data(64), lora=lorakit.Lora(r=4))
trainer.train()
if trainer.args.process_index == 0:
    weights = {n: p.detach().clone().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    save_file(weights, os.path.join(out, "trained.safetensors"))
    print("WORLD", trainer.args.world_size)
