"""What the command shows: the memory picture of a simulated step, `--version`, and nothing but its own lines.

The picture's data is checked against the simulator's peak reached by another road: compare-parameters
reports the peak of a model of identical blocks worked out from runs with 2 and 3 of them, the picture is
drawn from a run of every block, and the drawn maximum must be that peak to the byte. The files are read
back by their own readers (matplotlib's PNG reader, an XML parser).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from conftest import build

import lorakit
from lorakit.cli import main
from lorakit.cost.plot import series
from lorakit.cost.simulate import simulate

ROOT = Path(__file__).parents[2]


@pytest.fixture
def llama_config(tmp_path) -> Path:
    """A config-only folder of a tiny Llama with 5 identical blocks (so the report extrapolates)."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=256).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


def test_the_memory_plot_draws_the_reported_peak(llama_config, tmp_path, capsys):
    import matplotlib.image

    picture = tmp_path / "step.png"
    assert main(["compare-parameters", str(llama_config), "--batch-size", "1", "--seq-len", "32",
                 "--gradient-checkpointing", "--memory-plot", str(picture), "--gpu-memory", "1GiB",
                 "--format", "json"]) == 0
    out = capsys.readouterr()
    reported = json.loads(out.out)["simulation"]
    assert reported["settings"]["extrapolated_from_blocks"] == [2, 3]
    assert out.err == f"wrote {picture}\n"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(picture).ndim == 3

    full = simulate(str(llama_config), lora=lorakit.Lora(), batch_size=1, seq_len=32, gradient_checkpointing=True,
                    extrapolate=False)  # the command's spec: LoRA with the preset's defaults
    drawn = series(full)
    assert max(drawn["total"]) == drawn["peak_total"] == reported["peak_allocated"]
    at_peak = drawn["events"].index(drawn["peak_event"])
    assert {k: drawn["bytes"][k][at_peak] for k in drawn["kinds"]} == reported["breakdown"]
    assert [phase for phase, _ in drawn["phases"]] == ["forward", "backward", "optimizer"]
    assert drawn["step"] == reported["peak_step"]

    assert main(["compare-parameters", str(llama_config), "--batch-size", "1", "--seq-len", "32",
                 "--memory-plot", str(picture)]) == 2  # an existing picture is kept without --force
    assert "--force" in capsys.readouterr().err


def test_the_svg_names_the_peak_and_refuses_an_extrapolated_run(llama_config, tmp_path):
    sim = simulate(str(llama_config), batch_size=1, seq_len=32, extrapolate=False)
    sim.plot(str(tmp_path / "step.svg"), gpu_memory=2 << 30)
    texts = " ".join(t for t in ET.parse(tmp_path / "step.svg").getroot().itertext())
    assert f"step {sim.peak_step} {sim.peak_phase}" in texts and "GPU memory: 2.00 GiB" in texts
    with pytest.raises(lorakit.LorakitError, match="extrapolate=False"):
        simulate(str(llama_config), batch_size=1, seq_len=32).plot(str(tmp_path / "other.svg"))
    with pytest.raises(lorakit.LorakitError, match="image type"):
        sim.plot(str(tmp_path / "step.jpg"))


def test_version_is_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert capsys.readouterr().out == f"lorakit {version}\n"


def test_merge_prints_its_own_lines_only(tmp_path, capsys):
    """transformers draws a "Loading weights" bar for every model it loads (merge loads three)."""
    build("llama").save_pretrained(tmp_path / "base")
    lorakit.wrap(lorakit.load(tmp_path / "base"), lora=dict(r=4)).save_pretrained(tmp_path / "adapter")
    capsys.readouterr()
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "merged")]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    # its own lines: what it wrote, then both checks (tensor by tensor, and the logits on a model this small)
    assert [line.split()[0] for line in out.out.splitlines()] == ["wrote", "verified:", "verified:"]


def test_deepspeeds_stdout_notice_is_kept_out():
    """accelerate imports DeepSpeed where it is installed, and DeepSpeed prints a notice to stdout (not a
    warning, not stderr) on its first accelerator lookup: in a fresh process, as a user's command meets it."""
    pytest.importorskip("deepspeed")
    code = ("from lorakit.cli.console import quiet\nwith quiet(True):\n    from deepspeed.accelerator import "
            "get_accelerator\n    get_accelerator()\nprint('done')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert (done.returncode, done.stdout, done.stderr) == (0, "done\n", "")


# A user's first command imports transformers, bitsandbytes and DeepSpeed fresh, and each may print a notice on
# import or on first use (bitsandbytes' kernels lookup, DeepSpeed's accelerator): only a fresh process shows them.
FRESH_COMMANDS = {
    "fit": ["fit", "gpt2", "--gpu-memory", "8GiB", "--seq-len", "128", "--method", "qlora"],
    "compare-parameters": ["compare-parameters", "meta-llama/Llama-3.1-8B", "--quant", "4bit", "--by", "kind",
                           "--batch-size", "1", "--seq-len", "64"],
}
WRAP = """
import sys, lorakit
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from transformers.utils import logging
model = lorakit.load(sys.argv[1], quant="4bit")
print(lorakit.report(lorakit.wrap(model, lora=lorakit.Lora(r=4))).total.trainable_parameters)
logging.disable_progress_bar()  # the user's own from_pretrained below: its bar is theirs, not lorakit's
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=BitsAndBytesConfig(load_in_4bit=True))
print(lorakit.report(lorakit.wrap(model, lora=lorakit.Lora(r=4))).total.trainable_parameters)
"""


def fresh(arguments: list[str]) -> subprocess.CompletedProcess:
    """A new process, offline as our machines are (the Hub switched off is where bitsandbytes' notice shows)."""
    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"))


@pytest.mark.parametrize("command", list(FRESH_COMMANDS))
def test_a_fresh_command_prints_its_own_lines_only(command, capsys):
    argv = FRESH_COMMANDS[command]
    assert main(argv) == 0  # in this process every library is imported already: what lorakit itself writes
    own = capsys.readouterr()
    done = fresh(["-m", "lorakit", *argv])
    assert (done.returncode, done.stdout, done.stderr) == (0, own.out, own.err)


def test_wrap_of_a_model_loaded_in_4_bits_prints_nothing_in_a_fresh_process(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128)).save_pretrained(tmp_path)
    done = fresh(["-c", WRAP, str(tmp_path)])
    # r=4 on q, k, v, o, gate, up, down of 2 blocks: r * (in + out) each (k and v: 2 heads of 16 = 32 outputs)
    layers = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    lora = 2 * sum(4 * (inputs + outputs) for inputs, outputs in layers)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.split() == [str(lora)] * 2
