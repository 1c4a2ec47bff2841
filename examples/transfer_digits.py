"""Transfer learning on a shifted, few-shot digits task: scikit-learn's handwritten digits (8x8), offline.
Results, and why: docs/transfer-digits.md (times on a shared, busy 2-core machine, one torch thread).

    python examples/transfer_digits.py            # full run: 1/3/5 shots, 5 seeds x 3-4 learning rates (16 min)
    python examples/transfer_digits.py --quick    # 5 shots, 2 seeds, each recipe's first rate (35 s)

Source: all ten digits, upright and clean, from one half of the data set (pretraining, with small random
rotations, scalings and shifts). Target: the other half, shifted (`--shift`: Gaussian noise of std 0.3 on
the [0, 1] pixels; `mirror` and `rotate` also flip or turn every image), with 1, 3 or 5 labelled images per
class from a pool the source never saw; a validation split (10 per class) chooses each learning rate, and a
test split (the rest, ~600 images) is read only at the chosen rate. Each recipe is one lorakit spec on the
pretrained model with a new head (docs/transfer-digits.md has the table):
  MLP 64 -> 256 -> 128 -> 10 (plain torch; `hidden` is a ModuleList, lorakit's block stack; `classifier` a
  head of the default preset): head Freeze("head-only"), head-last Freeze("first:1"), lora
  Lora(r=8, targets="all-linear"), full (nothing to wrap).
  transformers ResNet (1 channel, embedding 16, stages 16/32/64/128 of one basic block; digits at 32x32):
  fc Freeze("head-only"), last-stage Freeze("embeddings first:3"), lora-conv Lora(r=4, targets="conv"), full.
"scratch" trains the same architecture from random init on the same images (margins are paired by seed);
"random-head" and "random-fc" are controls: the head recipe on a frozen random backbone.

Every run, pretraining included, is a `lorakit.LoraTrainer` (AdamW, constant rate, no weight decay, one
torch thread); a transfer run is 100 full-batch steps. "Frozen" is requires_grad=False: BatchNorm running
statistics are buffers, and in train mode they adapt to the target in every ResNet recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.trainer_callback import PrinterCallback

import lorakit
from lorakit.core.files import atomic_path, write_json_atomic
from lorakit.cost.render import plot as lorakit_plot

ROOT = Path(__file__).resolve().parent.parent
SPLIT_SEED, SOURCE_FRACTION, VALIDATION_PER_CLASS, POOL_PER_CLASS = 0, 0.5, 10, 20
SHOTS, NOISE, STEPS = (1, 3, 5), 0.3, 100  # labelled images per class; target noise std; steps a transfer run
SHIFTS = ("noise", "mirror", "rotate")  # every shift adds the noise; mirror flips left-right, rotate turns 90 deg
PRETRAIN = {"mlp": (1e-3, 60), "resnet": (1e-3, 20)}  # learning rate, epochs on the source (batch 32)
HEAD_ONLY, FULL = lorakit.Freeze(backbone=True), None

# model -> recipe -> (what trains, wrap specs (None: full fine-tuning, nothing to wrap), learning-rate grid
# (the full run's choice at 5 shots first: --quick uses it), starts from the pretrained model?)
RECIPES = {
    "mlp": {
        "scratch": ("random init, every layer", FULL, [3e-4, 1e-4, 1e-3, 3e-3], False),
        "random-head": ("control: head on frozen random layers", {"freeze": HEAD_ONLY}, [1e-1, 3e-2, 1e-2], False),
        "head": ("new head only", {"freeze": HEAD_ONLY}, [1e-3, 3e-4, 3e-3, 1e-2], True),
        "head-last": ("head + last hidden layer", {"freeze": lorakit.Freeze(first_layers=1)},
                      [3e-3, 1e-3, 3e-4, 1e-2], True),
        "lora": ("LoRA r=8, hidden layers + head", {"lora": lorakit.Lora(r=8, targets="all-linear")},
                 [1e-3, 3e-4, 3e-3, 1e-2], True),
        "full": ("every layer", FULL, [1e-3, 3e-4, 3e-3], True),
    },
    "resnet": {
        "scratch": ("random init, every layer", FULL, [1e-2, 3e-3, 1e-3], False),
        "random-fc": ("control: fc on a frozen random backbone", {"freeze": HEAD_ONLY}, [3e-3, 1e-2, 3e-2], False),
        "fc": ("new fc only", {"freeze": HEAD_ONLY}, [3e-2, 1e-2, 3e-3], True),
        "last-stage": ("stage 3 + fc", {"freeze": lorakit.Freeze(embeddings=True, first_layers=3)},
                       [1e-3, 3e-4, 3e-3, 1e-2], True),
        "lora-conv": ("LoRA r=4, convolutions + fc", {"lora": lorakit.Lora(r=4, targets="conv")},
                      [3e-3, 1e-3, 3e-4, 1e-2], True),
        "full": ("every layer", FULL, [1e-3, 3e-4, 3e-3], True),
    },
}


class MLP(nn.Module):
    """64 -> 256 -> 128 -> 10 with ReLU; forward returns logits, and the loss when given labels."""

    def __init__(self, sizes: tuple[int, ...] = (64, 256, 128), classes: int = 10):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.classifier = nn.Linear(sizes[-1], classes)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        for layer in self.hidden:
            pixel_values = torch.relu(layer(pixel_values))
        logits = self.classifier(pixel_values)
        return {"logits": logits} if labels is None else {"loss": nn.functional.cross_entropy(logits, labels),
                                                          "logits": logits}


def build(kind: str) -> nn.Module:
    if kind == "mlp":
        return MLP()
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                          layer_type="basic", num_labels=10)
    return ResNetForImageClassification(config)


def digits(shift: str = "noise") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All 1,797 digits (8x8, [0, 1]) as they are, the same images shifted (fixed noise), and the labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    shifted = {"noise": images, "mirror": images.flip(-1), "rotate": images.rot90(1, (-2, -1))}[shift]
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return images, (shifted + NOISE * noise).clamp(0, 1), torch.tensor(data.target)


def model_input(kind: str, images: torch.Tensor) -> torch.Tensor:
    """Flat 64 for the MLP, 1x32x32 (bilinear) for the ResNet."""
    if kind == "mlp":
        return images.reshape(len(images), 64)
    return nn.functional.interpolate(images[:, None], size=(32, 32), mode="bilinear", align_corners=False)


def split(labels: torch.Tensor) -> dict:
    """Fixed indices, per class: source (pretrain 90% / pretrain_val 10%) from one half; from the other, target
    validation (10), pool (20, one array per class: shots() draws from each) and test (the rest)."""
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list] = {"pretrain": [], "pretrain_val": [], "validation": [], "pool": [], "test": []}
    for digit in range(10):
        index = rng.permutation(np.flatnonzero(labels.numpy() == digit))
        source = int(SOURCE_FRACTION * len(index))
        cuts = np.cumsum([int(0.9 * source), source - int(0.9 * source), VALIDATION_PER_CLASS, POOL_PER_CLASS])
        for name, part in zip(parts, np.split(index, cuts)):
            parts[name].append(part)
    return {k: v if k == "pool" else np.concatenate(v) for k, v in parts.items()}


def shots(pool: list[np.ndarray], seed: int, per_class: int) -> np.ndarray:
    """The seed's `per_class` images of each digit from the pool: a seed's 3 shots include its 1 shot."""
    rng = np.random.default_rng(1000 + seed)
    return np.concatenate([rng.permutation(images)[:per_class] for images in pool])


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small affine distortions (rotation +-15 deg, scale +-10%, shift +-1 pixel of 8): generic strokes."""
    n = len(x)
    images = x.reshape(n, 1, 8, 8) if x.dim() == 2 else x
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(15)
    scale = 1 + (torch.rand(n, generator=generator) * 2 - 1) * 0.1
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (2 / 8)  # grid units: 2 is the image's width
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return nn.functional.grid_sample(images, grid, align_corners=False).reshape(x.shape)


def collator(distort_seed: int | None):
    """Stacks rows into a batch; with a seed, distorts every batch (pretraining's augmentation)."""
    generator = None if distort_seed is None else torch.Generator().manual_seed(distort_seed)

    def collate(rows: list[dict]) -> dict:
        batch = torch.utils.data.default_collate(rows)
        if generator is not None:
            batch["pixel_values"] = augment(batch["pixel_values"], generator)
        return batch

    return collate


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, learning_rate: float, steps: int, seed: int,
          batch_size: int, distort: bool = False) -> float:
    """LoraTrainer: AdamW at a constant rate, shuffled batches, nothing saved; returns the seconds it took."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        args = lorakit.training_args(folder, learning_rate=learning_rate, max_steps=steps, seed=seed,
                                     per_device_train_batch_size=batch_size, lr_scheduler_type="constant",
                                     save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True)
        rows = [{"pixel_values": image, "labels": label} for image, label in zip(x, y)]  # what forward takes
        trainer = lorakit.LoraTrainer(model=model, args=args, train_dataset=rows,
                                      data_collator=collator(seed if distort else None))
        trainer.remove_callback(PrinterCallback)  # its end-of-run metrics line, once per run
        trainer.train()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    out = model(pixel_values=x)
    return (out["logits"].argmax(-1) == y).float().mean().item()


def pretrain(kind: str, clean: torch.Tensor, y: torch.Tensor, parts: dict, distort: bool = True) -> nn.Module:
    """The model trained on the upright source (seed SPLIT_SEED: every transfer run starts from this one)."""
    torch.manual_seed(SPLIT_SEED)
    model = build(kind)
    learning_rate, epochs = PRETRAIN[kind]
    x, labels = clean[parts["pretrain"]], y[parts["pretrain"]]
    seconds = train(model, x, labels, learning_rate, epochs * math.ceil(len(x) / 32), SPLIT_SEED, 32, distort)
    print(f"{kind}: pretrained on {len(x)} upright digits, {seconds:.0f} s; held-out upright accuracy "
          f"{100 * accuracy(model, clean[parts['pretrain_val']], y[parts['pretrain_val']]):.1f}%", flush=True)
    return model


def prepare(kind: str, recipe: str, pretrained: nn.Module, seed: int) -> nn.Module:
    """A fresh model for one run: the pretrained one (or a random one) with a new head, wrapped by the recipe."""
    _, specs, _, from_pretrained = RECIPES[kind][recipe]
    torch.manual_seed(seed)  # the random backbone's, the new head's and LoRA A's initialisation
    model = build(kind)
    if from_pretrained:
        model.load_state_dict(pretrained.state_dict())
        for module in model.classifier.modules():  # the new head
            if isinstance(module, nn.Linear):
                module.reset_parameters()
    return lorakit.wrap(model, **specs) if specs else model


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_recipe(kind: str, recipe: str, pretrained: nn.Module, x: torch.Tensor, y: torch.Tensor, parts: dict,
               seeds: list[int], learning_rates: list[float], per_class: int) -> dict:
    """Train `recipe` for every seed and rate; the rate is chosen on validation, test read for it only."""
    runs: dict[float, list[dict]] = {}
    for learning_rate in learning_rates:
        for seed in seeds:
            model = prepare(kind, recipe, pretrained, seed)
            chosen = shots(parts["pool"], seed, per_class)
            seconds = train(model, x[chosen], y[chosen], learning_rate, STEPS, seed, len(chosen))
            runs.setdefault(learning_rate, []).append({
                "seconds": seconds, "test": accuracy(model, x[parts["test"]], y[parts["test"]]),
                "validation": accuracy(model, x[parts["validation"]], y[parts["validation"]])})
    validation = {lr: statistics.mean(r["validation"] for r in runs[lr]) for lr in learning_rates}
    best = max(sorted(learning_rates), key=lambda lr: validation[lr])  # a tie goes to the smaller rate
    report = lorakit.report(prepare(kind, recipe, pretrained, seeds[0]))
    tests = [r["test"] for r in runs[best]]
    return {"model": kind, "recipe": recipe, "shots": per_class, "trains": RECIPES[kind][recipe][0],
            "learning_rate": best, "validation_by_rate": validation, "tests": tests, "test_mean": mean_std(tests)[0],
            "test_std": mean_std(tests)[1], "seconds": statistics.mean(r["seconds"] for r in runs[best]),
            "report": report, "trainable": report.total.trainable_parameters,
            "full_finetune": report.total.full_finetune_trainable_parameters}


def experiment(kind: str, seeds: list[int], grid: bool = True, shot_counts: tuple[int, ...] = SHOTS,
               shift: str = "noise", distort: bool = True, recipes: tuple[str, ...] | None = None) -> list[dict]:
    """Pretrain once, run every recipe at every shot count; each row gets its margin over scratch, paired by
    seed (the same images). Pretrained accuracy on the shifted test set, untrained head and all, is printed."""
    clean, shifted, y = digits(shift)
    parts = split(y)
    pretrained = pretrain(kind, model_input(kind, clean), y, parts, distort)
    x = model_input(kind, shifted)
    print(f"  {kind}: the pretrained model on the shifted test set, no transfer: "
          f"{100 * accuracy(pretrained, x[parts['test']], y[parts['test']]):.1f}%", flush=True)
    rows = []
    for per_class in shot_counts:
        block = []
        for recipe, (_, _, rates, _) in RECIPES[kind].items():
            if recipes and recipe not in recipes:
                continue
            row = run_recipe(kind, recipe, pretrained, x, y, parts, seeds, rates if grid else rates[:1], per_class)
            tried = ", ".join(f"{lr:g}: {100 * v:.1f}%" for lr, v in row["validation_by_rate"].items())
            print(f"  {kind} {per_class} shots {recipe:11s} validation {tried}; test at {row['learning_rate']:g}: "
                  f"{100 * row['test_mean']:.1f} +- {100 * row['test_std']:.1f}%  ({row['seconds']:.1f} s/run)",
                  flush=True)
            block.append(row)
        scratch = next((r for r in block if r["recipe"] == "scratch"), None)
        for row in block if scratch else []:
            if row is not scratch:
                row["margin"] = mean_std([a - b for a, b in zip(row["tests"], scratch["tests"])])
        rows += block
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | shots | recipe | lr | test accuracy | vs scratch (paired) | trainable params "
             "| of full FT | time a run |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        margin = f"{100 * r['margin'][0]:+.1f} ± {100 * r['margin'][1]:.1f}" if "margin" in r else "-"
        lines.append(f"| {r['model']} | {r['shots']} | {r['recipe']} | {r['learning_rate']:g} | "
                     f"{100 * r['test_mean']:.1f} ± {100 * r['test_std']:.1f}% | {margin} | {r['trainable']:,} | "
                     f"{100 * r['trainable'] / r['full_finetune']:.1f}% | {r['seconds']:.1f} s |")
    return "\n".join(lines) + "\n"


def plot_accuracy(rows: list[dict], path: Path, title: str) -> None:
    """Test accuracy against labelled images per class, one panel per model, one line per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.2 * len(kinds), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for recipe in RECIPES[kind]:
            line = [r for r in rows if r["model"] == kind and r["recipe"] == recipe]
            style = "--" if not RECIPES[kind][recipe][3] else "-"
            ax.errorbar([r["shots"] for r in line], [100 * r["test_mean"] for r in line],
                        [100 * r["test_std"] for r in line], label=recipe, linestyle=style, marker="o", capsize=3)
        ax.set(title=f"{kind}: {title}", xlabel="labelled images per class", ylabel="test accuracy (%)")
        ax.set_xticks(sorted({r["shots"] for r in rows}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 shots, 2 seeds, each recipe's first rate only")
    parser.add_argument("--models", default="mlp,resnet")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 5, --quick 2)")
    parser.add_argument("--shots", help="labelled images per class, comma-separated (default 1,3,5; --quick 5)")
    parser.add_argument("--shift", choices=SHIFTS, default="noise", help="the target domain (all add noise)")
    parser.add_argument("--plain-pretraining", action="store_true", help="pretrain without random distortions")
    parser.add_argument("--plots", help="folder for the plots (default: docs/ in a full run of the noise shift)")
    parser.add_argument("--json", help="also write the rows (accuracies per seed, rates tried) to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # on our shared 2-core machine, one thread ran these small models 4x faster than two
    start = time.perf_counter()
    seeds = list(range(args.seeds or (2 if args.quick else 5)))
    shot_counts = tuple(int(s) for s in args.shots.split(",")) if args.shots else ((5,) if args.quick else SHOTS)
    rows = []
    for kind in args.models.split(","):
        rows += experiment(kind, seeds, not args.quick, shot_counts, args.shift, not args.plain_pretraining)
    print("\n" + markdown(rows))
    full_default = not args.quick and args.shift == "noise" and shot_counts == SHOTS
    plots = args.plots or (str(ROOT / "docs") if full_default else None)
    if plots:
        Path(plots).mkdir(parents=True, exist_ok=True)
        plot_accuracy(rows, Path(plots) / f"transfer-digits-accuracy-{args.shift}.png", f"{args.shift} shift")
    for r in rows if plots else []:  # each recipe's per-layer report, through lorakit's own plot renderer
        if RECIPES[r["model"]][r["recipe"]][3] and r["shots"] == shot_counts[-1]:
            titled = dataclasses.replace(r["report"], model=f"digits {r['model']} '{r['recipe']}'")
            lorakit_plot(titled, str(Path(plots) / f"transfer-digits-{r['model']}-{r['recipe']}.png"))
    if args.json:
        write_json_atomic(args.json, [{k: v for k, v in r.items() if k != "report"} for r in rows])
    print(f"\n{len(seeds)} seeds, {'first rates' if args.quick else 'rate grid'}, {args.shift} shift: "
          f"{time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
