"""The memory simulator's speed, where users meet it: against a bare meta build of the same model.

A (baseline): a fresh Python that imports transformers and builds the bundled config on the meta device.
B: `lorakit compare-parameters MODEL --batch-size 1 --seq-len 2048 --gradient-checkpointing` (LoRA as the
llama preset sets it: r=16 on every linear layer; the full per-layer table and a simulated training step).
Targets: B/A wall time <= 2 for Llama-3.1-8B and for Llama-3.1-70B. Also `lorakit fit` for 8B on a 24 GiB
GPU at sequence 2048 (six simulated configurations, each bisected to its largest batch): <= 30 s, wall time
alone, since no bare counterpart exists.

    python -m benchmarks.simulate_speed [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import alternate, bare_meta_build, python_code, run_measured, save

CONFIGS = Path(__file__).parent.parent / "adapters_zoo" / "configs"
MODELS = {"llama-3.1-8b": "meta-llama/Llama-3.1-8B", "llama-3.1-70b": "meta-llama/Llama-3.1-70B"}


def cli(args: list[str]) -> list[str]:
    return python_code(f"import sys\nfrom lorakit.cli.commands import main\nrc = main({args!r})\nsys.stdout.flush()\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    figures: dict = {}
    for key, model_id in MODELS.items():
        simulated = cli(["compare-parameters", model_id, "--batch-size", "1", "--seq-len", "2048",
                         "--gradient-checkpointing"])
        figures[key] = alternate(python_code(bare_meta_build(CONFIGS / (model_id.replace("/", "--") + ".json"))),
                                 simulated, repeats=args.repeats, env=env)
        print(f"{model_id}: bare meta build {figures[key]['a_wall_s']:.2f} s, compare-parameters with a simulated "
              f"step {figures[key]['b_wall_s']:.2f} s, ratio {figures[key]['wall_ratio']:.2f} (target <= 2)")
    fit_argv = cli(["fit", MODELS["llama-3.1-8b"], "--gpu-memory", "24GiB", "--seq-len", "2048"])
    times = sorted(run_measured(fit_argv, env)[0] for _ in range(args.repeats))
    figures["fit_llama-3.1-8b_wall_s"] = times[len(times) // 2]
    print(f"lorakit fit Llama-3.1-8B, 24 GiB, sequence 2048: {figures['fit_llama-3.1-8b_wall_s']:.1f} s "
          "(median; target <= 30 s)")
    figures["targets"] = {"wall_ratio": 2.0, "fit_wall_s": 30.0}
    path = save("cpu", "simulate_speed", figures)
    print(f"-> {path}")
    return figures


if __name__ == "__main__":
    main()
