"""The memory simulator against CUDA measurements: every run of benchmarks/results/memory-cuda-<gpu>.json
simulated on this machine's CPU (fake tensors, no GPU), side by side.

    python -m benchmarks.memory                     # all runs; writes memory-simulated-vs-cuda-h100.json
    python -m benchmarks.memory --only smollm2-135m:lora:sdpa:0:512
    python -m benchmarks.memory --speed             # Llama-3.1-8B / 70B configs: seconds and peak RSS

Each simulation runs in a fresh process so that its RSS is its own. For each
run the worse of the two steps is compared (the peak a user cares about): the
simulated peak_allocated against torch.cuda.max_memory_allocated, and the
simulated reserved figure against torch.cuda.max_memory_reserved, per step.
Target: within 5% allocated and 10% reserved on every row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
LORA = dict(r=16, alpha=32, dropout=0.05, targets="all-linear")


def simulate_key(key: str) -> dict:
    """Simulate one benchmarks.memory_cuda configuration in this process."""
    import resource

    from transformers import LlamaConfig

    import lorakit
    from benchmarks.memory_cuda import MODELS
    from lorakit.cost.simulate import simulate

    model, method, attn, ckpt, seq = key.split(":")
    config = LlamaConfig(**MODELS[model], architectures=["LlamaForCausalLM"], dtype="bfloat16")
    spec = {}
    if method != "full":
        spec["lora"] = lorakit.Lora(**LORA)
    if method == "qlora":
        spec["quant"] = lorakit.Quant(bits=4, compute_dtype="bfloat16")
    # memory_cuda builds the bf16 model on the GPU and then wraps it with quant=: the "wrap" path; its step is a
    # plain loop (the model's own loss, peft's input casts), not LoraTrainer's levers
    result = simulate(config, attn=attn, gradient_checkpointing=bool(int(ckpt)), seq_len=int(seq), batch_size=1,
                      autocast="bfloat16", quant_path="wrap", chunked_loss=False, peft_input_cast=True, **spec)
    out = result.to_dict()
    out["rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _in_subprocess(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory", *args], capture_output=True, text=True,
                          cwd=HERE.parent)
    if done.returncode != 0 or "RESULT " not in done.stdout:
        return {"error": done.stderr[-3000:]}
    return json.loads(done.stdout.split("RESULT ", 1)[1])


def compare(measured: dict, simulated: dict) -> dict:
    row = {"key": measured["key"]}
    for step in (1, 2):
        real, sim = measured[f"step{step}"], simulated["steps"][step - 1]
        for what in ("peak_allocated", "peak_reserved", "allocated_after"):
            row[f"step{step}_{what}"] = {"measured": real[what], "simulated": sim[what],
                                         "error": sim[what] / real[what] - 1}
    row["setup_allocated"] = {"measured": measured["setup_allocated"], "simulated": simulated["setup_allocated"],
                              "error": simulated["setup_allocated"] / measured["setup_allocated"] - 1}
    row["peak_phase"] = f"step {simulated['peak_step']} {simulated['peak_phase']}"
    row["seconds"], row["rss_bytes"] = simulated["seconds"], simulated.get("rss_bytes")
    return row


def markdown(rows: list[dict]) -> str:
    gib = 2 ** 30
    lines = ["| run | measured peak (GiB) | simulated | error | measured reserved | simulated | error | peak at |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        a = max((r["step1_peak_allocated"], r["step2_peak_allocated"]), key=lambda x: x["measured"])
        v = max((r["step1_peak_reserved"], r["step2_peak_reserved"]), key=lambda x: x["measured"])
        lines.append(f"| {r['key']} | {a['measured'] / gib:.3f} | {a['simulated'] / gib:.3f} | {a['error']:+.1%} | "
                     f"{v['measured'] / gib:.3f} | {v['simulated'] / gib:.3f} | {v['error']:+.1%} | {r['peak_phase']} |")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> dict:
    allocated = [abs(r[f"step{s}_peak_allocated"]["error"]) for r in rows for s in (1, 2)]
    reserved = [abs(r[f"step{s}_peak_reserved"]["error"]) for r in rows for s in (1, 2)]
    return {"rows": len(rows), "allocated_worst": max(allocated), "allocated_median": statistics.median(allocated),
            "reserved_worst": max(reserved), "reserved_median": statistics.median(reserved),
            "allocated_within_5pct": sum(e <= 0.05 for e in allocated) / len(allocated),
            "reserved_within_10pct": sum(e <= 0.10 for e in reserved) / len(reserved)}


def speed(name: str, method: str = "lora", **kwargs) -> dict:
    """Seconds and peak RSS of one simulation of a bundled config (LoRA r16 all-linear; QLoRA nf4; full), bf16."""
    import resource

    import lorakit
    from lorakit.cost.simulate import simulate

    spec = {"full": {}, "lora": {"lora": lorakit.Lora(**LORA)},
            "qlora": {"lora": lorakit.Lora(**LORA), "quant": lorakit.Quant(bits=4, compute_dtype="bfloat16")}}
    started = time.perf_counter()
    result = simulate(name, **spec[method], **kwargs)
    return {"model": name, "settings": result.settings, "seconds": time.perf_counter() - started,
            "peak_allocated": result.peak_allocated, "peak_reserved": result.peak_reserved,
            "device_total": result.device_total, "peak_step": result.peak_step, "peak_phase": result.peak_phase,
            "breakdown": result.breakdown,
            "cpu_seconds": resource.getrusage(resource.RUSAGE_SELF).ru_utime
            + resource.getrusage(resource.RUSAGE_SELF).ru_stime,
            "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def will_it_fit(out: Path) -> list[dict]:
    """Llama-3.1-8B (bundled config): full, LoRA, QLoRA x batch 1, 4 x sequence 2048, 4096 x checkpointing."""
    import itertools

    rows = []
    for method, batch, seq, ckpt in itertools.product(("lora", "qlora", "full"), (1, 4), (2048, 4096), (0, 1)):
        result = _in_subprocess(["--speed-one", f"meta-llama/Llama-3.1-8B:{seq}:{ckpt}:{batch}:{method}"])
        result.update(method=method, batch=batch, seq=seq, gradient_checkpointing=bool(ckpt))
        rows.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "settings"}), flush=True)
        from lorakit.core.files import write_json_atomic

        write_json_atomic(out, {"simulated_on": "CPU, fake tensors, shared 2-core machine", "rows": rows})
    return rows


def fit_markdown(path: Path) -> str:
    """The README's 8B table from memory-will-it-fit-llama-3.1-8b.json."""
    gib = 2 ** 30
    rows = json.loads(path.read_text())["rows"]
    lines = ["| method | batch | sequence | checkpointing | peak allocated | + reserved + CUDA context | peak at |",
             "|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            continue
        lines.append(f"| {r['method']} | {r['batch']} | {r['seq']} | {'on' if r['gradient_checkpointing'] else 'off'} "
                     f"| {r['peak_allocated'] / gib:.1f} GiB | {r['device_total'] / gib:.1f} GiB "
                     f"| step {r['peak_step']} {r['peak_phase']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="one configuration key, simulated in this process (prints RESULT json)")
    parser.add_argument("--speed-one", help=argparse.SUPPRESS)
    parser.add_argument("--speed", action="store_true", help="time the 8B and 70B configs")
    parser.add_argument("--will-it-fit", action="store_true", help="the README's Llama-3.1-8B table")
    parser.add_argument("--readme", action="store_true", help="print the README tables from the result files")
    parser.add_argument("--measured", default=str(HERE / "results" / "memory-cuda-h100.json"))
    parser.add_argument("--out", default=str(HERE / "results" / "memory-simulated-vs-cuda-h100.json"))
    args = parser.parse_args(argv)
    if args.only:
        print("RESULT " + json.dumps(simulate_key(args.only)), flush=True)
        return
    if args.speed_one:
        name, seq, ckpt, *rest = args.speed_one.split(":")
        batch, method = (int(rest[0]), rest[1]) if rest else (1, "lora")
        print("RESULT " + json.dumps(speed(name, method, seq_len=int(seq), batch_size=batch,
                                          gradient_checkpointing=bool(int(ckpt)))))
        return
    if args.readme:
        print(fit_markdown(HERE / "results" / "memory-will-it-fit-llama-3.1-8b.json"))
        compared = json.loads(Path(args.out).read_text())
        print(markdown(compared["rows"]))
        print(json.dumps(compared["summary"], indent=1))
        return
    if args.will_it_fit:
        will_it_fit(HERE / "results" / "memory-will-it-fit-llama-3.1-8b.json")
        return
    if args.speed:
        for case in ("meta-llama/Llama-3.1-8B:2048:0", "meta-llama/Llama-3.1-70B:2048:0"):
            result = _in_subprocess(["--speed-one", case])
            print(json.dumps(result), flush=True)
        return
    measured = json.loads(Path(args.measured).read_text())
    rows = []
    for run in measured["runs"]:
        simulated = _in_subprocess(["--only", run["key"]])
        if "error" in simulated:
            print(f"{run['key']}: simulation failed\n{simulated['error']}", file=sys.stderr)
            continue
        rows.append(compare(run, simulated))
        r = rows[-1]
        print(f"{run['key']:36s} alloc {r['step1_peak_allocated']['error']:+.1%} {r['step2_peak_allocated']['error']:+.1%}"
              f" reserved {r['step1_peak_reserved']['error']:+.1%} {r['step2_peak_reserved']['error']:+.1%}"
              f" setup {r['setup_allocated']['error']:+.1%} after {r['step2_allocated_after']['error']:+.1%}"
              f" ({r['seconds']:.0f} s)", flush=True)
    result = {"measured_on": measured["environment"], "cuda_context_bytes": measured["cuda_context_bytes"],
              "simulated_on": "CPU, fake tensors (torch FakeTensorMode), shared 2-core machine",
              "summary": summary(rows), "rows": rows}
    from lorakit.core.files import write_json_atomic

    write_json_atomic(args.out, result)
    print(markdown(rows))
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
