"""Mixture-of-experts specifics, on the hub's tiny MoE families: expert tensors through peft's target_parameters,
ranks per expert, routers only when named, no dropout where peft has none, adapters plain peft reads back, and
a 4-bit base whose experts stay in full precision."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import FAMILIES, build_family, expert_tensors, family_batch, first_output, look_trained

import lorakit
from lorakit.adapter.format import save_extras

MOE = [name for name, row in FAMILIES.items() if row["group"] == "moe decoder" and expert_tensors(build_family(name))]
# peft 0.21 rewrites these families' adapter configs from transformers-v4 names when it loads them (see
# lorakit.model.wrap.quiet_peft): plain PeftModel.from_pretrained moves DeepSeek's dense and shared-expert adapters
# onto the experts. lorakit.load_adapter reads them back exactly.
PEFT_REWRITES = {"deepseek-v2", "deepseek-v3"}


def expert_shapes(model) -> dict[str, torch.Size]:
    return {name: model.get_parameter(name).shape for name in expert_tensors(model)}


@pytest.mark.parametrize("name", MOE)
def test_split_expert_rank_gives_each_expert_r_over_e(name):
    base = build_family(name)
    shapes = expert_shapes(base)
    plan = lorakit.make_plan(base, lora=lorakit.Lora(r=8, expert_rank="split"))
    experts = {t.name: t for t in plan.targets if t.kind == "Experts"}
    assert set(experts) == set(shapes)
    for tensor, target in experts.items():
        assert target.r == max(1, 8 // shapes[tensor][0]) and target.alpha / target.r == plan.lora.alpha / 8
    wrapped = lorakit.wrap(build_family(name), lora=lorakit.Lora(r=8, expert_rank="split"))
    lora_a = {n: p.shape for n, p in wrapped.named_parameters() if ".experts." in n and ".lora_A." in n}
    # peft stacks one A per expert: (rank * experts, in) per tensor
    assert sorted(s[0] for s in lora_a.values()) == sorted(experts[t].r * shapes[t][0] for t in experts)


def test_split_expert_rank_wraps_without_peft_saying_the_ranks_it_applies_were_ignored():
    """peft matches rank_pattern keys against modules only and warns that expert parameters' keys "were ignored";
    the test above shows it applies them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.wrap(build_family("olmoe"), lora=lorakit.Lora(r=8, expert_rank="split"))
    assert not [w for w in caught if "pattern keys did not match" in str(w.message)]


def test_a_dropout_the_user_did_not_choose_becomes_zero_and_the_plan_says_why():
    plan = lorakit.make_plan(build_family("qwen3-moe"), lora=lorakit.Lora(r=4), preset="default")  # default: 0.05
    assert plan.lora.dropout == 0.0
    assert "ParamWrapper" in dict((k, s) for k, _, s in plan.defaults)["lora.dropout"]
    with pytest.raises(lorakit.SpecError, match="Lora.dropout=0.1 cannot apply to"):
        lorakit.make_plan(build_family("qwen3-moe"), lora=lorakit.Lora(r=4, dropout=0.1))
    with pytest.raises(lorakit.SpecError, match="no DoRA"):
        lorakit.make_plan(build_family("qwen3-moe"), lora=lorakit.Lora(r=4, use_dora=True))
    attention_only = lorakit.make_plan(build_family("qwen3-moe"), lora=lorakit.Lora(r=4, dropout=0.1,
                                                                                    targets="attention"))
    assert attention_only.lora.dropout == 0.1  # no expert target: dropout as asked


@pytest.mark.parametrize("name", MOE)
def test_routers_are_left_out_and_said_so_unless_named(name):
    base = build_family(name)
    plan = lorakit.make_plan(base, lora=lorakit.Lora(r=4))
    # independently: transformers 5 names its router classes *Router; a router's own Linear (DBRX) or its weight
    routers = sorted(f"{n}.layer" if hasattr(m, "layer") else f"{n}.weight" for n, m in base.named_modules()
                     if type(m).__name__.lower().endswith("router"))
    assert routers and not {t.name for t in plan.targets} & set(routers)
    assert {n for n, why in plan.skipped if "router" in why.lower()} == set(routers)
    named = lorakit.wrap(build_family(name), lora=lorakit.Lora(r=4, targets=["router"]))
    assert {t.name for t in named.lorakit_state.plan.targets} == set(routers)
    look_trained(named, 0.5)
    first_output(named(**family_batch(name))).backward()  # Llama 4's tuple-returning router included
    assert all(p.grad is not None for n, p in named.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("name", MOE)
def test_the_saved_adapter_reads_back_exactly(name, tmp_path):
    from peft import PeftModel

    model = look_trained(lorakit.wrap(build_family(name), lora=lorakit.Lora(r=4)), 0.2).eval()
    model.save_pretrained(tmp_path)
    save_extras(model, tmp_path)
    inputs = family_batch(name, labels=False)
    with torch.no_grad():
        expected = model(**inputs).logits
        ours = lorakit.load_adapter(build_family(name), tmp_path).eval()(**inputs).logits
        assert torch.allclose(ours, expected, atol=1e-6)
        if name not in PEFT_REWRITES:
            plain = PeftModel.from_pretrained(build_family(name), str(tmp_path)).eval()(**inputs).logits
            assert torch.allclose(plain, expected, atol=1e-6)


def test_peft_alone_would_rewrite_deepseeks_plan_and_lorakit_does_not():
    """The regression behind quiet_peft: the same explicit config, through plain peft and through wrap."""
    from peft import get_peft_model

    from lorakit.model.wrap import lora_config

    plan = lorakit.make_plan(build_family("deepseek-v3"), lora=lorakit.Lora(r=4))
    shared = [t.name for t in plan.targets if "shared_experts" in t.name or ".mlp.gate_proj" in t.name]
    assert shared  # the plan adapts the dense and shared-expert Linear layers
    plain = get_peft_model(build_family("deepseek-v3"), lora_config(plan))
    plain_adapted = {n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in plain.named_parameters()
                     if ".lora_A." in n}
    assert not set(shared) <= plain_adapted  # peft moved them
    wrapped = lorakit.wrap(build_family("deepseek-v3"), lora=lorakit.Lora(r=4))
    adapted = {n.split(".lora_A")[0].removeprefix("base_model.model.") for n, _ in wrapped.named_parameters()
               if ".lora_A." in n}
    assert set(shared) <= adapted


def test_a_4bit_base_keeps_its_experts_in_full_precision_and_the_report_counts_them_so():
    base = build_family("qwen3-moe")
    plan = lorakit.make_plan(base, lora=lorakit.Lora(r=4), quant="4bit")
    kept = [n for n, why in plan.skipped if "bitsandbytes quantizes Linear layers only" in why]
    assert set(kept) == set(expert_shapes(base))
    wrapped = lorakit.wrap(build_family("qwen3-moe"), lora=lorakit.Lora(r=4), quant="4bit")
    report = lorakit.report(wrapped, by="kind")
    experts = next(r for r in report.rows if r.name == "Experts")
    frozen = sum(v.numel() for v in expert_shapes(base).values())
    # fp32: prepare_model_for_kbit_training upcasts what bitsandbytes leaves alone (issue 22 is about that)
    assert experts.weight_bytes == 4 * frozen + 4 * experts.lora_parameters
    planned = lorakit.report(build_family("qwen3-moe"), lora=lorakit.Lora(r=4), quant="4bit", by="kind")
    assert next(r for r in planned.rows if r.name == "Experts").weight_bytes == experts.weight_bytes


def test_a_freeze_spec_beside_expert_adapters_leaves_the_adapted_experts_frozen():
    spec = dict(lora=lorakit.Lora(r=4), freeze=lorakit.Freeze(first_layers=1))
    plan = lorakit.make_plan(build_family("qwen3-moe"), **spec)
    assert not [n for n in plan.trainable if ".experts." in n]  # peft wraps them: they train through adapters
    wrapped = lorakit.wrap(build_family("qwen3-moe"), **spec)  # wrap checks the count against the Plan
    free = {n for n, p in wrapped.named_parameters() if p.requires_grad and "lora_" not in n}
    assert free and not [n for n in free if ".experts." in n]
    assert free == {"base_model.model." + n for n in plan.trainable}


def test_a_weighted_merge_of_expert_adapters_is_refused_clearly(tmp_path):
    base = tmp_path / "base"
    build_family("deepseek-v3").save_pretrained(base)
    folders = []
    for seed in (1, 2):
        model = look_trained(lorakit.wrap(lorakit.load(base), lora=lorakit.Lora(r=4)), 0.1, seed=seed)
        model.save_pretrained(tmp_path / f"a{seed}")
        save_extras(model, tmp_path / f"a{seed}")
        folders.append(tmp_path / f"a{seed}")
    with pytest.raises(lorakit.SpecError, match="cannot combine adapters of MoE expert tensors"):
        lorakit.merge(base, folders, tmp_path / "merged", method="cat")  # peft's add_weighted_adapter cannot
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral", "gpt-oss", "deepseek-v3"])
def test_moe_adapters_merge_by_streaming(name, tmp_path):
    build_family(name).save_pretrained(tmp_path / "base")  # transformers 5 writes each expert apart (the Hub's way)
    model = look_trained(lorakit.wrap(lorakit.load(tmp_path / "base"), lora=lorakit.Lora(r=4)), 0.1)
    model.save_pretrained(tmp_path / "adapter")
    save_extras(model, tmp_path / "adapter")
    report = lorakit.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert report["path"].startswith("streamed") and report["verification"]["max_abs_logit_difference"] <= 1e-4


def test_training_resumes_from_a_deepseek_checkpoint(tmp_path):
    rows = [{"input_ids": [5, 6, 7, 8, 9, 10], "labels": [5, 6, 7, 8, 9, 10]}] * 8

    def trainer(steps):
        args = lorakit.training_args(str(tmp_path), max_steps=steps, per_device_train_batch_size=2, save_steps=2,
                                     save_strategy="steps", use_cpu=True, report_to=[], disable_tqdm=True)
        return lorakit.LoraTrainer(model=build_family("deepseek-v3"), args=args, train_dataset=rows,
                                   lora=lorakit.Lora(r=4))
    trainer(2).train()
    resumed = trainer(4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
