"""The memory picture: device memory over the ops of one simulated training step, stacked by kind.

What is drawn is the simulator's own record (`Simulation.timeline`, from `stepping.timeline`): the bytes live
after each allocation and free of the step with the peak, split as the peak's breakdown splits them (weights,
gradients, optimizer state, saved activations, temporaries, cuBLAS workspace). The peak is marked with its
phase and module; `gpu_memory` draws the GPU's capacity beside what the process would hold (reserved + CUDA
context, the figure to compare with it). matplotlib is imported here, when a picture is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import LorakitError
from ..core.files import atomic_path, refuse_existing

COLORS = {"weights": "#4c6ef5", "gradients": "#f59f00", "optimizer state": "#ae3ec9",
          "activations": "#2f9e44", "temporaries": "#adb5bd", "workspace": "#495057"}
LABELS = {"activations": "saved activations", "workspace": "cuBLAS workspace"}
SUFFIXES = (".png", ".svg")


def check_path(path: str, force: bool) -> None:
    """Refuse a path the picture cannot be written to, before anything is simulated."""
    if Path(path).suffix.lower() not in SUFFIXES:
        raise LorakitError(f"memory plot {path}: unknown image type", hint="end the name in .png or .svg")
    refuse_existing(path, force)


def series(sim: Any) -> dict:
    """The drawn data, in bytes: event positions, bytes by kind at each, their total, and the peak's position."""
    line = sim.timeline
    if line is None:
        raise LorakitError("this simulation has no timeline of its step: it was worked out from runs with 2 and 3 "
                           "blocks of the model", hint="simulate(..., extrapolate=False) records every block")
    total = [sum(b) for b in line["bytes"]]
    return {"events": line["events"], "kinds": line["kinds"],
            "bytes": {k: [b[i] for b in line["bytes"]] for i, k in enumerate(line["kinds"])},
            "total": total, "peak_event": line["peak_event"],
            "peak_total": total[line["events"].index(line["peak_event"])], "phases": line["phases"],
            "step": line["step"]}


def memory_plot(sim: Any, path: str, gpu_memory: int | None = None, force: bool = False) -> None:
    """Draw `sim` (a `lorakit.cost.simulate.Simulation`) to `path` (.png or .svg), written atomically."""
    check_path(path, force)
    data = series(sim)
    try:
        import matplotlib

        matplotlib.use("Agg")
        matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text in an SVG: searchable, smaller
        import matplotlib.pyplot as plt
    except ImportError:
        raise LorakitError("the memory plot needs matplotlib, which is not installed",
                           hint="pip install 'lorakit[plot]' (or pip install matplotlib)") from None
    top = max(data["peak_total"], sim.device_total, gpu_memory or 0)
    unit, scale = ("GiB", 2**30) if top >= 2**30 else ("MiB", 2**20)
    fig, ax = plt.subplots(figsize=(11.5, 5))
    kinds = [k for k in data["kinds"] if any(data["bytes"][k])]
    ax.stackplot(data["events"], *[[b / scale for b in data["bytes"][k]] for k in kinds],
                 labels=[LABELS.get(k, k) for k in kinds], colors=[COLORS[k] for k in kinds], alpha=0.9, linewidth=0)
    for phase, start in data["phases"]:
        ax.axvline(start, color="black", linewidth=0.6, linestyle=":", zorder=0)
        ax.annotate(phase, (start, 1), xycoords=("data", "axes fraction"), xytext=(3, -12),
                    textcoords="offset points", fontsize=8)
    peak = data["peak_total"] / scale
    ax.plot([data["peak_event"]], [peak], marker="v", color="#c92a2a", markersize=8)
    where = f"step {data['step']} {sim.peak_phase}" + (f", {sim.peak_module}" if sim.peak_module else "")
    ax.annotate(f"peak {peak:.2f} {unit} allocated\n{where}", (data["peak_event"], peak), xytext=(0, 14),
                textcoords="offset points", ha="center", fontsize=8, color="#c92a2a",
                bbox=dict(boxstyle="round,pad=0.2", facecolor="white", edgecolor="none", alpha=0.85))
    ax.axhline(sim.device_total / scale, color="#495057", linewidth=1, linestyle="--",
               label=f"reserved + CUDA context at most: {sim.device_total / scale:.2f} {unit}")
    if gpu_memory:
        ax.axhline(gpu_memory / scale, color="#c92a2a", linewidth=1.5,
                   label=f"GPU memory: {gpu_memory / scale:.2f} {unit}")
    ax.set_ylim(0, top / scale * 1.12)
    ax.set_xlim(0, max(data["events"][-1], 1))
    ax.set_xlabel(f"allocations and frees of training step {data['step']}, in order")
    ax.set_ylabel(f"device memory ({unit})")
    settings = sim.settings
    ax.set_title(f"{sim.model}: one training step, simulated (batch {settings.get('batch_size')}, sequence "
                 f"{settings.get('seq_len')}, checkpointing {'on' if settings.get('gradient_checkpointing') else 'off'}, "
                 f"{settings.get('attn')})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)
