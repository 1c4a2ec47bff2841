"""The streamed merge's verification, tensor by tensor (lorakit.deploy.verify_streamed), against the logits check.

A merged file is corrupted on disk after it was written and before it is checked (the real merge_streamed
runs, then one stored weight is changed): the check must name it and nothing may be published.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import build_family, look_trained
from safetensors.torch import load_file, save_file
from test_merge import ARCHS, make_adapter

import lorakit
from lorakit.adapter.format import save_extras

merging = importlib.import_module("lorakit.deploy.merge")
read_adapter = importlib.import_module("lorakit.deploy.adapters").read_adapter
streaming = importlib.import_module("lorakit.deploy.streaming")
verify_streamed = importlib.import_module("lorakit.deploy.verify_streamed")


def moe_adapter(name: str, folder):
    build_family(name).save_pretrained(folder / "base")
    model = look_trained(lorakit.wrap(lorakit.load(folder / "base"), lora=lorakit.Lora(r=4)), 0.1)
    model.save_pretrained(folder / "adapter")
    save_extras(model, folder / "adapter")
    return folder / "adapter"


def corrupting(monkeypatch, pick, change):
    """merge_streamed as it is, then one element of the first stored tensor `pick(name)` accepts gets `change`."""
    real = merging.merge_streamed
    hit = []

    def merge_then_corrupt(base_dir, adapter, staging, *args):
        stats = real(base_dir, adapter, staging, *args)
        for file in sorted(staging.glob("*.safetensors")):
            tensors = load_file(str(file))
            name = next((n for n in tensors if pick(n)), None)
            if name is not None:
                flat = tensors[name].view(-1)
                flat[flat.numel() // 3] = change(flat[flat.numel() // 3])
                save_file(tensors, str(file), metadata={"format": "pt"})
                hit.append(name)
                return stats
        raise AssertionError("no tensor to corrupt")

    monkeypatch.setattr(merging, "merge_streamed", merge_then_corrupt)
    return hit


CASES = {  # where the corrupted weight is: a Linear, GPT-2's Conv1D (fan_in_fan_out), experts apart and fused
    "llama": lambda n: n.endswith("mlp.up_proj.weight"),
    "gpt2": lambda n: n.endswith("attn.c_attn.weight"),
    "qwen3-moe": lambda n: ".experts.1." in n and n.endswith("up_proj.weight"),
    "gpt-oss": lambda n: n.endswith("experts.gate_up_proj"),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_a_lora_weight_changed_after_writing_is_caught_and_nothing_is_published(arch, tmp_path, monkeypatch):
    adapter = (make_adapter(arch, tmp_path, ARCHS[arch]) if arch in ARCHS else moe_adapter(arch, tmp_path))
    good = lorakit.merge(tmp_path / "base", adapter, tmp_path / "good", verify_logits=False)
    modules = good["verification"]["modules"]
    assert good["verification"]["logits_check"].startswith("skipped") and "max_abs_logit_difference" not in \
        good["verification"]
    assert modules["lora_tensors_probed"] > 0 and modules["worst_ratio_to_tolerance"] < 1
    hit = corrupting(monkeypatch, CASES[arch], lambda value: value * (1 + 1e-3))  # 1e-3 relative, one element
    with pytest.raises(lorakit.LorakitError, match="verification failed") as caught:
        lorakit.merge(tmp_path / "base", adapter, tmp_path / "bad", verify_logits=False)
    assert hit[0] in str(caught.value) and "random probe" in str(caught.value)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_an_unchanged_weight_must_stay_bit_for_bit(tmp_path, monkeypatch):
    adapter = make_adapter("llama", tmp_path, ARCHS["llama"])
    corrupting(monkeypatch, lambda n: n.endswith("input_layernorm.weight"), lambda value: torch.nextafter(
        value, value + 1))  # one ulp
    with pytest.raises(lorakit.LorakitError, match="input_layernorm.weight is not what it should be"):
        lorakit.merge(tmp_path / "base", adapter, tmp_path / "bad", verify_logits=False)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_module_check_agrees_with_the_logits_check(dtype, tmp_path, monkeypatch):
    """Both pass a right merge; both fail one whose updates are 10% short (a wrong LoRA scale)."""
    adapter = make_adapter("llama", tmp_path, ARCHS["llama"])
    right = lorakit.merge(tmp_path / "base", adapter, tmp_path / "right", dtype=dtype, verify_logits=True)
    figures = right["verification"]
    assert figures["logits_check"].startswith("ran") and figures["max_abs_logit_difference"] <= figures["tolerance"]
    assert figures["modules"]["worst_ratio_to_tolerance"] < 1
    real = streaming._scale
    monkeypatch.setattr(streaming, "_scale", lambda *a: 0.9 * real(*a))
    lorakit.merge(tmp_path / "base", adapter, tmp_path / "wrong", dtype=dtype, verify=False)
    loaded = read_adapter(adapter)
    config = lorakit.load(tmp_path / "base").config
    with pytest.raises(lorakit.LorakitError, match="differs from base"):
        verify_streamed.verify_modules(tmp_path / "base", loaded, tmp_path / "wrong", config)
    with pytest.raises(lorakit.LorakitError, match="logits differ"):
        verify_streamed.verify_merged(tmp_path / "base", [loaded], tmp_path / "wrong", config, None, "linear", dtype,
                                      "original")


def test_the_logits_check_runs_by_the_size_rule_or_as_asked(tmp_path, monkeypatch, capsys):
    from lorakit.cli import main

    adapter = make_adapter("bert", tmp_path, ARCHS["bert"])
    small = lorakit.merge(tmp_path / "base", adapter, tmp_path / "small")
    assert small["verification"]["logits_check"].startswith("ran: ") and "max_abs_logit_difference" in \
        small["verification"]
    monkeypatch.setattr(verify_streamed, "LOGITS_CHECK_BYTES", 1000)  # as if the model were too big for it
    big = lorakit.merge(tmp_path / "base", adapter, tmp_path / "big")
    assert big["verification"]["logits_check"].startswith("skipped: ") and big["verification"]["modules"]
    args = ["merge", "--base", str(tmp_path / "base"), "--adapter", str(adapter), "--out", str(tmp_path / "cli")]
    assert main(args + ["--verify-logits"]) == 0
    out = capsys.readouterr().out
    assert "LoRA updates on random probes" in out and "max |logit difference|" in out
    with pytest.raises(lorakit.SpecError, match="verify_logits is for a verified merge"):
        lorakit.merge(tmp_path / "base", adapter, tmp_path / "x", verify=False, verify_logits=True)
    with pytest.raises(lorakit.SpecError, match="leaves this merge unchecked"):  # peft's path has no module check
        lorakit.merge(tmp_path / "base", adapter, tmp_path / "y", stream=False, verify_logits=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
