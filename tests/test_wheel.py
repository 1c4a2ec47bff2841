"""What `pip install` gives a user, not a checkout: a wheel built from this tree, installed (not editable) into a
fresh virtual environment, carries its package data (the zoo, the llama.cpp probe's source, the pre-tokenizer
table), and the command runs from it."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def source_tree(folder: Path) -> Path:
    """The files git would ship (tracked, or new and not ignored), copied: no egg-info or build/ of an earlier
    install, whose file lists setuptools would reuse (and so find data that pyproject.toml no longer names)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split("\n")
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    return folder


@pytest.mark.slow
def test_an_installed_wheel_carries_its_data_and_runs(tmp_path):
    source = source_tree(tmp_path / "source")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("lorakit-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True, timeout=120)
    python = tmp_path / "venv" / "bin" / "python"
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip())
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                                str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    # torch, transformers and the rest come from this environment, after the wheel: its lorakit is the one found
    (target / "zz-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    code = ("import lorakit, adapters_zoo, pathlib; print(pathlib.Path(lorakit.__file__).parent); "
            "print(pathlib.Path(adapters_zoo.__file__).parent)")
    where = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    package, zoo = (Path(line) for line in where.stdout.split())
    assert package == target / "lorakit" and zoo == target / "adapters_zoo"
    assert (package / "gguf" / "llama_cpp_probe.cpp").is_file() and (package / "gguf" / "pre_tokenizers.json").is_file()
    assert (package / "spec" / "vllm_embedding_lora.json").is_file()  # check --serve vllm reads it
    assert (package / "deploy" / "vllm_worker.py").is_file() and (package / "deploy" / "vllm_env.py").is_file()
    assert (zoo / "architectures.toml").is_file() and list((zoo / "presets").glob("*.toml"))
    for argv in (["compare-parameters", "meta-llama/Llama-3.1-8B"], ["zoo"]):
        done = subprocess.run([str(python), "-m", "lorakit", *argv], capture_output=True, text=True, cwd=tmp_path,
                              timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Llama-3.1-8B" in done.stdout if argv[0] == "compare-parameters" else "llama" in done.stdout
