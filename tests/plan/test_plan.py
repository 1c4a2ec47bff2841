"""The Plan: decided once, without side effects, the same on the meta device; defaults come from the presets."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import build

import lorakit
from lorakit.model.load import build_from_config

PRESETS = Path(__file__).parents[2] / "adapters_zoo" / "presets"


def recommended(family: str) -> dict:
    return tomllib.loads((PRESETS / f"{family}.toml").read_text())["recommended"]


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5", "vit"])
def test_make_plan_changes_nothing_and_equals_the_plan_on_meta(arch):
    model = build(arch)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    spec = dict(lora=lorakit.Lora(r=4), freeze=lorakit.Freeze(embeddings=True))
    plan = lorakit.make_plan(model, **spec)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}
    assert not hasattr(model, "lorakit_state")
    on_meta = lorakit.make_plan(build_from_config(model.config, plan.task, meta=True), **spec)
    assert on_meta.to_dict() == plan.to_dict()
    json.dumps(plan.to_dict())  # what the manifest saves


def test_wrap_carries_out_exactly_its_plan():
    model = build("llama")
    plan = lorakit.make_plan(model, lora=lorakit.Lora(r=4, targets="attention"), freeze="first:1")
    wrapped = lorakit.wrap(build("llama"), lora=lorakit.Lora(r=4, targets="attention"), freeze="first:1")
    assert wrapped.lorakit_state.plan == plan
    adapted = {n.removeprefix("base_model.model.").split(".lora_A")[0] for n, _ in wrapped.named_parameters()
               if ".lora_A." in n}
    assert adapted == set(plan.target_names)
    trained = {n.removeprefix("base_model.model.") for n, p in wrapped.named_parameters()
               if p.requires_grad and "lora_" not in n and "modules_to_save" not in n}
    assert trained == set(plan.trainable) - {n for n in plan.trainable for h in plan.trained_in_full
                                              if n.startswith(h + ".")}
    predicted = lorakit.report(build("llama"), lora=lorakit.Lora(r=4, targets="attention"), freeze="first:1")
    assert predicted.total.trainable_parameters == lorakit.report(wrapped).total.trainable_parameters


@pytest.mark.parametrize("arch,family", [("llama", "llama"), ("bert", "bert"), ("gpt2", "gpt2")])
def test_unset_lora_knobs_come_from_the_family_preset(arch, family):
    expected = recommended(family)
    plan = lorakit.make_plan(build(arch), lora=lorakit.Lora())
    assert (plan.lora.r, plan.lora.alpha, plan.lora.dropout) == (expected["r"], expected["alpha"], expected["dropout"])
    assert plan.default("learning_rate") == expected["learning_rate"]
    sources = {knob: source for knob, _, source in plan.defaults}
    assert sources["lora.r"] == sources["lora.dropout"] == f"preset {family}"
    peft_config = lorakit.wrap(build(arch), lora=lorakit.Lora()).peft_config["default"]
    assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (
        expected["r"], expected["alpha"], expected["dropout"])


def test_a_rank_without_alpha_keeps_the_presets_alpha_over_r():
    expected = recommended("llama")
    plan = lorakit.make_plan(build("llama"), lora=lorakit.Lora(r=4))
    assert plan.lora.alpha == 4 * expected["alpha"] / expected["r"]
    assert dict((k, s) for k, _, s in plan.defaults)["lora.alpha"].startswith("preset llama (alpha/r = ")
    mine = lorakit.make_plan(build("llama"), lora=lorakit.Lora(r=4, alpha=4, dropout=0.0))
    assert (mine.lora.alpha, mine.lora.dropout) == (4, 0.0)
    assert {k: s for k, _, s in mine.defaults}["lora.alpha"] == "Lora.alpha"


def test_report_says_which_defaults_were_used():
    spec = lorakit.report("meta-llama/Llama-3.1-8B", lora=lorakit.Lora()).to_dict()["spec"]
    assert ["lora.r", 16, "preset llama"] in spec["defaults"]


def test_plan_says_what_it_skipped_and_why():
    plan = lorakit.make_plan(build("gpt2"), lora=lorakit.Lora(r=2, targets="all-linear"), quant=None)
    reasons = dict(plan.skipped)
    assert any("output embedding" in why for why in reasons.values())


def test_a_module_that_cannot_take_lora_is_refused_when_named_and_left_out_of_selections():
    from conftest import build_family

    reason = "F.multi_head_attention_forward"  # WavLM's attention hands peft's layers' weights to torch directly
    for targets in (["q_proj"], "attention", ["attention.*"]):
        with pytest.raises(lorakit.TargetError, match=reason):
            lorakit.make_plan(build_family("wavlm"), lora=lorakit.Lora(r=4, targets=targets))
    plan = lorakit.make_plan(build_family("wavlm"), lora=lorakit.Lora(r=4, targets="all-linear"))
    attention = {n for n, _ in build_family("wavlm").named_modules() if n.endswith(("attention.q_proj",
                                                                                  "attention.out_proj"))}
    assert attention and not attention & set(plan.target_names)
    assert all(reason in dict(plan.skipped)[n] for n in attention)


def test_lora_on_an_embedding_tied_to_the_output_layer_is_refused_saying_so():
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                        tie_word_embeddings=True))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    with pytest.raises(lorakit.TargetError, match="tied to the output layer"):
        lorakit.make_plan(tied, lora=lorakit.Lora(r=4, targets=["embed_tokens", "q_proj"]))
    assert lorakit.make_plan(tied, lora=lorakit.Lora(r=4, targets=["q_proj"])).target_names  # the rest is fine
    with pytest.raises(lorakit.TargetError, match="lm_head: its weight is tied to the input embedding"):
        lorakit.make_plan(tied, lora=lorakit.Lora(r=4, targets=["lm_head", "q_proj"]))


def test_an_output_head_named_in_targets_gets_lora_and_all_linear_leaves_it_out():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                         tie_word_embeddings=False))
    named = lorakit.make_plan(model, lora=lorakit.Lora(r=4, targets=["q_proj", "lm_head"])).target_names
    assert sorted(named) == ["lm_head", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert "lm_head" not in lorakit.make_plan(model, lora=lorakit.Lora(r=4, targets="all-linear")).target_names
    wrapped = lorakit.wrap(model, lora=lorakit.Lora(r=4, targets=["lm_head"]))
    assert hasattr(wrapped.base_model.model.lm_head, "lora_A")  # the model gets what the Plan says
