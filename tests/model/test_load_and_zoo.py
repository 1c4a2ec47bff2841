"""load(), the zoo presets and bundled configs, and the public API."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import BUILDERS, build, minilm_path

import lorakit
from lorakit.spec import zoo

FAMILY_OF = {"bert": "bert", "roberta": "roberta", "distilbert": "distilbert", "gpt2": "gpt2", "llama": "llama",
             "mistral": "llama", "qwen2": "llama", "t5": "t5", "vit": "vit", "resnet": "resnet", "mlp": "default"}


def test_every_preset_is_tested_and_names_modules_that_exist():
    hub = {zoo.preset_for_type(row["model_type"]).name for row in zoo.architectures()}
    assert set(zoo.presets()) == set(FAMILY_OF.values()) | hub  # every preset has a family that tests it
    for arch in BUILDERS:
        model = build(arch)
        preset = zoo.preset_for(model)
        assert preset.name == FAMILY_OF[arch]
        names = [n for n, _ in model.named_modules() if n]
        blocks = zoo.find_block_lists(model, preset)
        if preset.name != "default":
            assert blocks, f"{preset.name}: no block list found"
            for suffix in preset.blocks:
                assert any(n == suffix or n.endswith("." + suffix) for n in blocks), (preset.name, suffix)
            for suffix in preset.embeddings:
                assert any(n == suffix or n.endswith("." + suffix) for n in names), (preset.name, suffix)
        for group in preset.groups:
            for pattern in preset.groups[group]:
                hits = [n for n in names if (w := zoo.block_of(n, blocks)) and
                        __import__("fnmatch").fnmatchcase(w[2], pattern)]
                # optional variants (T5's gated wi_0/wi_1) may be absent in one config of the family
                assert hits or pattern.endswith("wi_[01]"), (preset.name, group, pattern)
        lorakit.targets(model)  # the recommended targets resolve
        for key in ("r", "alpha", "dropout", "learning_rate", "targets"):
            assert key in preset.recommended, (preset.name, key)


def test_heads_named_in_presets_exist_in_the_classifier_models():
    for arch in ("bert", "roberta", "distilbert", "vit", "resnet"):
        assert lorakit.wrap(build(arch), freeze="head-only").lorakit_state.plan.trained_in_full


def test_load_directory_task_and_missing_head(tmp_path):
    from transformers import BertModel

    base = build("bert").bert
    base.save_pretrained(tmp_path)
    assert isinstance(lorakit.load(tmp_path), BertModel)  # task from config.architectures
    model = lorakit.load(tmp_path, task="seq-cls", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 3
    # the classifier was not in the checkpoint, so it is a head and trains in full
    assert "classifier" in model.lorakit_source.missing_keys[0]
    wrapped = lorakit.wrap(model, lora=lorakit.Lora(r=2))
    assert "classifier" in wrapped.lorakit_state.plan.trained_in_full
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)


def test_load_refuses_pickle_only_checkpoints(tmp_path):
    build("bert").save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "ignored")
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(lorakit.LorakitError, match="never unpickles"):
        lorakit.load(tmp_path)


def test_bundled_configs_resolve_offline():
    from lorakit.model.load import resolve_config

    for name in ("meta-llama/Llama-3.1-8B", "llama-3.1-70b", "bert-base-uncased", "microsoft/resnet-50"):
        config, source = resolve_config(name)
        assert source.kind == "zoo"
    assert resolve_config("Qwen/Qwen2.5-7B")[0].num_hidden_layers == 28


def test_public_api_is_explicit():
    public = {n for n in dir(lorakit) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(lorakit, n)).__name__ == "module"}
    assert public - modules == set(lorakit.__all__)


def test_import_is_cheap():
    code = ("import sys, lorakit; heavy = {'torch', 'transformers', 'peft', 'bitsandbytes', 'datasets', "
            "'evaluate', 'matplotlib'} & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_real_minilm_loads_wraps_and_trains():
    path = minilm_path()
    model = lorakit.load(path, task="seq-cls", num_labels=3)
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_000_000
    model = lorakit.wrap(model, lora=lorakit.Lora(r=8))
    assert set(model.lorakit_state.plan.trained_in_full) == {"bert.pooler", "classifier"}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["works well, no side effects", "terrible headaches", "it is fine I guess"] * 2,
                      padding=True, return_tensors="pt")
    labels = torch.tensor([2, 0, 1] * 2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)


def test_importing_submodules_never_shadows_public_functions():
    import importlib

    for name in ("deploy.merge", "train.trainer", "adapter.format", "train.data", "train.metrics", "cost.report",
                 "model.load", "model.wrap", "cli", "core", "spec", "plan", "model", "cost", "adapter", "train", "gguf",
                 "deploy"):
        importlib.import_module(f"lorakit.{name}")
    for name in lorakit.__all__:
        assert type(getattr(lorakit, name)).__name__ != "module", name
