"""merge(): streamed and peft paths, checked against peft's own merge and hand-computed updates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _models import make_adapter
from conftest import build, look_trained, sample_inputs

import lorakit
from lorakit.adapter.format import save_extras

HERE = Path(__file__).parent


def plain_peft_merge(base_dir: Path, adapter: Path, arch: str):
    from peft import PeftModel

    base = lorakit.load(base_dir)
    return PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()


ARCHS = {"bert": dict(r=4), "gpt2": dict(r=4, targets="attention"), "resnet": dict(r=4),
         "llama": dict(r=4, targets="all-linear"), "t5": dict(r=4, targets="attention"), "vit": dict(r=4)}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_streamed_merge_equals_peft_merge_and_is_plain_transformers(arch, tmp_path, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("lorakit.deploy.shard_writer"), "OUTPUT_SHARD_BYTES",
                        8000)  # several shards
    adapter = make_adapter(arch, tmp_path, ARCHS[arch])
    report = lorakit.merge(tmp_path / "base", adapter, tmp_path / "merged")
    # ViT checkpoints keep legacy names that transformers 5 renames on load: the stream renames them as it does
    assert report["path"].startswith("streamed") and report["merged_layers"] > 0
    assert report["verification"]["max_abs_logit_difference"] <= 1e-4
    files = sorted(os.listdir(tmp_path / "merged"))
    assert "config.json" in files and "merge_report.json" in files
    assert "model.safetensors.index.json" in files  # streamed: several output shards, with an index
    from safetensors import safe_open

    keys = set()
    for name in files:
        if name.endswith(".safetensors"):
            with safe_open(str(tmp_path / "merged" / name), "pt") as handle:
                keys |= set(handle.keys())
    assert not any("lora_" in k or "base_model.model" in k or "base_layer" in k for k in keys)
    merged = type(build(arch)).from_pretrained(tmp_path / "merged").eval()
    expected = plain_peft_merge(tmp_path / "base", adapter, arch)
    inputs = {k: v for k, v in sample_inputs(arch).items() if k != "labels"}
    if arch == "t5":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, expected(**inputs).logits, atol=1e-5)


def test_merged_output_loads_without_peft_or_lorakit(tmp_path):
    adapter = make_adapter("bert", tmp_path, dict(r=4))
    lorakit.merge(tmp_path / "base", adapter, tmp_path / "merged")
    code = f"""
import importlib.util, sys
real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] in ('peft', 'lorakit') else real(name, *a)
for name in ('peft', 'lorakit'):
    sys.modules[name] = None  # import peft / import lorakit now raise ImportError
from transformers import AutoModelForSequenceClassification
import torch
model = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'merged')!r})
print(model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape)
try:
    import peft
except ImportError:
    print("peft blocked")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "torch.Size([1, 3])" in result.stdout and "peft blocked" in result.stdout


def test_cat_weighted_merge_is_the_weighted_sum_of_updates(tmp_path):
    from safetensors.torch import load_file

    first = make_adapter("llama", tmp_path, dict(r=4, targets="attention"), seed=1)
    second = make_adapter("llama", tmp_path, dict(r=4, targets="attention"), seed=2)
    report = lorakit.merge(tmp_path / "base", [first, second], tmp_path / "merged", weights=[0.7, 0.3],
                           method="cat")
    assert report["path"].startswith("peft") and "exact" in report["exactness"]
    base = lorakit.load(tmp_path / "base").state_dict()
    merged = lorakit.load(tmp_path / "merged").state_dict()
    key = "model.layers.1.self_attn.q_proj"
    scale = json.loads((first / "adapter_config.json").read_text())["lora_alpha"] / 4  # alpha / r
    expected = base[key + ".weight"].clone()
    for weight, folder in ((0.7, first), (0.3, second)):
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        a = tensors[f"base_model.model.{key}.lora_A.weight"]
        b = tensors[f"base_model.model.{key}.lora_B.weight"]
        expected += weight * scale * (b @ a)
    assert torch.allclose(merged[key + ".weight"], expected, atol=1e-6)


@pytest.mark.parametrize("method", ["linear", "svd", "ties", "dare_linear"])
def test_other_weighted_methods_run_and_verify_against_peft(method, tmp_path):
    first = make_adapter("llama", tmp_path, dict(r=4, targets="attention"), seed=1)
    second = make_adapter("llama", tmp_path, dict(r=4, targets="attention"), seed=2)
    report = lorakit.merge(tmp_path / "base", [first, second], tmp_path / "merged", weights=[0.5, 0.5],
                           method=method)
    assert report["verification"]["max_abs_logit_difference"] <= 1e-4
    assert "approximate" in report["exactness"]


def test_adapter_trained_on_4bit_merges_into_original_or_dequantized(tmp_path):
    adapter = make_adapter("wide-llama", tmp_path, dict(r=4, targets="all-linear"), quant="4bit")
    original = lorakit.merge(tmp_path / "base", adapter, tmp_path / "orig")
    gap = original["verification"]["quantization_gap"]["max_abs_logit_difference"]
    assert gap > 1e-3  # quantization costs something, and the report says how much
    dequantized = lorakit.merge(tmp_path / "base", adapter, tmp_path / "deq", into="dequantized")
    assert dequantized["verification"]["max_abs_logit_difference"] <= 1e-2
    assert "quantized base" in dequantized["verification"]["reference"]
    assert json.loads((tmp_path / "deq" / "config.json").read_text()).get("quantization_config") is None


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_merge_is_checked_against_fp32_within_what_rounding_costs(dtype, tmp_path, monkeypatch):
    import importlib

    adapter = make_adapter("llama", tmp_path, dict(r=4, targets="all-linear"))
    report = lorakit.merge(tmp_path / "base", adapter, tmp_path / "merged", dtype=dtype)
    from safetensors import safe_open

    with safe_open(str(next((tmp_path / "merged").glob("*.safetensors"))), "pt") as handle:
        assert handle.get_tensor(handle.keys()[0]).dtype == getattr(torch, dtype)
    figures = report["verification"]
    assert 0 < figures["rounding_floor"] and figures["max_abs_logit_difference"] <= figures["tolerance"]
    # A merge that is wrong by 10% of the adapter's update is caught, even in bf16.
    streaming = importlib.import_module("lorakit.deploy.streaming")
    real = streaming._scale
    monkeypatch.setattr(streaming, "_scale", lambda *a: 0.9 * real(*a))
    with pytest.raises(lorakit.LorakitError, match="verification failed"):
        lorakit.merge(tmp_path / "base", adapter, tmp_path / "wrong", dtype=dtype)


def test_a_real_models_fp32_merge_verifies_within_peft_own_rounding(smollm2, tmp_path, monkeypatch):
    """SmolLM2-135M (30 blocks), all-linear: peft's own fp32 merge moves the logits by about 1.5e-4, above a fixed
    1e-4 bound; the bound is that floor, and a merge 1% off is still caught."""
    import importlib

    wrapped = look_trained(lorakit.wrap(smollm2.model(), lora=lorakit.Lora(r=8, targets="all-linear")), 0.02)
    wrapped.save_pretrained(tmp_path / "adapter")
    save_extras(wrapped, tmp_path / "adapter")
    figures = lorakit.merge(smollm2.folder, tmp_path / "adapter", tmp_path / "merged")["verification"]
    assert 1e-4 < figures["rounding_floor"] and figures["max_abs_logit_difference"] <= figures["tolerance"]
    streaming = importlib.import_module("lorakit.deploy.streaming")
    real = streaming._scale
    monkeypatch.setattr(streaming, "_scale", lambda *a: 0.99 * real(*a))
    with pytest.raises(lorakit.LorakitError, match="verification failed"):
        lorakit.merge(smollm2.folder, tmp_path / "adapter", tmp_path / "wrong")


@pytest.mark.parametrize("kwargs,words", [
    (dict(weights=[1.0, 2.0]), "2 weights for 1 adapters"),
    (dict(method="average"), "unknown merge method"),
])
def test_bad_merge_arguments(kwargs, words, tmp_path):
    adapter = make_adapter("bert", tmp_path, dict(r=4))
    with pytest.raises(lorakit.LorakitError, match=words):
        lorakit.merge(tmp_path / "base", adapter, tmp_path / "merged", **kwargs)
    assert not (tmp_path / "merged").exists()


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path):
    adapter = make_adapter("bert", tmp_path, dict(r=4))
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    with pytest.raises(lorakit.LorakitError, match="--force"):
        lorakit.merge(tmp_path / "base", adapter, tmp_path / "merged")
    assert (tmp_path / "merged" / "keep.txt").read_text() == "mine"
    lorakit.merge(tmp_path / "base", adapter, tmp_path / "merged", force=True)
    assert not (tmp_path / "merged" / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_adapter_for_another_base_is_refused(tmp_path):
    adapter = make_adapter("llama", tmp_path / "a", dict(r=4, targets="attention"))
    build("bert").save_pretrained(tmp_path / "bert")
    with pytest.raises(lorakit.LorakitError, match="trained on a llama model, but the base is a bert"):
        lorakit.merge(tmp_path / "bert", adapter, tmp_path / "merged")
    wider = tmp_path / "b" / "base"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100)).save_pretrained(wider)
    with pytest.raises(lorakit.LorakitError, match="shape"):
        lorakit.merge(wider, adapter, tmp_path / "merged2", verify=False)


def test_incompatible_targets_and_corrupt_files(tmp_path):
    first = make_adapter("llama", tmp_path, dict(r=4, targets="attention"), seed=1)
    other = make_adapter("llama", tmp_path, dict(r=4, targets="mlp"), seed=2)
    with pytest.raises(lorakit.LorakitError, match="adapt different modules"):
        lorakit.merge(tmp_path / "base", [first, other], tmp_path / "merged", method="cat")
    file = first / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:200])
    with pytest.raises(lorakit.LorakitError, match="truncated"):
        lorakit.merge(tmp_path / "base", first, tmp_path / "merged")
    (first / "lorakit_manifest.json").unlink()  # a plain peft adapter: safetensors itself must notice
    with pytest.raises(lorakit.LorakitError, match="corrupt or truncated"):
        lorakit.merge(tmp_path / "base", first, tmp_path / "merged")


def test_nan_in_adapter_fails_and_names_the_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = make_adapter("bert", tmp_path, dict(r=4))
    (adapter / "lorakit_manifest.json").unlink()
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight"
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(lorakit.LorakitError, match=r"encoder\.layer\.1\.attention\.self\.value.*NaN"):
        lorakit.merge(tmp_path / "base", adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_killed_merge_leaves_no_output(tmp_path):
    adapter = make_adapter("llama", tmp_path, dict(r=4, targets="all-linear"))
    code = f"""
import os, signal, sys
import safetensors.torch as st
real = st.save_file
calls = []
def dying(*a, **k):
    calls.append(1)
    if len(calls) == 2:  # one shard written, the second on its way
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, **k)
st.save_file = dying
import lorakit
import lorakit.deploy.shard_writer
lorakit.deploy.shard_writer.OUTPUT_SHARD_BYTES = 4000  # several output shards, so the kill lands between two
lorakit.merge({str(tmp_path / 'base')!r}, {str(adapter)!r}, {str(tmp_path / 'merged')!r})
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert not (tmp_path / "merged").exists()


def test_cli_merge_and_its_errors(tmp_path, capsys):
    from lorakit.cli import main

    adapter = make_adapter("bert", tmp_path, dict(r=4))
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(adapter), "--out",
                 str(tmp_path / "m")]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(adapter), "--out",
                 str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and "Traceback" not in err
    assert main(["merge", "--adapter", str(adapter), "--adapter", str(adapter), "--weights", "1", "--out",
                 str(tmp_path / "n")]) == 2


@pytest.mark.parametrize("lora,path", [(dict(r=4, bias="all"), "streamed"), (dict(r=4, bias="lora_only"), "streamed"),
                                       (dict(r=4, use_dora=True, bias="all"), "peft")])
def test_trained_biases_and_dora_merge_into_the_base_names(lora, path, tmp_path):
    from safetensors.torch import load_file

    build("bert").save_pretrained(tmp_path / "base", max_shard_size="5KB")
    model = look_trained(lorakit.wrap(lorakit.load(tmp_path / "base"), lora=lora), 0.1,
                         also=lambda name, param: name.endswith(".bias") and param.requires_grad)
    model.save_pretrained(tmp_path / "adapter")
    save_extras(model, tmp_path / "adapter")
    report = lorakit.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert report["path"].startswith(path) and report["verification"]["max_abs_logit_difference"] <= 1e-4
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    trained = saved["base_model.model.bert.encoder.layer.1.attention.self.query.base_layer.bias"]
    merged = lorakit.load(tmp_path / "merged").state_dict()
    assert torch.equal(merged["bert.encoder.layer.1.attention.self.query.bias"], trained)
    assert not any("base_layer" in k for k in merged)
