"""LoraTrainer unchanged under torchrun: 2 CPU processes (gloo) match one process on the same global batch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


@pytest.mark.slow
def test_two_process_ddp_equals_single_process(tmp_path):
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    single = subprocess.run([sys.executable, str(HERE / "ddp_train.py"), str(tmp_path / "one"), "8"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    ddp = subprocess.run([torchrun, "--nproc_per_node=2", "--master_port=29533", str(HERE / "ddp_train.py"),
                          str(tmp_path / "two"), "4"], env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "WORLD 2" in ddp.stdout and "WORLD 1" in single.stdout
    one, two = load_file(str(tmp_path / "one" / "trained.safetensors")), load_file(
        str(tmp_path / "two" / "trained.safetensors"))
    assert one.keys() == two.keys() and any("lora_B" in k for k in one)
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5), name
    # and training moved them: B left zero, head left its init
    assert all(one[n].abs().sum() > 0 for n in one if "lora_B" in n)
