"""The benchmark harness: every figure a ratio measured side by side in one run.

    python -m benchmarks                 # all figures, CPU, about 20-25 minutes on 2 cores
    python -m benchmarks --quick         # tiny sizes, a smoke test (seconds)
    python -m benchmarks --device cuda   # the same on a GPU, bf16, with tokens/s

Each configuration runs in a fresh process (benchmarks/worker.py) with the
same seed, data and thread count; A and B processes alternate; each does 3
warm-up steps and the median of all timed steps (>= 20 per side) is reported.
Results: benchmarks/results/<device>.json and the Markdown table printed at
the end (copied into the README's Performance section).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from . import compare_parameters, merge
from .common import environment, save

WORKER = [sys.executable, "-m", "benchmarks.worker"]


def worker(mode: str, size: str, steps: int, device: str, threads: int) -> dict:
    command = WORKER + ["--mode", mode, "--size", size, "--steps", str(steps), "--device", device,
                        "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def side_by_side(a: str, b: str, size: str, runs: int, steps: int, device: str, threads: int) -> dict:
    """A and B alternate, each in fresh processes; medians over all timed steps."""
    results: dict[str, list[dict]] = {a: [], b: []}
    for _ in range(runs):
        for mode in (a, b):
            results[mode].append(worker(mode, size, steps, device, threads))
    summary = {}
    for mode, runs_of_mode in results.items():
        if len(runs_of_mode) > 1:  # the same configuration twice: how reproducible is a loss curve at all?
            summary[f"{mode}_self_loss_difference"] = max(
                abs(x - y) for x, y in zip(runs_of_mode[0]["losses"], runs_of_mode[1]["losses"]))
        steps_all = [t for r in runs_of_mode for t in r["step_seconds"]]
        summary[mode] = {"median_step_seconds": statistics.median(steps_all), "timed_steps": len(steps_all),
                         "peak_rss_bytes": statistics.median(r["peak_rss_bytes"] for r in runs_of_mode),
                         "baseline_rss_bytes": statistics.median(r["baseline_rss_bytes"] for r in runs_of_mode),
                         "trainable": runs_of_mode[0]["trainable"], "losses": runs_of_mode[0]["losses"],
                         "predicted": runs_of_mode[0]["predicted"],
                         "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs_of_mode)}
        if "peak_cuda_bytes" in runs_of_mode[0]:
            summary[mode]["peak_cuda_bytes"] = statistics.median(r["peak_cuda_bytes"] for r in runs_of_mode)
    summary["step_ratio"] = summary[b]["median_step_seconds"] / summary[a]["median_step_seconds"]
    memory = "peak_cuda_bytes" if device == "cuda" else "peak_rss_bytes"
    summary["peak_memory_ratio"] = summary[b][memory] / summary[a][memory]
    return summary


def quantized_linear_bytes() -> dict:
    """Bytes of a 4096x4096 Linear quantized by bitsandbytes (weights + quant state) over fp32."""
    import torch
    import bitsandbytes as bnb

    from lorakit.plan.accounting import quant_state_bytes

    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    fp32 = weight.numel() * 4
    out = {}
    for name, double in (("nf4", False), ("nf4_double_quant", True)):
        param = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=double).to("cpu")
        out[name] = (param.numel() * param.element_size() + quant_state_bytes(param.quant_state)) / fp32
    int8 = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    out["int8"] = (int8.numel() + int8.SCB.numel() * 4) / fp32
    out["targets"] = {"nf4": 0.145, "nf4_double_quant": 0.130, "int8": 0.26}
    return out


def estimate_error(run: dict) -> dict:
    measured = run["peak_rss_bytes"] - run["baseline_rss_bytes"]
    predicted = run["predicted"]["weights_grads_optimizer"] + (run["predicted"]["activations"] or 0)
    return {"predicted_bytes": predicted, "measured_bytes": measured, "error": predicted / measured - 1}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: proves the harness works")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated figures to skip: overhead,lora_vs_full,"
                                                   "quant_bytes,compare_parameters,merge")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    small, big = ("tiny", "tiny") if args.quick else ("small", "100m")
    runs, steps = (1, 3) if args.quick else (2, 10)
    device_name = args.device if args.device == "cpu" else "cuda-" + _gpu_name()
    # the models are written by a child: the parent must stay small (see common.PEAK)
    subprocess.run([sys.executable, "-c", f"from benchmarks.worker import model_dir; model_dir({small!r}); "
                    f"model_dir({big!r})"], check=True, cwd=Path(__file__).parent.parent)
    figures: dict = {"environment": environment(), "quick": args.quick}
    if "overhead" not in skip:
        overhead = side_by_side("peft", "lorakit", small, runs, steps, args.device, args.threads)
        overhead["same_trainable"] = overhead["peft"]["trainable"] == overhead["lorakit"]["trainable"]
        overhead["max_loss_difference"] = max(abs(x - y) for x, y in zip(overhead["peft"]["losses"],
                                                                        overhead["lorakit"]["losses"]))
        figures["overhead"] = overhead
    if "lora_vs_full" not in skip:
        versus = side_by_side("full", "lora", big, runs, steps, args.device, args.threads)
        four_bit = side_by_side("lora", "lora4bit", big, 1 if args.quick else 1, steps, args.device, args.threads)
        figures["lora_vs_full"] = versus
        figures["lora4bit_vs_lora"] = four_bit
        figures["estimate"] = {"full": estimate_error(versus["full"]), "lora": estimate_error(versus["lora"]),
                               "lora4bit": estimate_error(four_bit["lora4bit"])}
    if args.device == "cpu" and not args.quick:
        if "compare_parameters" not in skip:
            figures["compare_parameters_70b"] = compare_parameters.main(["--repeats", "5"])
        if "merge" not in skip:
            figures["merge_1gb"] = merge.main(["--repeats", "3"])
    if "quant_bytes" not in skip:  # last: it allocates in this process
        figures["quant_bytes"] = quantized_linear_bytes()
    if not args.quick:
        for key, value in figures.items():
            save(device_name, key, value)
    print(markdown(figures))
    return figures


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0).split()[-1].lower()


def markdown(f: dict) -> str:
    env = f["environment"]
    rows = [f"Measured {env['date']} on {env['machine']}, Python {env['python']}, "
            + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".", "",
            "| figure | A | B | B/A | target |", "|---|---|---|---:|---|"]

    def ms(x: float) -> str:
        return f"{1000 * x:.0f} ms"

    def mib(x: float) -> str:
        return f"{x / 2**20:.0f} MiB"

    if "overhead" in f:
        o = f["overhead"]
        rows.append(f"| wrapper overhead: step time (Llama 4x256, batch 8x64) | peft + Trainer "
                    f"{ms(o['peft']['median_step_seconds'])} | lorakit {ms(o['lorakit']['median_step_seconds'])} | "
                    f"{o['step_ratio']:.3f} | <= 1.03 |")
        rows.append(f"| wrapper overhead: peak RSS | {mib(o['peft']['peak_rss_bytes'])} | "
                    f"{mib(o['lorakit']['peak_rss_bytes'])} | {o['peak_memory_ratio']:.3f} | <= 1.02 |")
        noise = o.get("peft_self_loss_difference")
        rows.append(f"| wrapper overhead: trainable params, max loss difference (peft vs itself: "
                    f"{'n/a' if noise is None else f'{noise:.1e}'}; first loss equal: "
                    f"{o['peft']['losses'][0] == o['lorakit']['losses'][0]}) | {o['peft']['trainable']:,} | "
                    f"{o['lorakit']['trainable']:,} | {o['max_loss_difference']:.1e} | equal, <= 1e-6 |")
    if "lora_vs_full" in f:
        v, q = f["lora_vs_full"], f["lora4bit_vs_lora"]
        rows.append(f"| LoRA vs full FT step time (~110M Llama, fp32, batch 2x128) | full "
                    f"{ms(v['full']['median_step_seconds'])} | LoRA {ms(v['lora']['median_step_seconds'])} | "
                    f"{v['step_ratio']:.3f} | <= 0.80 (FLOP floor 0.667) |")
        rows.append(f"| LoRA vs full FT peak RSS | {mib(v['full']['peak_rss_bytes'])} | "
                    f"{mib(v['lora']['peak_rss_bytes'])} | {v['peak_memory_ratio']:.3f} | <= 0.45 |")
        rows.append(f"| 4-bit LoRA vs fp32 LoRA peak RSS | {mib(q['lora']['peak_rss_bytes'])} | "
                    f"{mib(q['lora4bit']['peak_rss_bytes'])} | {q['peak_memory_ratio']:.3f} | (smaller is better) |")
        rows.append(f"| 4-bit LoRA vs fp32 LoRA step time | {ms(q['lora']['median_step_seconds'])} | "
                    f"{ms(q['lora4bit']['median_step_seconds'])} | {q['step_ratio']:.3f} | (no target on CPU) |")
        for mode, e in f["estimate"].items():
            rows.append(f"| report's predicted training memory vs measured ({mode}) | measured "
                        f"{mib(e['measured_bytes'])} | predicted {mib(e['predicted_bytes'])} | "
                        f"{1 + e['error']:.3f} | within 0.85-1.15 |")
    if "quant_bytes" in f:
        b = f["quant_bytes"]
        for key, label in (("nf4", "nf4"), ("nf4_double_quant", "nf4 + double quant"), ("int8", "int8")):
            rows.append(f"| bytes of a 4096x4096 Linear, {label} vs fp32 (exact) | fp32 64 MiB | "
                        f"{64 * b[key]:.2f} MiB | {b[key]:.4f} | <= {b['targets'][key]} |")
    if "compare_parameters_70b" in f:
        c = f["compare_parameters_70b"]
        rows.append(f"| compare-parameters Llama-3.1-70B 4-bit vs bare meta build | {c['a_wall_s']:.2f} s | "
                    f"{c['b_wall_s']:.2f} s, {mib(c['b_peak_rss_bytes'])} | {c['wall_ratio']:.3f} | "
                    f"<= 1.3, < 1 GB |")
    if "merge_1gb" in f:
        m = f["merge_1gb"]
        rows.append(f"| merge, ~1 GB fp32 in {m['base_shards']} shards: wall time | load + merge_and_unload + "
                    f"save {m['a_wall_s']:.1f} s | streamed {m['b_wall_s']:.1f} s | {m['wall_ratio']:.3f} | <= 0.8 |")
        rows.append(f"| merge: peak RSS | {mib(m['a_peak_rss_bytes'])} | {mib(m['b_peak_rss_bytes'])} | "
                    f"{m['peak_rss_ratio']:.3f} | <= 0.5 |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
