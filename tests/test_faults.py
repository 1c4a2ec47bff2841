"""Fault injection: every public entry point through one matrix of bad inputs and faults.

Inputs that are missing, empty, truncated, garbage or of the wrong type; non-finite numbers; an output
that exists, is a folder, cannot be written, or is also an input; kill -9 at random moments (in
tests/kill_writer.py). A library call must raise a LorakitError; a CLI call must print one `error:` line
and a hint, exit 1 or 2, and show no traceback; and nothing the user had may change.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.adapter.format import save_extras
from lorakit.cli import main

HERE = Path(__file__).parent


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A saved base, an adapter of it, and a run with two sealed checkpoints."""
    root = tmp_path_factory.mktemp("assets")
    tiny_llama().save_pretrained(root / "base")
    model = lorakit.wrap(lorakit.load(root / "base"), lora=lorakit.Lora(r=2))
    model.save_pretrained(root / "adapter")
    save_extras(model, root / "adapter")
    data = [{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}] * 8
    args = lorakit.training_args(str(root / "run"), max_steps=2, per_device_train_batch_size=4, save_strategy="steps",
                                 save_steps=1, eval_strategy="no", use_cpu=True, disable_tqdm=True)
    lorakit.LoraTrainer(model=tiny_llama(), args=args, train_dataset=data, lora=lorakit.Lora(r=2)).train()
    return root


def copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": b"\x00garbage" * 64}[how])


def cli_status(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(argv)
    return status, err.getvalue()


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def read_only_folder(tmp_path: Path) -> Path:
    """A folder nobody can write: a chmod-ed one, except for root, for whom permissions do not bind (sysfs)."""
    if os.geteuid() == 0:
        return Path("/sys/kernel")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


# ---- inputs: missing, empty, truncated, garbage, wrong type, non-finite ------------------------------

@pytest.mark.parametrize("how", ["empty", "truncated", "garbage"])
def test_load_refuses_damaged_weights(assets, tmp_path, how):
    base = copy(assets / "base", tmp_path / "base")
    damage(base / "model.safetensors", how)
    with pytest.raises(lorakit.LorakitError, match="corrupt or truncated"):
        lorakit.load(base)


def with_config(folder: Path, text: str) -> Path:
    (folder / "config.json").write_text(text)
    return folder


@pytest.mark.parametrize("make,match", [
    (lambda d: d, "no config.json"),                                           # empty folder
    (lambda d: d / "missing", "not a model directory"),                        # missing
    (lambda d: with_config(d, "{not json"), "cannot build a config"),          # garbage config
    (lambda d: with_config(d, json.dumps({"model_type": "llama", "hidden_size": -4, "num_attention_heads": 2,
                                          "architectures": ["LlamaForCausalLM"]})), "cannot build"),  # negative size
])
def test_load_and_report_refuse_bad_model_folders(tmp_path, make, match):
    folder = make(tmp_path)
    with pytest.raises(lorakit.LorakitError):
        lorakit.load(folder)
    with pytest.raises(lorakit.LorakitError, match=match):
        lorakit.report(folder)
    status, err = cli_status(["compare-parameters", str(folder)])
    assert status == 2 and err.startswith("error: ") and "Traceback" not in err


def test_load_refuses_a_pickle_only_base(assets, tmp_path):
    base = copy(assets / "base", tmp_path / "base")
    torch.save({}, base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    with pytest.raises(lorakit.ModelNotFoundError, match="safetensors"):
        lorakit.load(base)


@pytest.mark.parametrize("spec", [
    lambda: lorakit.Lora(alpha=float("inf")), lambda: lorakit.Lora(alpha=float("nan")),
    lambda: lorakit.Lora(dropout=float("nan")), lambda: lorakit.Lora(alpha_pattern={"q_proj": float("inf")}),
    lambda: lorakit.Lora(r=0), lambda: lorakit.Lora.coerce("eight"), lambda: lorakit.Freeze.coerce({"bogus": 1}),
    lambda: lorakit.Freeze.coerce(3.5), lambda: lorakit.Quant.coerce("3bit"),
    lambda: lorakit.wrap("not a model", lora=4), lambda: lorakit.wrap(tiny_llama()),
    lambda: lorakit.report(tiny_llama(), lora=4, optimizer="adam"),
])
def test_specs_refuse_non_finite_and_wrong_types(spec):
    with pytest.raises(lorakit.LorakitError):
        spec()


@pytest.mark.parametrize("fault", ["missing", "truncated", "garbage", "pickle"])
def test_load_adapter_and_merge_refuse_damaged_adapters(assets, tmp_path, fault):
    adapter = copy(assets / "adapter", tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    if fault == "missing":
        adapter = tmp_path / "nothing"
    elif fault == "pickle":
        torch.save({}, adapter / "adapter_model.bin")
        weights.unlink()
    else:
        damage(weights, fault)
    with pytest.raises(lorakit.LorakitError):
        lorakit.load_adapter(lorakit.load(assets / "base"), adapter)
    with pytest.raises(lorakit.LorakitError):
        lorakit.merge(assets / "base", adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_refuses_a_pickle_only_base(assets, tmp_path):
    base = copy(assets / "base", tmp_path / "base")
    torch.save({}, base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    with pytest.raises(lorakit.LorakitError, match="safetensors"):
        lorakit.merge(base, assets / "adapter", tmp_path / "out", verify=False)


@pytest.mark.parametrize("damaged", ["optimizer.pt", "trainer_state.json", "adapter_model.safetensors",
                                     "lorakit_checkpoint.json"])
def test_resume_names_the_damaged_file_and_the_checkpoint_before(assets, tmp_path, damaged):
    run = copy(assets / "run", tmp_path / "run")
    damage(run / "checkpoint-2" / damaged, "truncated")
    args = lorakit.training_args(str(run), max_steps=4, per_device_train_batch_size=4, save_strategy="steps",
                                 save_steps=1, eval_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = lorakit.LoraTrainer(model=tiny_llama(), args=args, lora=lorakit.Lora(r=2),
                                  train_dataset=[{"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4]}] * 8)
    with pytest.raises(lorakit.LorakitError) as caught:
        trainer.train(resume_from_checkpoint=True)
    message = str(caught.value)
    assert "checkpoint-2" in message and "checkpoint-1" in message
    assert damaged in message or "lorakit_checkpoint.json" in message


# ---- outputs: exists, is a folder, read-only, is an input -------------------------------------------

def cli(capsys, *argv) -> tuple[int, str]:
    status = main(list(argv))
    err = capsys.readouterr().err
    return status, err


def assert_one_clean_error(status: int, err: str) -> None:
    assert status in (1, 2), err
    assert err.startswith("error: ") and "Traceback" not in err and "\nhint: " in err, err


@pytest.mark.parametrize("output", ["existing-file", "existing-folder-forced", "read-only", "no-folder"])
def test_compare_parameters_output_faults(tmp_path, capsys, output):
    target = {"existing-file": tmp_path / "r.json", "existing-folder-forced": tmp_path,
              "read-only": read_only_folder(tmp_path) / "r.json", "no-folder": tmp_path / "no" / "r.json"}[output]
    if output == "existing-file":
        target.write_text("keep me")
    extra = ["--force"] if output == "existing-folder-forced" else []
    status, err = cli(capsys, "compare-parameters", "gpt2", "--format", "json", "--output", str(target), *extra)
    assert_one_clean_error(status, err)
    if output == "existing-file":
        assert target.read_text() == "keep me"


@pytest.mark.parametrize("where", ["the base", "inside the base", "the adapter", "containing the adapter"])
def test_merge_refuses_an_output_that_overlaps_an_input_even_with_force(assets, tmp_path, capsys, where):
    base, adapter = copy(assets / "base", tmp_path / "base"), copy(assets / "adapter", tmp_path / "a" / "adapter")
    before = tree_digest(tmp_path)
    out = {"the base": base, "inside the base": base / "merged", "the adapter": adapter,
           "containing the adapter": tmp_path / "a"}[where]
    status, err = cli(capsys, "merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "--force")
    assert_one_clean_error(status, err)
    assert "overlaps" in err and tree_digest(tmp_path) == before


def test_merge_into_a_read_only_folder_is_one_error_line(assets, tmp_path, capsys):
    out = read_only_folder(tmp_path) / "merged"
    status, err = cli(capsys, "merge", "--base", str(assets / "base"), "--adapter", str(assets / "adapter"),
                      "--out", str(out))
    assert_one_clean_error(status, err)


def test_an_unexpected_exception_is_one_line_and_debug_shows_it(capsys, monkeypatch):
    import lorakit.cli.commands as cli_module

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli_module, "cmd_zoo", broken)  # build_parser binds subcommands when main() runs
    status, err = cli(capsys, "zoo")
    assert status == 1 and err.startswith("error: unexpected ZeroDivisionError: a bug") and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "zoo"])


# ---- kill -9 ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("writer", ["trainer", "merge"])
def test_kill_nine_at_random_moments_leaves_only_complete_outputs(tmp_path, writer):
    done = subprocess.run([sys.executable, str(HERE / "kill_writer.py"), writer, str(tmp_path), "14", "0"],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "RESULT " in done.stdout, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["killed"] >= 10, result
    assert result["problems"] == [] and result["finished"] and result["leftovers"] == [], result
