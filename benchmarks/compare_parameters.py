"""compare-parameters on the bundled Llama-3.1-70B config against the bare minimum.

A (baseline): a fresh Python that imports transformers, builds the same config
on the meta device and sums the parameters. B: `lorakit compare-parameters
meta-llama/Llama-3.1-70B --quant 4bit` (LoRA r=8 on all linear layers, 4-bit
base, full table). Targets: B/A wall time <= 1.3, B peak RSS < 1 GB.

    python -m benchmarks.compare_parameters [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .common import alternate, bare_meta_build, python_code, save

CONFIG = Path(__file__).parent.parent / "adapters_zoo" / "configs" / "meta-llama--Llama-3.1-70B.json"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # the console script's own code path: lorakit.cli.main, as `lorakit compare-parameters` runs it
    cli = ("import sys\nfrom lorakit.cli.commands import main\n"
           "rc = main(['compare-parameters', 'meta-llama/Llama-3.1-70B', '--quant', '4bit'])\n"
           "sys.stdout.flush()\n")
    figures = alternate(python_code(bare_meta_build(CONFIG)), python_code(cli), repeats=args.repeats, env=env)
    figures["targets"] = {"wall_ratio": 1.3, "b_peak_rss_bytes": 1e9}
    path = save("cpu", "compare_parameters_70b", figures)
    print(f"bare meta build {figures['a_wall_s']:.2f} s, lorakit {figures['b_wall_s']:.2f} s, "
          f"ratio {figures['wall_ratio']:.3f}; peak RSS {figures['b_peak_rss_bytes'] / 2**20:.0f} MiB "
          f"(bare {figures['a_peak_rss_bytes'] / 2**20:.0f} MiB) -> {path}")
    return figures


if __name__ == "__main__":
    main()
