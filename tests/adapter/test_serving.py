"""Serving an adapter unmerged: every vLLM / SGLang rule checked on tiny real adapters. The expected rules are
vLLM's own, read from its source (PEFTHelper._validate_features, validate_legal, LoRAConfig.max_lora_rank's
allowed set and default), written out here by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import build, build_family, look_trained

import lorakit
from lorakit.adapter.format import save_extras
from lorakit.cli import main
from lorakit.adapter.serving import serving_breaches


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serving") / "llama"
    build("llama").save_pretrained(folder)
    return folder


def _adapter(base, folder, **lora):
    model = lorakit.load(base)
    if lora.pop("resize", False):
        model.resize_token_embeddings(110)
    wrapped = look_trained(lorakit.wrap(model, lora=lora), 0.1)
    wrapped.save_pretrained(folder)
    save_extras(wrapped, folder)
    return folder


# (Lora spec, rules broken in vLLM, rules broken in SGLang)
CASES = {
    "plain r=8": (dict(r=8, targets="all-linear"), set(), set()),
    "r=16, vLLM's default limit": (dict(r=16, targets="attention"), set(), set()),
    "r=24 needs --max-lora-rank 32": (dict(r=24, targets="attention"), {"r"}, set()),
    "rank_pattern raises the largest rank": (dict(r=8, targets="attention", rank_pattern={"q_proj": 64}), {"r"},
                                             set()),
    "r=600, above 512": (dict(r=600, targets=["q_proj"]), {"r"}, set()),
    "DoRA": (dict(r=8, targets="attention", use_dora=True), {"use_dora"}, {"use_dora"}),
    "trained biases": (dict(r=8, targets="attention", bias="all"), {"bias"}, {"bias"}),
    "a head trained in full": (dict(r=8, targets="attention", train_fully=["lm_head"]), {"modules_to_save"},
                               {"modules_to_save"}),
    "PiSSA rewrites the base": (dict(r=8, targets="attention", init="pissa"), {"init_lora_weights"},
                                {"init_lora_weights"}),
    # vLLM's LlamaForCausalLM declares embed_tokens and lm_head (embedding_modules): served, tested in vLLM
    "LoRA on the embeddings": (dict(r=8, targets=["q_proj", "embed_tokens"]), set(), {"target_modules"}),
    "a resized vocabulary": (dict(r=8, targets="attention", train_fully=["embed_tokens"], resize=True),
                             {"modules_to_save", "vocabulary"}, {"modules_to_save", "vocabulary"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_serving_rule_on_a_tiny_adapter(case, base, tmp_path):
    spec, vllm_rules, sglang_rules = CASES[case]
    folder = _adapter(base, tmp_path / "adapter", **spec)
    vllm = serving_breaches(folder, "vllm")
    assert {b.rule for b in vllm} == vllm_rules, [b.line() for b in vllm]
    assert {b.rule for b in serving_breaches(folder, "sglang")} == sglang_rules
    if case == "r=24 needs --max-lora-rank 32":  # the next rank vLLM allows, not 24
        assert "--max-lora-rank 32" in vllm[0].fix
    assert all(b.fix for b in vllm)


def test_classification_heads_vllm_accepts_and_moe_experts_it_does_not_load(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    LlamaForSequenceClassification(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                               num_labels=3, pad_token_id=0)).save_pretrained(tmp_path / "cls")
    wrapped = lorakit.wrap(lorakit.load(tmp_path / "cls"), lora=dict(r=8, targets="attention"))
    wrapped.save_pretrained(tmp_path / "cls-adapter")
    save_extras(wrapped, tmp_path / "cls-adapter")
    # peft saves the classifier as modules_to_save=["score"]: PEFTHelper lets exactly that through
    assert serving_breaches(tmp_path / "cls-adapter", "vllm") == []
    assert {b.rule for b in serving_breaches(tmp_path / "cls-adapter", "sglang")} == {"modules_to_save"}

    moe = build_family("qwen2-moe")
    moe.save_pretrained(tmp_path / "moe")
    wrapped = lorakit.wrap(lorakit.load(tmp_path / "moe"), lora=dict(r=4, targets="mlp"))
    wrapped.save_pretrained(tmp_path / "moe-adapter")
    save_extras(wrapped, tmp_path / "moe-adapter")
    assert "target_parameters" in {b.rule for b in serving_breaches(tmp_path / "moe-adapter", "vllm")}


def test_lora_on_embeddings_depends_on_the_bases_vllm_class(tmp_path):
    """vLLM adapts embeddings only where the model class declares them: its Qwen2ForCausalLM does not (refused in
    vLLM, tests/deploy/test_vllm.py); without the base at hand the architecture is unknown, so the rule stands."""
    build("qwen2").save_pretrained(tmp_path / "qwen2")
    folder = _adapter(tmp_path / "qwen2", tmp_path / "adapter", r=8, targets=["q_proj", "embed_tokens"])
    (breach,) = serving_breaches(folder, "vllm")
    assert breach.rule == "target_modules" and "Qwen2ForCausalLM adapts no embedding" in breach.problem
    assert breach.says == "expected target modules in"
    (tmp_path / "qwen2" / "config.json").unlink()  # the base gone: no architecture to go by
    (breach,) = serving_breaches(folder, "vllm")
    assert "not at hand" in breach.problem and breach.says == ""
    assert serving_breaches(folder, "vllm", base=tmp_path / "nowhere")[0].rule == "target_modules"


def test_cli_check_lists_each_rule_with_its_fix(base, tmp_path, capsys):
    folder = _adapter(base, tmp_path / "a", r=24, targets="attention", use_dora=True)
    assert main(["check", str(folder), "--serve", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "- r: rank 24" in out and "fix: start vLLM with --max-lora-rank 32" in out
    assert "vLLM 0.32.0 refuses it: LoRA rank 24 is greater than max_lora_rank 16." in out  # vLLM's words
    assert "- use_dora: DoRA" in out and "breaks 2 rule(s) of vllm (rules checked in vLLM 0.32.0)" in out
    clean = _adapter(base, tmp_path / "b", r=8, targets="attention")
    assert main(["check", str(clean), "--serve", "sglang"]) == 0
    assert "can be served by sglang as it is" in capsys.readouterr().out
    assert main(["check", str(folder), "--serve", "vllm", "--max-lora-rank", "32"]) == 1  # the rank fits now
    out = capsys.readouterr().out
    assert "- r:" not in out and "breaks 1 rule(s) of vllm" in out
    assert main(["check", str(folder), "--serve", "vllm", "--max-lora-rank", "24"]) == 2
    assert "vLLM takes only 1, 8, 16, 32" in capsys.readouterr().err
    assert main(["check", str(tmp_path), "--serve", "vllm"]) == 2  # not an adapter folder: error + hint
    assert "no adapter_config.json" in capsys.readouterr().err


def test_serve_for_refuses_at_the_spec_what_the_adapter_check_would_find(base, tmp_path):
    for fields, words in ((dict(use_dora=True), "use_dora"), (dict(bias="all"), "bias='all'"),
                          (dict(train_fully=["lm_head"]), "train_fully"), (dict(init="pissa"), "init='pissa'"),
                          (dict(r=1024), "rank 1024")):
        with pytest.raises(lorakit.LorakitError, match=f"cannot be served by vllm: .*{words}"):
            lorakit.Lora(targets="attention", serve_for="vllm", **fields)
    assert lorakit.Lora(train_fully=["score"], serve_for="vllm")  # PEFTHelper's one exception
    with pytest.raises(lorakit.LorakitError, match="serve_for must be one of vllm, sglang"):
        lorakit.Lora(serve_for="tgi")
    folder = _adapter(base, tmp_path / "ok", r=8, targets="attention", serve_for="vllm")
    assert serving_breaches(folder, "vllm") == []


def _final_save(base, tmp_path, lora, caplog, steps=0):
    """LoraTrainer on the tiny Llama (with `steps` steps, each saving a checkpoint), then save_model: the lorakit
    warnings logged by the checkpoints and by the final save."""
    import datasets

    ids = torch.randint(3, 100, (4, 8), generator=torch.Generator().manual_seed(0)).tolist()
    args = lorakit.training_args(str(tmp_path / "run"), max_steps=max(steps, 1), per_device_train_batch_size=4,
                                 save_strategy="steps" if steps else "no", save_steps=1, use_cpu=True,
                                 disable_tqdm=True, report_to=[])
    trainer = lorakit.LoraTrainer(model=lorakit.load(base), args=args, lora=lorakit.Lora(**lora),
                                  train_dataset=datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}))
    caplog.clear()
    if steps:
        trainer.train()
    during = [r.getMessage() for r in caplog.records if r.name == "lorakit" and r.levelname == "WARNING"]
    caplog.clear()
    trainer.save_model(str(tmp_path / "final"))
    return during, [r.getMessage() for r in caplog.records if r.name == "lorakit" and r.levelname == "WARNING"]


def test_a_final_save_says_in_one_line_when_the_adapter_cannot_be_served(base, tmp_path, caplog):
    caplog.set_level("WARNING", logger="lorakit")
    assert _final_save(base, tmp_path / "plain", dict(r=8, targets="attention"), caplog) == ([], [])
    # a head trained in full: vLLM would not load it; checkpoints say nothing, the final save one line
    during, final = _final_save(base, tmp_path / "head", dict(r=8, targets="attention", train_fully=["lm_head"]),
                                caplog, steps=1)
    assert (tmp_path / "head" / "run" / "checkpoint-1").is_dir() and during == []
    folder = tmp_path / "head" / "final"
    assert len(final) == 1 and "\n" not in final[0], final
    assert f"{folder} cannot be served unmerged by vllm as saved (modules_to_save)" in final[0]
    assert f"lorakit check {folder} --serve vllm" in final[0]
    # rank 24 is above vLLM's default max_lora_rank; SGLang, when the Lora was planned for it, has no such limit
    assert "(r)" in _final_save(base, tmp_path / "r24", dict(r=24, targets="attention"), caplog)[1][0]
    assert _final_save(base, tmp_path / "r24-sglang", dict(r=24, targets="attention", serve_for="sglang"),
                       caplog) == ([], [])
