"""Renderers of a `Report`: terminal table, JSON, CSV, Markdown, and a plot.

Each takes the same rows; none of them counts anything.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from ..core.errors import LorakitError
from ..spec.zoo import architectures, preset_for_type
from .report import Report, Row

COLUMNS = [  # (header, getter)
    ("layer", lambda r: r.name),
    ("params", lambda r: _count(r.parameters)),
    ("trainable", lambda r: _count(r.trainable_parameters)),
    ("full FT", lambda r: _count(r.full_finetune_trainable_parameters)),
    ("LoRA", lambda r: _count(r.lora_parameters)),
    ("memory", lambda r: _bytes(r.memory_bytes)),
    ("full FT mem", lambda r: _bytes(r.full_finetune_memory_bytes)),
]


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def summary(report: Report) -> list[str]:
    t = report.total
    spec = report.spec
    parts = [f"lora r={spec['lora']['r']}" if spec.get("lora") else "no LoRA"]
    if spec.get("freeze"):
        parts.append("freeze")
    if spec.get("quant"):
        parts.append(f"{spec['quant']['bits']}-bit {spec['quant']['quant_type'] if spec['quant']['bits'] == 4 else ''}"
                     .strip())
    lines = [
        f"trainable: {t.trainable_parameters:,} of {t.parameters:,} parameters "
        f"({100 * report.ratio('trainable_parameters'):.3f}% of full fine-tuning's "
        f"{t.full_finetune_trainable_parameters:,})",
        f"memory ({report.optimizer}): weights {_bytes(t.weight_bytes)} + gradients {_bytes(t.gradient_bytes)} "
        f"+ optimizer {_bytes(t.optimizer_bytes)} = {_bytes(t.memory_bytes)}; "
        f"full fine-tuning {_bytes(t.full_finetune_memory_bytes)} "
        f"(ratio {report.ratio('memory_bytes'):.3f})",
    ]
    if report.activation_bytes is not None:
        lines.append(f"+ activations ~{_bytes(report.activation_bytes)} ({report.activation_note})")
    return [f"{report.model} [{report.dtype}, preset {spec.get('preset')}, {', '.join(parts)}]"] + lines


def table(report: Report) -> str:
    rows = [[get(r) for _, get in COLUMNS] for r in report.rows + [report.total]]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (h, _) in enumerate(COLUMNS)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [line([h for h, _ in COLUMNS]), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in rows[:-1]]
    out += ["  ".join("-" * w for w in widths), line(rows[-1]), ""]
    return "\n".join(out + summary(report)) + "\n"


def markdown(report: Report) -> str:
    header = "| " + " | ".join(h for h, _ in COLUMNS) + " |"
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS))) + "|"
    body = ["| " + " | ".join(get(r) for _, get in COLUMNS) + " |" for r in report.rows]
    total = "| " + " | ".join(f"**{get(report.total)}**" for _, get in COLUMNS) + " |"
    return "\n".join([header, rule, *body, total, "", *summary(report)]) + "\n"


def to_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2) + "\n"


def to_csv(report: Report) -> str:
    buffer = io.StringIO()
    names = list(report.to_dict()["layers"][0])
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in report.to_dict()["layers"]:
        writer.writerow(row)
    return buffer.getvalue()


FORMATS = {"table": table, "json": to_json, "csv": to_csv, "markdown": markdown}


def plot(report: Report, path: str) -> None:
    """Per-layer bar chart, trainable parameters under the spec vs full fine-tuning, log scale."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LorakitError("--plot needs matplotlib, which is not installed",
                           hint="pip install 'lorakit[plot]' (or pip install matplotlib)") from None
    rows: list[Row] = report.rows
    positions = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8.5, 0.32 * len(rows) + 2), 4.8))
    width = 0.42
    ax.bar([p - width / 2 for p in positions], [max(r.full_finetune_trainable_parameters, 0) for r in rows], width,
           label="full fine-tuning", color="#9aa5b1")
    ax.bar([p + width / 2 for p in positions], [r.trainable_parameters for r in rows], width,
           label="this spec", color="#d9480f")
    ax.set_yscale("log")
    for p, row in zip(positions, rows):  # a zero has no bar on a log scale: say it
        if row.trainable_parameters == 0:
            ax.annotate("0", (p + width / 2, 0), xycoords=("data", "axes fraction"), xytext=(0, 2),
                        textcoords="offset points", ha="center", fontsize=7, color="#d9480f")
    ax.set_xticks(list(positions))
    ax.set_xticklabels([r.name for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("trainable parameters (log)")
    ax.set_title(f"{report.model}: trainable parameters per layer", fontsize=10)
    ax.legend(fontsize=8)
    t = report.total
    fig.text(0.01, 0.01,
             f"training memory ({report.optimizer}; weights + gradients + optimizer): this spec "
             f"{_bytes(t.memory_bytes)} vs full fine-tuning {_bytes(t.full_finetune_memory_bytes)} "
             f"(ratio {report.ratio('memory_bytes'):.3f})\ntrainable parameters: {t.trainable_parameters:,} vs "
             f"{t.full_finetune_trainable_parameters:,} ({100 * report.ratio('trainable_parameters'):.2f}%)",
             fontsize=7.5)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ---- the architecture hub's support table ------------------------------------

def _targets_text(preset: Any) -> str:
    targets = preset.recommended.get("targets", "all-linear")
    return targets if isinstance(targets, str) else ", ".join(targets)


def architecture_table() -> str:
    """Markdown: every family of adapters_zoo/architectures.toml, with its preset, its default LoRA targets and
    what it does not support (each row passes tests/test_architectures.py; a limit is tested as a limit)."""
    lines = ["| family | model_type | group | task | preset | default LoRA targets | 4-bit | memory simulator | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in architectures():
        preset, limits = preset_for_type(row["model_type"]), row.get("limits", {})
        notes = "; ".join(f"{check}: {why}" for check, why in limits.items() if check not in ("quant", "simulate"))
        lines.append(f"| {row['name']} | `{row['model_type']}` | {row['group']} | {row['task']} | {preset.name} | "
                     f"{_targets_text(preset)} | {limits.get('quant', 'yes')} | {limits.get('simulate', 'yes')} | "
                     f"{notes} |")
    return "\n".join(lines) + "\n"


def architecture_summary() -> str:
    """Markdown: the hub by group, for the README (the full table is docs/architectures.md)."""
    groups: dict[str, list[dict]] = {}
    for row in architectures():
        groups.setdefault(row["group"], []).append(row)

    def but(rows: list[dict], check: str) -> str:
        missing = [r["name"] for r in rows if check in r.get("limits", {})]
        present = [r["name"] for r in rows if r["name"] not in missing]
        if not missing or not present:
            return "all" if not missing else "none"
        return "all but " + ", ".join(missing) if len(missing) <= len(present) else "only " + ", ".join(present)

    lines = ["| group | families (wrap, train, merge: all) | 4-bit | memory simulator |", "|---|---|---|---|"]
    for group, rows in groups.items():
        lines.append(f"| {group} | {', '.join(r['name'] for r in rows)} | {but(rows, 'quant')} | "
                     f"{but(rows, 'simulate')} |")
    return "\n".join(lines) + "\n"
