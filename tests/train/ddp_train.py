"""Helper for test_ddp: the same LoraTrainer run, launched plainly or under torchrun (gloo, CPU)."""

import os
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(__file__))]  # and tests/

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import lorakit  # noqa: E402
from shard_train import leave_together  # noqa: E402
from test_trainer import token_data  # noqa: E402

out, per_device = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
# dropout off: each DDP process draws its own masks, so with dropout the runs could not match
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                 intermediate_size=64, vocab_size=100, num_labels=3,
                                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
args = lorakit.training_args(out, max_steps=4, per_device_train_batch_size=per_device, learning_rate=5e-3,
                             save_strategy="no", eval_strategy="no", logging_steps=1, seed=0, use_cpu=True,
                             disable_tqdm=True, ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None)
class InOrder(lorakit.LoraTrainer):
    """Same data order in both runs: one process shuffles with torch's RandomSampler, DDP with
    accelerate's seeded sampler, and those permutations differ. LoraTrainer itself is unchanged."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


trainer = InOrder(model=model, args=args, train_dataset=token_data(64), lora=lorakit.Lora(r=4, dropout=0.0))
trainer.train()
if trainer.args.process_index == 0:
    weights = {n: p.detach().clone().contiguous() for n, p in trainer.model.named_parameters() if p.requires_grad}
    save_file(weights, os.path.join(out, "trained.safetensors"))
    print("WORLD", trainer.args.world_size)
    print("LOSSES", [e["loss"] for e in trainer.state.log_history if "loss" in e])
leave_together()
