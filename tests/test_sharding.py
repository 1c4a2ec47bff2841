"""LoraTrainer sharded with FSDP2 and DeepSpeed ZeRO-2/3 across 2 CPU processes (gloo), LoRA and QLoRA.

Each sharded run is checked to be what it claims (DTensor parameters, a DeepSpeed engine: accelerate turns
FSDP into DDP on CPU without a word, and a DDP run would match one process just as well), then against one
process on the same global batch: the checkpoint at step 2 (sharded training = one process), and the final
adapter of a run interrupted at step 2 and resumed (resume = the uninterrupted run; without the optimizer
state it differs by ~1e-2). The final adapter is read back with plain peft.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit import sharding

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from shard_train import build_model, zero  # noqa: E402
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
ADAPTERS = ("lora", "qlora")
QUANTIZED_LINEARS = 2 * 6  # 2 BERT layers x (query, key, value, attention output, intermediate, output)
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install 'lorakit[deepspeed]')")


def launch(out: Path, mode: str, *extra: str, port: int = 29535) -> dict:
    if mode == "single":
        command = [sys.executable, str(HERE / "shard_train.py"), str(out), mode, "8", *extra]
    else:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        command = [torchrun, "--nproc_per_node=2", f"--master_port={port}", str(HERE / "shard_train.py"),
                   str(out), mode, "4", *extra]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("SEEN "))[5:])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    seen = launch(out, "single")
    assert seen["lora"]["dtensors"] == seen["lora"]["zero3_params"] == 0
    return out


def adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same(one: Path, two: Path) -> None:
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), (name, (a[name] - b[name]).abs().max())
    assert all(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # training moved B off its zero init


def assert_loads_in_peft(folder: Path) -> None:
    from peft import PeftModel, get_peft_model_state_dict

    model = PeftModel.from_pretrained(build_model(), str(folder))
    loaded, saved = get_peft_model_state_dict(model), adapter(folder)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def check_sharded(one: Path, out: Path, mode: str, really_sharded, resume: bool = True) -> dict:
    extra = ("--stop-after", "2") if resume else ("--adapters", "lora,unused")
    seen = launch(out, mode, *extra)
    if resume:
        assert not (out / "lora" / "final").exists()
        assert launch(out, mode, "--resume") == seen
    for name in ADAPTERS if "qlora" in seen else ("lora",):
        assert really_sharded(seen[name]), seen[name]
        assert seen[name]["linear4bit"] == (QUANTIZED_LINEARS if name == "qlora" else 0)
        assert_same(one / name / "checkpoint-2", out / name / "checkpoint-2")
        assert_same(one / name / "final", out / name / "final")
        checkpoint = out / name / "checkpoint-2"
        assert not list(checkpoint.glob("pytorch_model*")), "the base is not saved in an adapter checkpoint"
        lorakit.load_adapter(build_model(), checkpoint)  # its manifest's hashes and base check out
    assert_loads_in_peft(out / "qlora" / "final" if "qlora" in seen else out / "lora" / "final")
    return seen


@pytest.mark.slow
def test_fsdp2_lora_and_qlora_shard_match_one_process_and_resume(one_process, tmp_path):
    check_sharded(one_process, tmp_path, "fsdp", lambda s: s["dtensors"] == s["parameters"]
                  and s["engine"].startswith("FSDP"))


@pytest.mark.slow
@needs_deepspeed
def test_zero3_lora_and_qlora_shard_match_one_process_and_resume(one_process, tmp_path):
    check_sharded(one_process, tmp_path, "zero3", lambda s: s["zero3_params"] == s["parameters"]
                  and s["engine"] == "DeepSpeedEngine")


@pytest.mark.slow
@needs_deepspeed
def test_zero2_lora_matches_one_process_and_a_layer_without_gradient_is_named(one_process, tmp_path):
    seen = check_sharded(one_process, tmp_path, "zero2", lambda s: s["engine"] == "DeepSpeedEngine"
                         and s["zero3_params"] == 0, resume=False)
    # DeepSpeed keeps gradients to itself: LoraTrainer's check reads what the first step changed instead
    assert "received no gradient" in seen["unused"]["error"] and "unused.weight" in seen["unused"]["error"]


# ---- what lorakit sets, and refuses, before anything is sharded (one process) ---------------------------

def fsdp_args(tmp_path, **config):
    return lorakit.training_args(str(tmp_path), use_cpu=True, fsdp=True,
                                 fsdp_config={"transformer_layer_cls_to_wrap": ["BertLayer"], **config})


def test_sharded_4bit_storage_is_the_compute_dtype_and_a_conflict_is_refused(tmp_path):
    fsdp, zero2 = fsdp_args(tmp_path), lorakit.training_args(str(tmp_path), use_cpu=True, **zero(2))
    assert sharding.quant_for("4bit", fsdp, build_model()).quant_storage == "float32"
    assert sharding.quant_for("4bit", zero2, build_model()).quant_storage is None  # ZeRO-2 keeps weights whole
    with pytest.raises(lorakit.LorakitError, match="quant_storage is uint8"):
        lorakit.LoraTrainer(model=build_model(), args=fsdp, lora=lorakit.Lora(r=4),
                            quant=lorakit.Quant(bits=4, quant_storage="uint8"))
    quantized = lorakit.wrap(build_model(), lora=lorakit.Lora(r=4), quant="4bit")  # uint8, bitsandbytes' default
    with pytest.raises(lorakit.LorakitError, match="stores its packed weights as uint8") as error:
        lorakit.LoraTrainer(model=quantized, args=fsdp)
    assert "quant_storage='float32'" in error.value.hint
    with pytest.raises(lorakit.LorakitError, match="FSDP version 1"):
        sharding.kind(fsdp_args(tmp_path, version=1))
