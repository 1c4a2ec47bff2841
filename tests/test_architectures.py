"""The architecture hub: every family in adapters_zoo/architectures.toml, built tiny from its real config,
through the same checks (litgpt tests every config of its hub; transformers' model testers run one suite
on every architecture). A family is supported when its row passes; docs/architectures.md is generated
from the same list.

Expectations come from outside lorakit: parameter counts from the tensors' own shapes, peft's documented
all-linear rule, gradients as autograd computes them, and the logits of the unmerged adapter model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_family, expert_tensors, family_batch, family_config, first_output, look_trained

import lorakit
from lorakit.adapter import save_extras
from lorakit.load import auto_class
from lorakit.simulate import simulate

NAMES = list(FAMILIES)
SPEC = dict(r=4)


def lora_parameters(model: torch.nn.Module, plan) -> int:
    """What LoRA adds, from shapes: r·(in + out) per Linear, Conv1D or Embedding weight; r·in·kh·kw + out·r
    per Conv2d; r·E·(rows + cols) per fused tensor of E experts (peft stacks one A and one B per expert)."""
    total = 0
    for target in plan.targets:
        if target.parameter:
            shape = model.get_parameter(target.name).shape
            total += target.r * (shape[0] if len(shape) == 3 else 1) * sum(shape[-2:])
            continue
        module = model.get_submodule(target.name)
        weight = module.weight
        if isinstance(module, torch.nn.Conv2d):
            total += target.r * weight[0].numel() + weight.shape[0] * target.r
        else:
            total += target.r * sum(weight.shape)
    return total


def peft_all_linear(model: torch.nn.Module) -> set[str]:
    """peft's documented all-linear: every Linear or Conv1D module (subclasses included) but the output layer."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not output}


def under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("name", NAMES)
def test_wrap_trains_what_the_plan_and_the_report_say(name):
    base = build_family(name)
    plan = lorakit.make_plan(base, lora=lorakit.Lora(**SPEC))
    assert plan.targets and {t.r for t in plan.targets} == {SPEC["r"]}
    heads = sum(p.numel() for h in plan.trained_in_full for p in base.get_submodule(h).parameters())
    expected = lora_parameters(base, plan) + heads
    predicted = lorakit.report(base, lora=lorakit.Lora(**SPEC)).total.trainable_parameters
    wrapped = lorakit.wrap(build_family(name), lora=lorakit.Lora(**SPEC))
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert trainable == expected == predicted == lorakit.report(wrapped).total.trainable_parameters
    held = lorakit.report(wrapped, by="kind").to_dict()["layers"]
    assert held == lorakit.report(base, lora=lorakit.Lora(**SPEC), by="kind").to_dict()["layers"]  # row by row
    tuner = wrapped.base_model  # peft's own record of what it adapted: layers, and tensors (MoE experts)
    assert set(tuner.targeted_module_names) == {t.name for t in plan.targets if not t.parameter}
    assert set(tuner.targeted_parameter_names) == {t.name for t in plan.targets if t.parameter}


@pytest.mark.parametrize("name", NAMES)
def test_all_linear_is_peft_all_linear_less_what_the_plan_says_it_left_out(name):
    base = build_family(name)
    peft_rule = peft_all_linear(base)
    heads = lorakit.make_plan(base, lora=lorakit.Lora(**SPEC)).trained_in_full
    if all(under(n, heads) for n in peft_rule):  # convolutions only (ResNet): nothing for all-linear
        with pytest.raises(lorakit.TargetError):
            lorakit.make_plan(base, lora=lorakit.Lora(r=4, targets="all-linear"))
        return
    plan = lorakit.make_plan(base, lora=lorakit.Lora(r=4, targets="all-linear"))
    ours = {t.name for t in plan.targets if not t.parameter}
    left_out = {n for n, _ in plan.skipped} | {n.rpartition(".")[0] for n, _ in plan.skipped}  # or its weight
    assert ours <= peft_rule  # never a Linear layer peft's all-linear would not take
    unexplained = sorted(n for n in peft_rule - ours if n not in left_out and not under(n, plan.trained_in_full))
    assert unexplained == []  # every difference from peft is listed in plan.skipped, with its reason
    assert {t.name for t in plan.targets if t.kind == "Experts"} == expert_tensors(base)


@pytest.mark.parametrize("name", NAMES)
def test_a_training_step_reaches_exactly_the_trainable_tensors(name):
    wrapped = lorakit.wrap(build_family(name), lora=lorakit.Lora(**SPEC)).train()
    first_output(wrapped(**family_batch(name))).backward()
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    reached = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert reached <= trainable
    # every trainable tensor reached, unless the row's limit says why not (and then the limit must hold)
    assert (reached == trainable) != ("gradients" in FAMILIES[name].get("limits", {}))
    assert all(torch.isfinite(p.grad).all() for p in wrapped.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", NAMES)
def test_merge_gives_plain_transformers_the_adapter_models_logits(name, tmp_path):
    build_family(name).save_pretrained(tmp_path / "base")
    model = look_trained(lorakit.wrap(lorakit.load(tmp_path / "base"), lora=lorakit.Lora(**SPEC)), 0.1,
                         also=lambda n, _: "modules_to_save" in n).eval()
    model.save_pretrained(tmp_path / "adapter")
    save_extras(model, tmp_path / "adapter")
    report = lorakit.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    merged = auto_class(FAMILIES[name]["task"]).from_pretrained(tmp_path / "merged").eval()
    inputs = family_batch(name, labels=False)
    with torch.no_grad():
        expected, got = (first_logits(m(**inputs)) for m in (model, merged))
    assert (expected - got).abs().max() <= 1e-4
    assert (expected - first_logits(build_family(name)(**inputs))).abs().max() > 1e-3  # the adapter did something
    assert report["verification"]["max_abs_logit_difference"] <= 1e-4


def first_logits(out) -> torch.Tensor:
    return (out.logits if hasattr(out, "logits") else out[0]).float()


@pytest.mark.parametrize("name", NAMES)
def test_4bit_wrap_trains(name):
    import bitsandbytes as bnb

    if "quant" in FAMILIES[name].get("limits", {}):
        with pytest.raises(lorakit.QuantizationError):
            lorakit.wrap(build_family(name), lora=lorakit.Lora(**SPEC), quant="4bit")
        return
    wrapped = lorakit.wrap(build_family(name), lora=lorakit.Lora(**SPEC), quant="4bit").train()
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in wrapped.modules())
    experts = expert_tensors(wrapped.get_base_model())
    assert all(wrapped.get_base_model().get_parameter(n).dtype == torch.float32 for n in experts)  # not quantized
    first_output(wrapped(**family_batch(name))).backward()
    grads = [p.grad for n, p in wrapped.named_parameters() if "lora_" in n]
    if "gradients" in FAMILIES[name].get("limits", {}):
        grads = [g for g in grads if g is not None]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_the_simulator_runs(name):
    row = FAMILIES[name]
    if "simulate" in row.get("limits", {}):  # an op that needs tensor values: a clear refusal, naming it
        with pytest.raises(lorakit.LorakitError, match="cannot run on fake tensors"):
            simulate(family_config(name), lora=lorakit.Lora(**SPEC), task=row["task"], batch_size=1, seq_len=8)
        return
    # DeBERTa's masks overflow bf16 in a real CPU step under autocast (no fake-tensor matter): compared in fp32
    settings = dict(lora=lorakit.Lora(**SPEC), task=row["task"], batch_size=1, seq_len=8,
                    autocast=None if name == "deberta" else "bfloat16")
    fake = simulate(family_config(name), **settings)
    real = simulate(family_config(name), real=True, **settings)  # the same steps on real CPU tensors
    assert abs(fake.peak_allocated / real.peak_allocated - 1) <= 0.02


ROOT = Path(__file__).parent.parent
SUMMARY_START = "| group | families (wrap, train, merge: all)"


def test_the_support_tables_are_generated_from_the_hub():
    from lorakit.render import architecture_summary, architecture_table

    regenerate = "regenerate them: python tests/test_architectures.py"
    assert architecture_table() in (ROOT / "docs" / "architectures.md").read_text(), regenerate
    assert architecture_summary() in (ROOT / "README.md").read_text(), regenerate


if __name__ == "__main__":  # rewrite docs/architectures.md's table and the README's summary from the hub
    from lorakit.render import architecture_summary, architecture_table

    doc = ROOT / "docs" / "architectures.md"
    text = doc.read_text()
    doc.write_text(text[:text.index("| family | model_type")] + architecture_table())
    readme = (ROOT / "README.md").read_text()
    start = readme.index(SUMMARY_START)
    end = readme.index("\n\n", start)
    (ROOT / "README.md").write_text(readme[:start] + architecture_summary().rstrip("\n") + readme[end:])
