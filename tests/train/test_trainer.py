"""LoraTrainer on CPU: training, checkpoints, resume, the gradient check, optimizer groups, kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build

import lorakit

HERE = Path(__file__).parent


def token_data(n: int = 32, seed: int = 0, labels: int = 3):
    import datasets

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, 8), generator=g)
    # a learnable rule: the label is the first token's residue
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % labels).tolist()})


def args(tmp_path, **overrides):
    base = dict(num_train_epochs=2, per_device_train_batch_size=8, learning_rate=2e-3, eval_strategy="no",
                save_strategy="no", logging_steps=1, seed=0, use_cpu=True, disable_tqdm=True)
    return lorakit.training_args(str(tmp_path), **{**base, **overrides})


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trains_and_saves_adapter_only_loadable_by_plain_peft(tmp_path):
    from peft import PeftModel

    trainer = lorakit.LoraTrainer(model=build("bert"), args=args(tmp_path, num_train_epochs=6),
                                  train_dataset=token_data(), lora=lorakit.Lora(r=4))
    trainer.train()
    history = losses(trainer)
    assert history[-1] < history[0]
    trainer.save_model(str(tmp_path / "final"))
    files = sorted(os.listdir(tmp_path / "final"))
    assert "adapter_model.safetensors" in files and "lorakit_manifest.json" in files
    assert "model.safetensors" not in files  # never the frozen base
    manifest = json.loads((tmp_path / "final" / "lorakit_manifest.json").read_text())
    assert manifest["plan"]["lora"]["r"] == 4 and manifest["report"]["trainable_parameters"] > 0
    assert set(manifest["files"]) == {"adapter_config.json", "adapter_model.safetensors"}
    # plain peft loads it onto the base and reproduces the trained model, head included
    reloaded = PeftModel.from_pretrained(build("bert"), str(tmp_path / "final")).eval()
    trained = trainer.model.eval()
    ids = torch.randint(1, 100, (3, 8), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-6)
    # and so does lorakit.load_adapter, after checking the base
    again = lorakit.load_adapter(build("bert"), tmp_path / "final").eval()
    assert torch.allclose(again(input_ids=ids).logits, trained(input_ids=ids).logits, atol=1e-6)


def test_freeze_only_checkpoint_holds_only_trained_tensors(tmp_path):
    trainer = lorakit.LoraTrainer(model=build("bert"), args=args(tmp_path), train_dataset=token_data(),
                                  freeze="head-only")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "final" / "lorakit_trained.safetensors"), "pt") as handle:
        assert set(handle.keys()) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                                      "classifier.bias"}
    restored = lorakit.load_adapter(build("bert"), tmp_path / "final")
    assert torch.equal(restored.classifier.weight, trainer.model.classifier.weight)


def test_resume_continues_the_same_loss_curve(tmp_path):
    spec = lorakit.Lora(r=4, dropout=0.1)
    full = lorakit.LoraTrainer(model=build("bert"), args=args(tmp_path / "a", max_steps=8, save_strategy="steps",
                                                              save_steps=4), train_dataset=token_data(), lora=spec)
    full.train()
    interrupted = lorakit.LoraTrainer(model=build("bert"), args=args(tmp_path / "b", max_steps=8),
                                      train_dataset=token_data(), lora=spec)
    interrupted.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    # the restored history holds steps 1-4; steps 5-8 are the resumed run's own
    assert len(losses(interrupted)) == 8
    assert losses(interrupted)[4:] == pytest.approx(losses(full)[4:], abs=1e-6)


def test_resume_refuses_truncated_files_and_other_bases(tmp_path):
    trainer = lorakit.LoraTrainer(model=build("bert"), args=args(tmp_path, max_steps=2, save_strategy="steps",
                                                                 save_steps=2), train_dataset=token_data(),
                                  lora=lorakit.Lora(r=4))
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    other = build("bert")
    with torch.no_grad():
        other.bert.embeddings.word_embeddings.weight.add_(1.0)
    with pytest.raises(lorakit.LorakitError, match="other base weights"):
        lorakit.load_adapter(other, checkpoint)
    with pytest.raises(lorakit.LorakitError, match="trained on a bert model"):
        lorakit.load_adapter(build("llama"), checkpoint)
    adapter = checkpoint / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-100])
    again = lorakit.LoraTrainer(model=build("bert"), args=args(tmp_path / "b", max_steps=4),
                                train_dataset=token_data(), lora=lorakit.Lora(r=4))
    with pytest.raises(lorakit.LorakitError, match="truncated"):
        again.train(resume_from_checkpoint=str(checkpoint))


def test_gradient_check_catches_checkpointing_without_input_gradients(tmp_path):
    """transformers 5 enables input gradients when Trainer turns checkpointing on; turned on by hand
    (reentrant, inputs without grad) the checkpointed LoRA layers get no gradient, and only the head learns."""
    model = lorakit.wrap(build("bert"), lora=lorakit.Lora(r=4))
    inner = model.base_model.model
    inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    inner.disable_input_require_grads()
    trainer = lorakit.LoraTrainer(model=model, args=args(tmp_path, max_steps=1), train_dataset=token_data())
    with pytest.raises(lorakit.LorakitError, match="received no gradient") as info:
        trainer.train()
    assert "use_reentrant" in str(info.value)


def test_checkpointing_on_4bit_trains_lora_with_lorakit_defaults(tmp_path):
    import datasets

    ids = torch.randint(1, 100, (8, 8), generator=torch.Generator().manual_seed(0)).tolist()
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    trainer = lorakit.LoraTrainer(model=build("llama"), args=args(tmp_path, max_steps=2, gradient_checkpointing=True),
                                  train_dataset=data, lora=lorakit.Lora(r=4, targets="all-linear"), quant="4bit")
    assert trainer.args.gradient_checkpointing_kwargs == {"use_reentrant": False}
    trainer.train()
    assert all(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_checkpointing_as_the_docs_spell_it_warns_about_nothing_and_is_non_reentrant(tmp_path):
    """transformers 5.2x renamed gradient_checkpointing(_kwargs) and warns on the old names: lorakit's docs and fit
    say gradient_checkpointing=True, and training_args added gradient_checkpointing_kwargs of its own."""
    import warnings

    from transformers import TrainingArguments

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        made = lorakit.training_args(str(tmp_path), gradient_checkpointing=True, use_cpu=True)
    # a user's own arguments (their spelling, their warning) get the non-reentrant kind from LoraTrainer
    theirs = TrainingArguments(str(tmp_path), gradient_checkpointing=True, use_cpu=True, report_to="none")
    # what the Trainer reads: the new name where this transformers has it
    for given in (made, lorakit.LoraTrainer(model=build("bert"), args=theirs, train_dataset=token_data()).args):
        assert given.gradient_checkpointing
        assert getattr(given, "activation_checkpointing_kwargs", given.gradient_checkpointing_kwargs) == {
            "use_reentrant": False}


class Detached(torch.nn.Module):
    """A model whose adapted layer does not feed the loss: lora_B can never learn."""

    def __init__(self):
        super().__init__()
        self.used = torch.nn.Linear(4, 1)
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, x, labels=None):
        dead = self.unused(x) * 0.0
        out = self.used(x) + dead.sum(-1, keepdim=True)
        return {"loss": ((out.squeeze(-1) - labels) ** 2).mean()}


def test_gradient_check_catches_lora_b_that_cannot_learn(tmp_path):
    import datasets

    data = datasets.Dataset.from_dict({"x": torch.randn(8, 4).tolist(), "labels": torch.randn(8).tolist()})
    trainer = lorakit.LoraTrainer(model=Detached(), args=args(tmp_path, max_steps=1, remove_unused_columns=False),
                                  train_dataset=data, lora=lorakit.Lora(r=2, targets=["unused"]))
    with pytest.raises(lorakit.LorakitError, match="all-zero lora_B"):
        trainer.train()


def test_refuses_a_model_with_nothing_trainable(tmp_path):
    model = build("bert").requires_grad_(False)
    with pytest.raises(lorakit.LorakitError, match="nothing in this model is trainable"):
        lorakit.LoraTrainer(model=model, args=args(tmp_path), train_dataset=token_data())


def test_optimizer_groups_loraplus_head_rate_and_no_decay(tmp_path):
    trainer = lorakit.LoraTrainer(model=build("bert"), args=args(tmp_path, weight_decay=0.1, learning_rate=1e-3),
                                  train_dataset=token_data(), lora=lorakit.Lora(r=4), loraplus_ratio=16,
                                  head_learning_rate=5e-3)
    optimizer = trainer.create_optimizer()
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    for name, param in trainer.model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in by_param
            continue
        lr, decay = by_param[id(param)]
        expected_lr = 16e-3 if "lora_B" in name else 1e-3 if "lora_A" in name else 5e-3
        assert lr == pytest.approx(expected_lr), name
        assert decay == (0.0 if name.endswith("bias") or "LayerNorm" in name else 0.1), name


def test_killed_mid_save_leaves_last_complete_checkpoint(tmp_path):
    script = HERE / "kill_mid_save.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    lorakit.adapter.format.verify(tmp_path / "checkpoint-2")  # complete and consistent
    assert not (tmp_path / "checkpoint-4").exists()


def test_causal_lm_lora_on_4bit_base_learns_and_generates(tmp_path):
    sys.path.insert(0, str(HERE.parents[1] / "examples"))
    from causal_lm_4bit import train_and_generate

    text = train_and_generate(str(tmp_path), steps=120)
    assert text.startswith("the drug worked")
    assert text == "the drug worked well with no side effects"
