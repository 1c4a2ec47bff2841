"""Helpers shared by the benchmarks: run a command in a fresh process and read its wall time and peak RSS."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from lorakit.adapter.format import versions
from lorakit.core.files import write_json_atomic

RESULTS = Path(__file__).parent / "results"


# A child's ru_maxrss starts from its parent's high-water mark at fork (Linux keeps it across
# exec), so a benchmark whose parent holds a model would see that model in every child. VmHWM
# belongs to the new address space that exec creates: read it inside the child at exit.
PEAK = ("import atexit, sys\n"
        "def _peak():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            sys.stderr.write(f'PEAK_RSS_KB {line.split()[1]}\\n')\n"
        "atexit.register(_peak)\n")


def peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM), not counting what a parent held before exec."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def python_code(code: str) -> list[str]:
    """argv running `code` in a fresh Python that reports its own peak RSS."""
    return [sys.executable, "-c", PEAK + code]


def run_measured(argv: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one fresh process started with `python_code`."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wall = time.perf_counter() - start
    err = done.stderr.decode()
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed: {err[-2000:]}")
    peak = [int(line.split()[1]) for line in err.splitlines() if line.startswith("PEAK_RSS_KB")]
    return wall, peak[-1] * 1024


def alternate(a: list[str], b: list[str], repeats: int, warmup: int = 1, env: dict | None = None) -> dict:
    """Run A and B alternately; report medians and the B/A ratios."""
    for _ in range(warmup):
        run_measured(a, env), run_measured(b, env)
    runs_a, runs_b = [], []
    for _ in range(repeats):
        runs_a.append(run_measured(a, env))
        runs_b.append(run_measured(b, env))
    med = {k: (statistics.median(t for t, _ in v), statistics.median(m for _, m in v))
           for k, v in (("a", runs_a), ("b", runs_b))}
    return {"repeats": repeats, "a_wall_s": med["a"][0], "b_wall_s": med["b"][0],
            "a_peak_rss_bytes": med["a"][1], "b_peak_rss_bytes": med["b"][1],
            "wall_ratio": med["b"][0] / med["a"][0], "peak_rss_ratio": med["b"][1] / med["a"][1]}


def environment() -> dict:
    return {"date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": sys.version.split()[0], "versions": versions()}


def save(device: str, key: str, figures: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{device}.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["environment"] = environment()
    data[key] = figures
    write_json_atomic(path, data)
    return path


def bare_meta_build(config_path: Path) -> str:
    """Python code for the baseline of a compare-parameters figure: import transformers, build a bundled config
    on the meta device, sum its parameters."""
    return f"""
import json, torch, transformers
data = json.load(open({str(config_path)!r}))
data["dtype"] = data.pop("torch_dtype")
config = transformers.AutoConfig.for_model(**data)
with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(config)
print(sum(p.numel() for p in model.parameters()))
"""
