"""What `lorakit check --run` does without vLLM at hand: the verdict against transformers + peft (on answers made
here), the message when vLLM's environment is missing, and a failed build of that environment leaving nothing.
vLLM itself: tests/deploy/test_vllm.py (`pytest -m vllm`)."""

from __future__ import annotations

import pytest
import torch
from conftest import build, look_trained

import lorakit
from lorakit.cli import main
from lorakit.deploy import served, vllm_env


def _answers(model, prompts, steps=4):
    """Greedy answers as vLLM reports them: each step's token and the top-5 logprobs."""
    found = []
    for prompt in prompts:
        ids, answer = list(prompt), {"tokens": [], "logprobs": []}
        for _ in range(steps):
            with torch.no_grad():
                step = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
            top = step.topk(5)
            answer["tokens"].append(int(top.indices[0]))
            answer["logprobs"].append({str(int(i)): float(v) for v, i in zip(top.values, top.indices)})
            ids.append(int(top.indices[0]))
        found.append(answer)
    return found


def test_the_verdict_tells_an_adapter_from_its_base_and_from_a_nudge():
    base = build("llama").eval()
    adapted = look_trained(lorakit.wrap(build("llama"), lora=lorakit.Lora(r=4, targets="all-linear")), 0.3).eval()
    prompts = [[1, 2, 3], [7, 8, 9, 10]]
    assert served.compare("x", _answers(adapted, prompts), adapted, prompts, "v").verdict == "alike"
    wrong = served.compare("x", _answers(base, prompts), adapted, prompts, "v")  # the adapter ignored
    assert wrong.verdict == "different" and "vLLM chose" in wrong.detail
    nudged = _answers(adapted, prompts)
    first = nudged[0]["logprobs"][0]
    key = next(iter(first))
    first[key] += 2 * served.TOLERANCE  # same tokens, one logprob off by more than the tolerance
    off = served.compare("x", nudged, adapted, prompts, "v")
    assert off.verdict == "different" and "top logprob" in off.detail


def test_check_run_without_vllms_environment_says_how_to_build_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    adapter = tmp_path / "adapter"
    lorakit.wrap(build("llama"), lora=lorakit.Lora(r=4, targets="attention")).save_pretrained(adapter)
    assert main(["check", str(adapter), "--serve", "vllm", "--run"]) == 2
    err = capsys.readouterr().err
    assert "error: vLLM's side environment is not built" in err and "hint: build it once: lorakit vllm-env" in err
    assert main(["check", str(adapter), "--serve", "sglang", "--run"]) == 2
    assert "--run serves in vLLM only" in capsys.readouterr().err


def test_a_failed_build_of_vllms_environment_leaves_nothing_that_looks_ready(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # nothing to install from: pip fails at once, offline
    monkeypatch.setattr(vllm_env, "TORCH", "lorakit-no-such-package==0")
    with pytest.raises(RuntimeError, match="building vLLM's environment failed at .*lorakit-no-such-package"):
        vllm_env.build()
    assert vllm_env.python() is None and list(tmp_path.iterdir()) == []
