"""Lora(init=...): LoftQ on a 4-bit base, PiSSA/OLoRA on a full-precision one, and the learning rate a preset
gives LoraTrainer. Expectations come from the maths (Eckart-Young) and from the untouched base, not from lorakit."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path

import pytest
import torch
from _models import make_adapter, wide_llama
from conftest import build, sample_inputs

import lorakit

PRESETS = Path(lorakit.__file__).resolve().parent.parent / "adapters_zoo" / "presets"


def test_loftq_starts_the_adapters_at_the_best_rank_r_fit_of_the_rounding_error():
    import bitsandbytes as bnb

    base, r = wide_llama().eval(), 4
    originals = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    model = lorakit.wrap(copy.deepcopy(base), lora=lorakit.Lora(r=r, alpha=8, targets="all-linear", init="loftq"),
                         quant="4bit")
    checked = 0
    for name, module in model.base_model.model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        error = originals[name] - bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        update = module.scaling["default"] * (module.lora_B["default"].weight @ module.lora_A["default"].weight).detach()
        left = torch.linalg.norm(error - update).item()
        optimum = torch.linalg.svdvals(error)[r:].pow(2).sum().sqrt()  # Eckart-Young: the best rank-r residual
        assert left == pytest.approx(optimum.item(), rel=1e-3)
        assert left < 0.95 * torch.linalg.norm(error).item()
        checked += 1
    assert checked == 2 * 7  # q, k, v, o, gate, up, down in each of 2 blocks

    ids = sample_inputs("llama")["input_ids"]
    plain = lorakit.wrap(copy.deepcopy(base), lora=lorakit.Lora(r=r, alpha=8, targets="all-linear"), quant="4bit")
    with torch.no_grad():
        reference = base(ids).logits
        gap = {k: (m.eval()(ids).logits - reference).abs().mean() for k, m in (("loftq", model), ("plain", plain))}
    assert gap["loftq"] < gap["plain"]  # the 4-bit model with LoftQ adapters starts nearer the original


def test_loftq_leaves_targets_kept_in_full_precision_at_the_default_start():
    quant = lorakit.Quant(bits=4, skip_modules=["q_proj"])
    model = lorakit.wrap(wide_llama(), lora=lorakit.Lora(r=4, targets="all-linear", init="loftq"), quant=quant)
    layers = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "lora_B")}
    assert all(not m.lora_B["default"].weight.any() for n, m in layers.items() if n.endswith("q_proj"))
    assert all(m.lora_B["default"].weight.any() for n, m in layers.items() if n.endswith("k_proj"))


@pytest.mark.parametrize("init, arch", [("pissa", "llama"), ("olora", "llama"), ("pissa", "bert")])
def test_pissa_and_olora_save_a_plain_lora_of_the_untouched_base(init, arch, tmp_path):
    """BERT: a seq-cls head and the pooler train in full beside the adapters, and must survive the conversion."""
    base_dir = tmp_path / "base"
    build(arch).save_pretrained(base_dir)
    inputs = sample_inputs(arch)
    model = lorakit.wrap(lorakit.load(base_dir), lora=lorakit.Lora(r=4, targets="all-linear", dropout=0.0, init=init))
    with torch.no_grad():
        start = model(**inputs).logits
        assert torch.allclose(start, lorakit.load(base_dir)(**inputs).logits, atol=1e-4)  # starts as the base
        for name, param in model.named_parameters():  # stand-in for training: move every trainable tensor
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
        trained = model(**inputs).logits
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not torch.allclose(trained, start, atol=1e-3)
    trainer = lorakit.LoraTrainer(model=model, args=lorakit.training_args(str(tmp_path / "run")))
    trainer.save_model(str(tmp_path / "adapter"))

    assert {n for n, p in model.named_parameters() if p.requires_grad} == trains  # training could go on
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8  # converted: rank 2r, applies to the original
    reloaded = lorakit.load_adapter(lorakit.load(base_dir), tmp_path / "adapter").eval()
    merged = lorakit.merge(base_dir, tmp_path / "adapter", tmp_path / "merged")
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, trained, atol=1e-4)
        assert torch.allclose(lorakit.load(tmp_path / "merged")(**inputs).logits, trained, atol=1e-4)
    assert merged["verification"]["max_abs_logit_difference"] <= 1e-4

    model.save_pretrained(tmp_path / "raw")  # peft's own form: goes with the rewritten base only
    with pytest.raises(lorakit.LorakitError, match="unconverted") as caught:
        lorakit.merge(base_dir, tmp_path / "raw", tmp_path / "merged-raw")
    assert "path_initial_model_for_weight_conversion" in caught.value.hint
    assert not (tmp_path / "merged-raw").exists()


def test_a_loftq_adapter_merges_into_the_dequantized_base_only(tmp_path):
    adapter = make_adapter("wide-llama", tmp_path, dict(r=4, targets="all-linear", init="loftq"), quant="4bit")
    with pytest.raises(lorakit.LorakitError, match="twice") as caught:
        lorakit.merge(tmp_path / "base", adapter, tmp_path / "orig")
    assert "dequantized" in caught.value.hint and not (tmp_path / "orig").exists()
    merged = lorakit.merge(tmp_path / "base", adapter, tmp_path / "deq", into="dequantized")
    assert merged["verification"]["max_abs_logit_difference"] <= 1e-2


@pytest.mark.parametrize("lora, quant, words", [
    (dict(init="loftq"), None, "not quantized"),
    (dict(init="loftq"), "8bit", "8-bit"),
    (dict(init="pissa"), "4bit", "rewrites the base"),
    (dict(init="olora"), "8bit", "rewrites the base"),
    (dict(init="pisa"), None, "did you mean 'pissa'"),
    (dict(init="pissa_niter_4"), None, "must be one of"),
    (dict(init="loftq", use_dora=True), "4bit", "use_dora"),
    (dict(init="pissa", targets=["embed_tokens"]), None, "Linear layers only"),
    (dict(init="olora", use_rslora=True, rank_pattern={"q_proj": 2}), None, "rank or alpha pattern"),
])
def test_inits_that_cannot_work_on_this_base_are_refused_before_anything_changes(lora, quant, words):
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.SpecError) as caught:
        lorakit.wrap(model, lora=lora, quant=quant)
    assert words in f"{caught.value} {caught.value.hint}"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_init_needs_the_weights_before_quantization(tmp_path):
    build("llama").save_pretrained(tmp_path)
    with pytest.raises(lorakit.SpecError, match="loaded quantized") as caught:
        lorakit.wrap(lorakit.load(tmp_path, quant="4bit"), lora=lorakit.Lora(init="loftq"))
    assert "quant='4bit'" in caught.value.hint


def test_the_preset_learning_rate_is_used_when_training_args_names_none(tmp_path):
    preset = tomllib.loads((PRESETS / "llama.toml").read_text())["recommended"]["learning_rate"]
    unset = lorakit.LoraTrainer(model=build("llama"), args=lorakit.training_args(str(tmp_path / "a")),
                                lora=lorakit.Lora())
    assert unset.args.learning_rate == preset != 5e-5  # 5e-5: TrainingArguments' own default
    chosen = lorakit.LoraTrainer(model=build("llama"), lora=lorakit.Lora(),
                                 args=lorakit.training_args(str(tmp_path / "b"), learning_rate=1e-3))
    assert chosen.args.learning_rate == 1e-3
    later = lorakit.training_args(str(tmp_path / "d"))
    later.learning_rate = 3e-4  # set after the fact: the user's still
    assert lorakit.LoraTrainer(model=build("llama"), lora=lorakit.Lora(), args=later).args.learning_rate == 3e-4
    full = lorakit.LoraTrainer(model=lorakit.wrap(build("llama"), freeze="first:2"),
                               args=lorakit.training_args(str(tmp_path / "c")))
    assert full.args.learning_rate == 5e-5  # a preset's rate is a LoRA rate: not for training in full
