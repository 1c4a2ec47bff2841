"""wrap() on every supported architecture, checked against expectations that do
not come from lorakit: parameter counts from layer shapes, and peft applied
directly with a hand-written LoraConfig."""

from __future__ import annotations

import re

import pytest
import torch
from _models import CASES
from conftest import build, loss_of, sample_inputs

import lorakit


def lora_parameters_from_shapes(model: torch.nn.Module, pattern: str, r: int) -> tuple[int, set[str]]:
    """What LoRA adds, by hand: r*(in+out) for Linear/Conv1D, r*in*k*k + out*r for Conv2d."""
    total, names = 0, set()
    for name, module in model.named_modules():
        if not re.fullmatch(pattern, name):
            continue
        names.add(name)
        weight = module.weight
        if isinstance(module, torch.nn.Conv2d):
            out_ch, in_ch, kh, kw = weight.shape
            total += r * in_ch * kh * kw + out_ch * r
        else:
            total += r * (weight.shape[0] + weight.shape[1])
    return total, names


def head_parameters(model: torch.nn.Module, heads: list[str]) -> int:
    modules = dict(model.named_modules())
    return sum(p.numel() for h in heads for p in modules[h].parameters())


@pytest.mark.parametrize("arch", list(CASES))
def test_trainable_counts_match_shapes_and_plain_peft(arch):
    from peft import LoraConfig, get_peft_model

    spec, pattern, heads, peft_kwargs = CASES[arch]
    base = build(arch)
    expected_lora, expected_names = lora_parameters_from_shapes(base, pattern, spec["r"])
    assert expected_names, "the case's regex must match modules"
    expected = expected_lora + head_parameters(base, heads)

    wrapped = lorakit.wrap(build(arch), lora=lorakit.Lora(**spec))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert set(wrapped.lorakit_state.plan.target_names) == expected_names
    assert sorted(wrapped.lorakit_state.plan.trained_in_full) == sorted(heads)
    assert trainable == expected

    by_hand = get_peft_model(build(arch), LoraConfig(r=spec["r"], lora_alpha=8, **peft_kwargs))
    assert by_hand.get_nb_trainable_parameters()[0] == trainable


@pytest.mark.parametrize("quant", [None, "8bit", "4bit"])
@pytest.mark.parametrize("arch", list(CASES))
def test_forward_backward_only_intended_parameters_get_gradients(arch, quant):
    if quant and arch == "resnet":
        pytest.skip("ResNet has no Linear layer outside its head to quantize")
    spec = CASES[arch][0]
    model = lorakit.wrap(build(arch), lora=lorakit.Lora(**spec), quant=quant)
    model.train()
    loss = loss_of(arch, model, sample_inputs(arch))
    assert torch.isfinite(loss)
    loss.backward()
    for name, param in model.named_parameters():
        meant = "lora_" in name or ".modules_to_save." in name
        assert param.requires_grad == meant, name
        if meant:
            assert param.grad is not None, f"{name} got no gradient"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
    # B starts at zero, so only B moves on step one; a non-zero B gradient proves the adapter is wired in.
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_lora_layers_select_blocks_like_peft_layers_to_transform():
    from peft import LoraConfig, get_peft_model

    ours = lorakit.wrap(build("llama"), lora=lorakit.Lora(r=4, targets="attention", layers="last:1"))
    theirs = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                       layers_to_transform=[2], layers_pattern="layers"))
    assert all(".layers.2." in n for n in ours.lorakit_state.plan.target_names)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_rank_pattern_rslora_and_dora_reach_peft():
    model = lorakit.wrap(build("llama"), lora=lorakit.Lora(r=4, targets=["q_proj", "v_proj"], use_rslora=True,
                                                           use_dora=True, rank_pattern={"v_proj": 2}))
    config = model.peft_config["default"]
    # the plan's per-module ranks reach peft by exact module name
    assert config.use_rslora and config.use_dora and set(config.rank_pattern.values()) == {2}
    assert len(config.rank_pattern) == len(model.base_model.model.model.layers) and all(k.endswith("v_proj") for k in config.rank_pattern)
    v = model.base_model.model.model.layers[0].self_attn.v_proj
    assert v.lora_A["default"].weight.shape[0] == 2
    assert "lora_magnitude_vector" in dict(model.named_modules())[
        "base_model.model.model.layers.0.self_attn.q_proj"]._modules


def test_wrap_quant_gives_the_same_layers_and_bytes_as_load_quant(tmp_path):
    import bitsandbytes as bnb

    build("llama").save_pretrained(tmp_path)
    for quant, layer in (("4bit", bnb.nn.Linear4bit), ("8bit", bnb.nn.Linear8bitLt)):
        loaded = lorakit.load(tmp_path, quant=quant)
        in_memory = lorakit.wrap(lorakit.load(tmp_path), quant=quant)
        kinds_loaded = {n: type(m) for n, m in loaded.named_modules()}
        kinds_memory = {n: type(m) for n, m in in_memory.named_modules()}
        assert kinds_loaded == kinds_memory
        assert sum(isinstance(m, layer) for m in loaded.modules()) == 3 * 7
        state_loaded, state_memory = loaded.state_dict(), in_memory.state_dict()
        for key, value in state_loaded.items():
            assert torch.equal(value, state_memory[key]), key
        loaded.eval(), in_memory.eval()
        ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))
        assert torch.equal(loaded(ids).logits, in_memory(ids).logits)


def test_lora_and_freeze_compose_top_blocks_with_head():
    model = lorakit.wrap(build("bert"), lora=lorakit.Lora(r=4, layers="last:1"), freeze="first:2 embeddings")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("layer.2" in n for n in trainable if "lora_" in n)
    assert any("lora_" in n for n in trainable)
    # block 2 is not frozen, so it trains in full besides its adapters; blocks 0-1 and embeddings stay frozen
    assert "base_model.model.bert.encoder.layer.2.intermediate.dense.weight" in trainable
    assert not any(re.search(r"layer\.[01]\.|embeddings", n) for n in trainable)
    assert any("classifier.modules_to_save" in n for n in trainable)


FREEZE_CASES = [
    # spec, regex of parameters that must stay trainable (everything else frozen)
    ("head-only", r"bert\.pooler\..*|classifier\..*"),
    ("first:2", r"bert\.embeddings\..*|bert\.encoder\.layer\.2\..*|bert\.pooler\..*|classifier\..*"),
    ("last:1 embeddings", r"bert\.encoder\.layer\.[01]\..*|bert\.pooler\..*|classifier\..*"),
    ("layers:0,2", r"bert\.embeddings\..*|bert\.encoder\.layer\.1\..*|bert\.pooler\..*|classifier\..*"),
    ("head-only train-norms", r".*LayerNorm\..*|bert\.pooler\..*|classifier\..*"),
    ("biases", r".*weight|classifier\.bias|bert\.pooler\.dense\.bias"),
    ("re:attention keep:attention\.output", r"(?!.*attention).*|.*attention\.output\..*"),
]


@pytest.mark.parametrize("spec,trainable_regex", FREEZE_CASES)
def test_freeze_specs(spec, trainable_regex):
    model = lorakit.wrap(build("bert"), freeze=spec)
    for name, param in model.named_parameters():
        assert param.requires_grad == bool(re.fullmatch(trainable_regex, name)), name


def test_freeze_dataclass_equals_short_form():
    assert lorakit.Freeze.parse("head-only train-norms") == lorakit.Freeze(backbone=True, norms=False)
    assert lorakit.Freeze.parse("first:2;re:bias") == lorakit.Freeze(first_layers=2, patterns=["bias"])


def test_head_only_on_4bit_backbone_trains_the_head():
    model = lorakit.wrap(build("bert"), quant="4bit", freeze="head-only")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                         "classifier.bias"}


def test_targets_dry_run_lists_candidates_and_selection():
    result = lorakit.targets(build("bert"))
    assert result.candidates["Linear"]["attention.self.query"] == [
        f"bert.encoder.layer.{i}.attention.self.query" for i in range(3)]
    assert len(result.selected) == 6
    assert "output.dense" in str(result) and "attention.output.dense" in str(result)
    plain = lorakit.targets(build("mlp"), lorakit.Lora(targets="all-linear"))
    assert plain.preset == "default" and plain.selected == ["net.0", "net.2", "net.4"]


def test_unknown_architecture_works_through_all_linear_and_names():
    from transformers import OPTConfig, OPTForCausalLM  # no preset for OPT

    model = OPTForCausalLM(OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                     vocab_size=100, word_embed_proj_dim=32))
    assert lorakit.targets(model).preset == "default"
    wrapped = lorakit.wrap(model, lora=lorakit.Lora(r=2, targets="all-linear"))
    assert len(wrapped.lorakit_state.plan.target_names) == 2 * 6  # q, k, v, out_proj, fc1, fc2 per block; not lm_head
    by_name = lorakit.wrap(OPTForCausalLM(model.config), lora=lorakit.Lora(r=2, targets=["q_proj", "v_proj"]))
    assert len(by_name.lorakit_state.plan.target_names) == 4
