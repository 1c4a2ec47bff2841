"""A lorakit-wrapped SmolLM2 trains with TRL's SFTTrainer, unchanged, on lorakit's chat data."""

from __future__ import annotations

import datasets
import pytest
import torch
from test_chat import TRAIN, chats

import lorakit
from lorakit.adapter.format import save_extras

trl = pytest.importorskip("trl")


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "lora_" in n}


def sft(model, tokenizer, tmp_path):
    data = lorakit.chat_data(datasets.Dataset.from_dict({"messages": chats(TRAIN[:2] + TRAIN[-2:])}), tokenizer,
                             max_length=64)
    # bf16=False: SFTConfig defaults to bf16 autocast, which is very slow on CPUs without bf16 units.
    config = trl.SFTConfig(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                           learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none",
                           use_cpu=True, bf16=False, max_length=64, disable_tqdm=True, seed=0)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    # TRL keeps a ready `labels` column as it is: the loss stays on the answers.
    assert trainer.train_dataset["labels"] == data["labels"]
    return trainer, data


def test_sft_trainer_trains_lora_with_freezing_and_both_peft_and_lorakit_load_it(smollm2, tmp_path):
    from peft import PeftModel

    tok = smollm2.tokenizer
    model = lorakit.wrap(smollm2.model(), lora=lorakit.Lora(r=4, targets="attention"), freeze="first:28 embeddings")
    in_full = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert any(".layers.29.mlp." in n for n in in_full)  # the top blocks train in full beside LoRA
    trainer, data = sft(model, tok, tmp_path)
    before = lora_weights(model)
    trainer.train()
    after = lora_weights(model)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    current = dict(model.named_parameters())
    assert all(not torch.equal(value, current[n].detach()) for n, value in in_full.items() if ".mlp." in n)

    out = tmp_path / "adapter"
    trainer.save_model(str(out))  # peft's adapter files only
    saved = lora_weights(PeftModel.from_pretrained(smollm2.model(), str(out)))
    assert saved.keys() == after.keys() and all(torch.equal(saved[n], after[n]) for n in after)
    save_extras(model, out)  # the base parameters trained in full, and the manifest
    loaded = lorakit.load_adapter(smollm2.model(), out)
    ids = torch.tensor([data[0]["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(ids).logits, model.eval()(ids).logits, atol=1e-4)


def test_sft_trainer_trains_lora_on_a_4bit_base(smollm2, tmp_path):
    from peft import PeftModel

    model = lorakit.wrap(smollm2.model(), lora=lorakit.Lora(r=4, targets="attention"), quant="4bit")
    trainer, _ = sft(model, smollm2.tokenizer, tmp_path)
    before = lora_weights(model)
    trainer.train()
    after = lora_weights(model)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    trainer.save_model(str(tmp_path / "adapter"))
    saved = lora_weights(PeftModel.from_pretrained(smollm2.model(), str(tmp_path / "adapter")))
    assert saved.keys() == after.keys() and all(torch.equal(saved[n], after[n]) for n in after)
