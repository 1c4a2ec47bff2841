"""The architecture hub: every family in adapters_zoo/architectures.toml, built tiny from its real config,
through the same checks (litgpt tests every config of its hub; transformers' model testers run one suite
on every architecture). A family is supported when its row passes; docs/architectures.md is generated
from the same list.

Expectations come from outside lorakit: parameter counts from the tensors' own shapes, peft's documented
all-linear rule, gradients as autograd computes them, and the logits of the unmerged adapter model.
"""

from __future__ import annotations

import collections
import datetime
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_family, expert_tensors, family_batch, family_config, first_output, look_trained

import lorakit
from lorakit.adapter.format import save_extras
from lorakit.model.load import auto_class
from lorakit.cost.simulate import simulate
from lorakit.spec.zoo import ruled_modules

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


# ---- every way a model arrives ----------------------------------------------------------------------------------
# Users hand lorakit a model already quantized (lorakit.load(quant=...), from_pretrained with a BitsAndBytesConfig,
# a quantized checkpoint saved and loaded again) and adapters plain peft made, more often than they ask wrap to
# quantize. Each way runs on every run on one family of each group that must cover it (dense, MoE, encoder,
# multimodal) and one of the others; which family of a group rotates with the day (LORAKIT_HUB_ROTATION=N fixes the
# turn), so that successive runs walk the hub. The test ids name the families.

def _from_pretrained(**bnb):
    def arrive(folder: Path, cls):
        from transformers import BitsAndBytesConfig

        return cls.from_pretrained(folder / "base", quantization_config=BitsAndBytesConfig(**bnb))
    return arrive


def _saved_4bit(folder: Path, cls):
    """nf4 with double quantization and bf16 compute, saved by save_pretrained, loaded again. (Its storage stays
    uint8: bitsandbytes' CPU kernel misreads a bf16-stored weight of fewer than 32 rows, a router's say; FSDP's
    float32 storage runs in tests/test_sharding.py, bf16 in tests/test_wrap.py.)"""
    _from_pretrained(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                     bnb_4bit_compute_dtype=torch.bfloat16)(folder, cls).save_pretrained(folder / "quantized")
    return lorakit.load(folder / "quantized")


ARRIVALS = {  # way -> (how the model arrives, its bits)
    "load-4bit": (lambda folder, cls: lorakit.load(folder / "base", quant="4bit"), 4),
    "load-8bit": (lambda folder, cls: lorakit.load(folder / "base", quant="8bit"), 8),
    "bnb-4bit": (_from_pretrained(load_in_4bit=True), 4),  # transformers' defaults: fp4, its own skip list
    "bnb-8bit": (_from_pretrained(load_in_8bit=True), 8),
    "saved-4bit": (_saved_4bit, 4),
    "plain-peft": (None, None),  # full precision; the adapter is peft's own (get_peft_model, all-linear)
}
GROUPS = (("dense decoder",), ("moe decoder",), ("encoder",), ("vision-language", "multimodal encoder"),
          ("encoder-decoder", "speech", "vision", "ssm"))
ROTATION = int(os.environ.get("LORAKIT_HUB_ROTATION", datetime.date.today().toordinal()))


def _family(groups: tuple[str, ...], turn: int, quantized: bool) -> str:
    eligible = [n for n in NAMES if FAMILIES[n]["group"] in groups
                and not (quantized and "quant" in FAMILIES[n].get("limits", {}))]
    return eligible[turn % len(eligible)]


ARRIVAL_CASES = [(way, _family(groups, ROTATION + 5 * i + j, bits is not None))
                 for i, (way, (_, bits)) in enumerate(ARRIVALS.items()) for j, groups in enumerate(GROUPS)]


def _logits_of(model, name: str) -> torch.Tensor:
    with torch.no_grad():
        return first_logits(model.eval()(**family_batch(name, labels=False)))


@pytest.mark.parametrize("way,name", ARRIVAL_CASES, ids=[f"{w}-{n}" for w, n in ARRIVAL_CASES])
def test_a_model_as_it_arrives_wraps_reports_trains_and_merges_as_its_plan_says(way, name, tmp_path):
    from peft import LoraConfig, get_peft_model

    row = FAMILIES[name]
    cls = auto_class(row["task"])
    build_family(name).save_pretrained(tmp_path / "base")
    arrive, bits = ARRIVALS[way]
    limits = row.get("limits", {})
    if arrive is None:  # plain peft's adapter: lorakit merges it and loads it as peft made it
        model = cls.from_pretrained(tmp_path / "base")
        if "plain_peft" in limits:  # peft cannot make (or run) an all-linear adapter of this family: still so?
            with pytest.raises((ValueError, AttributeError)):
                get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))(**family_batch(name))
            return
        weights = {n: id(m.weight) for n, m in model.named_modules()
                   if isinstance(getattr(m, "weight", None), torch.nn.Parameter)}
        uses = collections.Counter(weights.values())
        shared = {n for n, weight in weights.items() if uses[weight] > 1}  # one weight in several modules
        made = look_trained(get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")), 0.1).eval()
        first_output(made(**family_batch(name))).backward()  # eval mode: no dropout, no LayerDrop
        idle = {n.removeprefix("base_model.model.").split(".lora_A")[0] for n, p in made.named_parameters()
                if ".lora_A." in n and p.grad is None}  # adapters the forward never uses
        made.save_pretrained(tmp_path / "adapter")
        expected = _logits_of(made, name)
        try:
            lorakit.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
        except lorakit.LorakitError as refusal:  # only where a merge cannot reproduce the adapter, and says where
            named = re.findall(r"(\S+), which cannot be merged", refusal.message)
            ruled = {n for n, rule in ruled_modules(model).items() if not rule.lora}  # adapters_zoo/module_rules
            assert named and set(named) <= shared | idle | ruled
        else:
            assert (_logits_of(cls.from_pretrained(tmp_path / "merged"), name) - expected).abs().max() <= 1e-4
        loaded = lorakit.load_adapter(cls.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
        assert (_logits_of(loaded, name) - expected).abs().max() <= 1e-4
        return
    if way == "saved-4bit" and "saved_4bit" in limits:  # transformers cannot read it back: lorakit says so
        with pytest.raises(lorakit.LorakitError, match="quantized"):
            lorakit.make_plan(arrive(tmp_path, cls), lora=lorakit.Lora(**SPEC))
        return
    model = arrive(tmp_path, cls)
    quantized = {n for n, m in model.named_modules() if type(m).__module__.startswith("bitsandbytes")}
    assert quantized  # it did arrive quantized
    plan = lorakit.make_plan(model, lora=lorakit.Lora(**SPEC))
    assert plan.quant.bits == bits and set(plan.quantized) | set(plan.dequantized) == quantized
    spec = dict(lora=lorakit.Lora(**SPEC), by="kind")
    planned = lorakit.report(model, **spec).to_dict()["layers"]
    # the same spec quantized by wrap, from the full-precision model in the dtypes the other weights arrived in (a
    # saved 4-bit checkpoint comes back with some in bf16): the same parameters, trainable and bytes
    reference = build_family(name)
    arrived = {n: p.dtype for n, p in model.named_parameters() if type(p) is torch.nn.Parameter}
    for param_name, param in reference.named_parameters():
        param.data = param.data.to(arrived.get(param_name, param.dtype))
    assert planned == lorakit.report(reference, quant=plan.quant, **spec).to_dict()["layers"]
    wrapped = lorakit.wrap(model, lora=lorakit.Lora(**SPEC)).train()
    base = build_family(name)  # counts from the full-precision layers' shapes, not from packed storage
    heads = sum(p.numel() for h in plan.trained_in_full for p in base.get_submodule(h).parameters())
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == lora_parameters(base, plan) + heads
    assert lorakit.report(wrapped, by="kind").to_dict()["layers"] == planned  # real tensors, row by row
    config = wrapped.get_base_model().config
    for key in [k for k in config.to_dict() if k.endswith("layerdrop")]:  # SEW skips whole layers at random
        setattr(config, key, 0.0)
    first_output(wrapped(**family_batch(name))).backward()
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    reached = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    assert reached <= trainable and (reached == trainable) != ("gradients" in limits)
    # the QLoRA adapter merged onto the full-precision base gives base + adapter's logits in plain transformers
    look_trained(wrapped, 0.1, also=lambda n, _: "modules_to_save" in n)
    wrapped.save_pretrained(tmp_path / "adapter")
    save_extras(wrapped, tmp_path / "adapter")
    lorakit.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    expected = _logits_of(lorakit.load_adapter(cls.from_pretrained(tmp_path / "base"), tmp_path / "adapter"), name)
    assert (_logits_of(cls.from_pretrained(tmp_path / "merged"), name) - expected).abs().max() <= 1e-4


def test_each_way_a_model_arrives_covers_every_required_group():
    for way in ARRIVALS:
        groups = {FAMILIES[n]["group"] for w, n in ARRIVAL_CASES if w == way}
        assert {"dense decoder", "moe decoder", "encoder"} <= groups and groups & {"vision-language",
                                                                                    "multimodal encoder"}


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
    from lorakit.cost.render import architecture_summary, architecture_table

    regenerate = "regenerate them: python tests/test_architectures.py"
    assert architecture_table() in (ROOT / "docs" / "architectures.md").read_text(), regenerate
    assert architecture_summary() in (ROOT / "README.md").read_text(), regenerate


if __name__ == "__main__":  # rewrite docs/architectures.md's table and the README's summary from the hub
    from lorakit.cost.render import architecture_summary, architecture_table

    doc = ROOT / "docs" / "architectures.md"
    text = doc.read_text()
    doc.write_text(text[:text.index("| family | model_type")] + architecture_table())
    readme = (ROOT / "README.md").read_text()
    start = readme.index(SUMMARY_START)
    end = readme.index("\n\n", start)
    (ROOT / "README.md").write_text(readme[:start] + architecture_summary().rstrip("\n") + readme[end:])
