"""Adapters served in vLLM itself (its side environment: `lorakit vllm-env`), each against `lorakit check --serve
vllm`'s verdict. Run with `pytest -m vllm` (`.ci/run` does, after building the environment); skipped, with the
reason, when the environment is not built.

Each case is a real adapter made through lorakit (or plain peft, or LoraTrainer) with random lora_B, as training
leaves it, on the real SmolLM2-135M-Instruct (tied embeddings; an untied copy for head and embedding cases), a tiny
Qwen3-MoE and a tiny Qwen2. vLLM serves each base once, every adapter in turn (a refused adapter does not stop the
engine). What vLLM did must be what `check` said: served alike (greedy tokens and top logprobs as transformers +
peft, served.TOLERANCE), refused (with the words lorakit named in advance, Breach.says), or answered otherwise (a
rule that blocks, with no words: vLLM says nothing)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import look_trained

import lorakit
from lorakit.adapter.format import TRAINED, save_extras
from lorakit.adapter.serving import serving_breaches
from lorakit.cli import main
from lorakit.deploy import served, vllm_env

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="session", autouse=True)
def vllm_is_built():
    """Skips each test, with the reason, when the environment is not built (a fixture, not a skip at import: the
    main suite deselects these tests and counts no skip for them)."""
    if vllm_env.python() is None:
        pytest.skip(f"vLLM's side environment is not built in {vllm_env.folder()}: `lorakit vllm-env` (or python3 "
                    "lorakit/deploy/vllm_env.py) builds it")


EMBEDDING_B = lambda name, param: "lora_embedding_B" in name  # noqa: E731 - LoRA on an embedding: A is random, B not

# name: (base, how the adapter is made, what vLLM does, the rules `check` names)
LISTED = {  # the cases the issue lists
    "plain LoRA, attention and MLP": ("smol", dict(r=8, targets="all-linear"), "alike", set()),
    "rank 32 above max_lora_rank 16": ("smol", dict(r=32, targets="all-linear"), "refused", {"r"}),
    "DoRA": ("smol", dict(r=8, targets="attention", use_dora=True), "refused", {"use_dora"}),
    "rsLoRA": ("smol", dict(r=8, targets="all-linear", use_rslora=True), "alike", set()),
    "rank_pattern and alpha_pattern": ("smol", dict(r=8, targets="all-linear", rank_pattern={"q_proj": 4},
                                                    alpha_pattern={"v_proj": 32}), "alike", set()),
    "a trained head (modules_to_save)": ("untied", dict(r=8, targets="attention", train_fully=["lm_head"]),
                                         "refused", {"modules_to_save"}),
    "LoRA on lm_head": ("untied", dict(r=8, targets=["q_proj", "v_proj", "lm_head"]), "alike", set()),
    "LoRA on embed_tokens": ("untied", dict(r=8, targets=["q_proj", "embed_tokens"]), "alike", set()),
    "resized embeddings, LoRA on them": ("untied", dict(r=8, targets=["q_proj", "embed_tokens"], resize=3),
                                         "refused", {"vocabulary"}),
    "resized embeddings, LoRA on attention": ("untied", dict(r=8, targets=["q_proj", "v_proj"], resize=3),
                                              "refused", {"vocabulary"}),
    "MoE experts (target_parameters)": ("moe", dict(r=4, targets="all-linear"), "refused", {"target_parameters"}),
}
HELD_OUT = {  # made in ways the issue does not list
    "plain peft, regex targets": ("smol", "peft", "alike", set()),
    "LoRA on the last 10 blocks only": ("smol", dict(r=8, targets="all-linear", layers=range(20, 30)), "alike",
                                        set()),
    "bias='all' on a model without biases": ("smol", dict(r=8, targets="attention", bias="all"), "refused",
                                             {"bias"}),
    "PiSSA init": ("smol", dict(r=8, targets="attention", init="pissa"), "refused", {"init_lora_weights"}),
    "LoRA beside two unfrozen blocks": ("smol", dict(r=8, targets="attention", freeze=28), "different", {TRAINED}),
    "Qwen2: LoRA on embed_tokens": ("qwen2", dict(r=8, targets=["q_proj", "embed_tokens"]), "refused",
                                    {"target_modules"}),
    "Qwen2: a LoraTrainer checkpoint": ("qwen2", "trainer", "alike", set()),
}
CASES = {**LISTED, **HELD_OUT}
PROMPTS = ["The capital of France is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def bases(smollm2, tmp_path_factory):
    """The base folders: SmolLM2, its untied copy (its own lm_head), a tiny Qwen3-MoE and a tiny Qwen2 (head_dim 64:
    vLLM's CPU attention takes no smaller)."""
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    root = tmp_path_factory.mktemp("bases")
    model = AutoModelForCausalLM.from_pretrained(smollm2.folder, dtype=torch.float32)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    model.save_pretrained(root / "untied")
    smollm2.tokenizer.save_pretrained(root / "untied")
    torch.manual_seed(0)
    small = dict(hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=64, vocab_size=512, max_position_embeddings=512,
                 tie_word_embeddings=False)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**small, moe_intermediate_size=64, num_experts=4,
                                       num_experts_per_tok=2)).save_pretrained(root / "moe")
    Qwen2ForCausalLM(Qwen2Config(**small)).save_pretrained(root / "qwen2")
    return {"smol": Path(smollm2.folder), "untied": root / "untied", "moe": root / "moe", "qwen2": root / "qwen2"}


def _make(case: str, base: Path, folder: Path) -> Path:
    _, how, _, _ = CASES[case]
    torch.manual_seed(0)
    if how == "peft":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                               LoraConfig(r=8, lora_alpha=16, target_modules=r".*\.(q|v|down)_proj"))
        look_trained(model, 0.02).save_pretrained(folder)
        return folder
    if how == "trainer":
        return _trained_checkpoint(base, folder)
    spec = dict(how)
    resize, freeze = spec.pop("resize", 0), spec.pop("freeze", None)
    model = lorakit.load(base)
    if resize:
        model.resize_token_embeddings(model.config.vocab_size + resize, mean_resizing=False)
    wrapped = lorakit.wrap(model, lora=lorakit.Lora(**spec),
                           freeze=lorakit.Freeze(first_layers=freeze, embeddings=True) if freeze else None)
    unfrozen = lambda name, param: param.requires_grad and "lora_" not in name  # noqa: E731
    look_trained(wrapped, 0.2 if base.name == "moe" else 0.02, also=EMBEDDING_B)
    with torch.no_grad():  # blocks trained in full: moved a little from the base, as training would
        generator = torch.Generator().manual_seed(2)
        for name, param in wrapped.named_parameters():
            if unfrozen(name, param):
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    wrapped.save_pretrained(folder)
    save_extras(wrapped, folder)
    return folder


def _trained_checkpoint(base: Path, folder: Path) -> Path:
    import datasets

    ids = torch.randint(3, 500, (8, 12), generator=torch.Generator().manual_seed(0)).tolist()
    model = lorakit.wrap(lorakit.load(base), lora=lorakit.Lora(r=8, targets="all-linear"))
    args = lorakit.training_args(str(folder.parent / "run"), max_steps=3, per_device_train_batch_size=4,
                                 learning_rate=0.05, save_steps=3, report_to=[])
    data = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    lorakit.LoraTrainer(model=model, args=args, train_dataset=data).train()
    return folder.parent / "run" / "checkpoint-3"


class _Lazy(dict):
    """A dict that makes each value the first time a test asks for it: no test waits for another's engine."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, key):
        self[key] = self.make(key)
        return self[key]


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return _Lazy(lambda case: _make(case, bases[CASES[case][0]], root / f"a{list(CASES).index(case)}"))


@pytest.fixture(scope="module")
def outcomes(bases, adapters):
    """Every case's verdict, one vLLM engine per base (started when a test first asks for one of its cases), each
    adapter in turn; SmolLM2's plain and rsLoRA adapters once more, together in one batch (multi-LoRA)."""
    found = {}

    def serve(case):
        key = CASES[case.removesuffix(" together")][0]
        cases = [c for c in CASES if CASES[c][0] == key]
        prompts = served.prompt_ids(bases[key], PROMPTS)
        together = ["plain LoRA, attention and MLP", "rsLoRA"] if key == "smol" else None
        result = served.run_vllm(bases[key], prompts, [{"name": c, "path": str(adapters[c])} for c in cases],
                                 together=together)
        references = {run["name"]: served.reference_model(bases[key], adapters[run["name"]])
                      for run in result["runs"] if "answers" in run}
        found.update(served.verdicts(result, references, prompts))
        return found[case]

    return _Lazy(lambda case: found[case] if case in found else serve(case))


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_does_what_check_says(case, adapters, outcomes):
    _, _, verdict, rules = CASES[case]
    breaches = serving_breaches(adapters[case], "vllm")
    outcome = outcomes[case]
    assert {b.rule for b in breaches} == rules, [b.line() for b in breaches]
    assert outcome.verdict == verdict, outcome.line()
    assert outcome.vllm == lorakit.adapter.serving.VLLM_CHECKED
    if verdict == "refused":  # vLLM's own words, which check named in advance
        assert any(b.says and b.says in outcome.detail for b in breaches), (outcome.detail, breaches)
    if verdict == "different":  # vLLM loads it without a word: a rule with no words of vLLM's blocks it
        assert breaches and not any(b.says for b in breaches)
    if verdict == "alike":
        assert outcome.tokens == 2 * 8 and outcome.gap < served.TOLERANCE


def test_two_adapters_served_at_once_answer_as_each_alone(outcomes):
    for name in ("plain LoRA, attention and MLP", "rsLoRA"):
        assert outcomes[f"{name} together"].verdict == "alike", outcomes[f"{name} together"].line()


def test_moe_experts_with_vllms_own_fix_load_but_its_cpu_build_cannot_run_them(bases, adapters):
    """The fix vLLM names (--enable-mixed-moe-lora-format, is_3d_lora_weight) gets past its refusal; its CPU build
    then has no MoE LoRA kernel (Triton only), so whether the answers match is not checked here."""
    case = "MoE experts (target_parameters)"
    result = served.run_vllm(bases["moe"], [[1, 2, 3]], [{"name": case, "path": str(adapters[case]),
                                                          "is_3d_lora_weight": True}])
    run = result["runs"][0]
    assert "refused" not in run and "triton" in run.get("failed", "").lower(), run


def test_the_merged_model_served_plain_answers_as_base_and_adapter(bases, adapters, tmp_path):
    case = "plain LoRA, attention and MLP"
    lorakit.merge(bases["smol"], adapters[case], tmp_path / "merged")
    prompts = served.prompt_ids(bases["smol"], PROMPTS)
    result = served.run_vllm(tmp_path / "merged", prompts)
    outcome = served.verdicts(result, {None: served.reference_model(bases["smol"], adapters[case])}, prompts)
    assert outcome[None].verdict == "alike", outcome[None].line()


def test_cli_check_run_serves_it_and_says_what_vllm_did(adapters, capsys):
    assert main(["check", str(adapters["LoRA on lm_head"]), "--serve", "vllm", "--run", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "can be served by vllm as it is (rules checked in vLLM 0.32.0)" in out
    assert "served in vLLM 0.32.0: alike: 12 greedy tokens" in out  # three prompts, four tokens each


def test_cli_check_run_shows_vllms_refusal_beside_the_rule_that_named_it(adapters, capsys):
    refused = adapters["DoRA"]
    assert main(["check", str(refused), "--serve", "vllm", "--run", "--max-tokens", "2"]) == 1
    out = capsys.readouterr().out
    assert "vLLM 0.32.0 refuses it: vLLM does not yet support DoRA." in out
    assert "served in vLLM 0.32.0: refused: ValueError: vLLM does not yet support DoRA." in out
    assert "disagrees" not in out
    assert json.loads((refused / "adapter_config.json").read_text())["use_dora"]  # the adapter is as it was
