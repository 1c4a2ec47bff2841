"""Every user mistake: a LorakitError naming the problem and the fix, and the model untouched."""

from __future__ import annotations


import pytest
import torch
from conftest import build

import lorakit


def state(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            [type(m) for m in model.modules()])


def unchanged(before, model):
    after = state(model)
    return before[1] == after[1] and before[2] == after[2] and all(
        torch.equal(before[0][n], after[0][n]) for n in before[0])


@pytest.mark.parametrize("kwargs,words", [
    (dict(lora=lorakit.Lora(targets=["qeury"])), ["qeury", "query"]),
    (dict(lora=lorakit.Lora(targets="attention", layers="7")), ["out of range", "0-2"]),
    (dict(lora=lorakit.Lora(layers="last:9")), ["9 blocks", "3"]),
    (dict(freeze="re:doesnotexist"), ["matches no parameter"]),
    (dict(lora=lorakit.Lora(targets=["classifier"])), ["trained in full"]),
    (dict(lora=lorakit.Lora(train_fully=["poolr"])), ["poolr", "pooler"]),
    (dict(lora=lorakit.Lora(), preset="lama"), ["unknown preset", "llama"]),
])
def test_bad_wrap_input_raises_and_leaves_model_as_it_was(kwargs, words):
    model = build("bert")
    before = state(model)
    with pytest.raises(lorakit.LorakitError) as info:
        lorakit.wrap(model, **kwargs)
    for word in words:
        assert word in str(info.value)
    assert unchanged(before, model)


def test_freeze_that_leaves_nothing_trainable():
    with pytest.raises(lorakit.SpecError, match="no parameter trainable"):
        lorakit.wrap(build("mlp"), freeze="re:.")


def test_quantized_weights_cannot_train_in_full_and_model_is_untouched():
    model = build("mlp")
    before = state(model)
    with pytest.raises(lorakit.SpecError, match="quantized weights cannot be trained"):
        lorakit.wrap(model, quant="4bit", freeze="re:bias")
    assert unchanged(before, model)


def test_group_without_preset_says_what_to_use():
    with pytest.raises(lorakit.TargetError, match="all-linear"):
        lorakit.wrap(build("mlp"), lora=lorakit.Lora(targets="attention"))


def test_blocks_on_a_model_without_blocks():
    with pytest.raises(lorakit.SpecError, match="no repeated blocks"):
        lorakit.wrap(build("mlp"), freeze="first:1")


@pytest.mark.parametrize("make,words", [
    (lambda: lorakit.Lora(r=0), "positive integer"),
    (lambda: lorakit.Lora(alpha=0), "alpha must be a finite number > 0"),
    (lambda: lorakit.Lora(dropout=1.0), "[0, 1)"),
    (lambda: lorakit.Lora(layers="3-1"), "backwards"),
    (lambda: lorakit.Freeze(), "freezes nothing"),
    (lambda: lorakit.Freeze.parse("frist:2"), "cannot read freeze token"),
    (lambda: lorakit.Freeze(patterns=["("]), "not a valid regular expression"),
    (lambda: lorakit.Quant(bits=3), "4 or 8"),
    (lambda: lorakit.Quant.coerce("2bit"), "unknown quantization"),
    (lambda: lorakit.Lora.coerce({"rank": 8}), "unknown Lora field"),
])
def test_bad_specs(make, words):
    with pytest.raises(lorakit.SpecError) as info:
        make()
    assert words in str(info.value)


def test_wrapping_twice():
    model = lorakit.wrap(build("bert"), lora=lorakit.Lora())
    with pytest.raises(lorakit.AlreadyWrappedError, match="once"):
        lorakit.wrap(model, lora=lorakit.Lora())


def test_quantizing_a_quantized_model():
    model = lorakit.wrap(build("llama"), quant="8bit")
    with pytest.raises(lorakit.LorakitError):
        lorakit.wrap(model, quant="4bit")


def test_missing_bitsandbytes_is_named(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    model = build("llama")
    with pytest.raises(lorakit.QuantizationError, match="pip install"):
        lorakit.wrap(model, quant="4bit")


def test_unknown_model_id_lists_near_bundled_names(tmp_path):
    with pytest.raises(lorakit.ModelNotFoundError) as info:
        lorakit.load("Llama-3.1-8C")
    assert "Llama-3.1-8B" in str(info.value)
    with pytest.raises(lorakit.ModelNotFoundError, match="no config.json"):
        lorakit.load(tmp_path)
    with pytest.raises(lorakit.SpecError, match="unknown task"):
        lorakit.load(tmp_path, task="seq-clf")


def test_bundled_config_without_weights_says_so():
    with pytest.raises(lorakit.ModelNotFoundError, match="config only"):
        lorakit.load("gpt2")
