"""Transfer learning on real images: scikit-learn's handwritten digits (8x8), offline.

    python examples/transfer_digits.py            # full run: 5 seeds x 3 learning rates (12 min on 2 busy cores)
    python examples/transfer_digits.py --quick    # 2 seeds, each recipe's chosen rate (80 s)

Pretrain on digits 0-4; transfer to 5-9 with 20 labelled images per class; test
on held-out 5-9 images; compare with training from scratch on the same images.
Each recipe is a lorakit spec on the pretrained model with a new head:

plain torch MLP 64 -> 256 -> 128 -> 10 (`hidden` is a ModuleList, which lorakit
finds as the block stack; `classifier` is a head of the default preset):
  head        Freeze("head-only")               only the new classifier trains
  head-last   Freeze("first:1")                 head + last hidden layer (hidden.0 frozen)
  lora        Lora(r=8, targets="all-linear")   LoRA on both hidden layers; the head in full
  full        nothing to wrap                   full fine-tuning
(a head named otherwise, say `fc3`, needs Lora(train_fully=["fc3"]) and
Freeze(backbone=True, keep=[r"^fc3\\."])). transformers ResNet (1 channel,
embedding 16, stages 16/32/64/128 of one basic block), digits upsampled to 32x32:
  fc          Freeze("head-only")               the classic fc swap
  last-stage  Freeze("embeddings first:3")      stage 3 + fc
  lora-conv   Lora(r=4, targets="conv")         LoRA on every stage convolution (the preset's group) + fc
  full        nothing to wrap                   full fine-tuning
"scratch" trains the same architecture from random init; "random-head" and
"random-fc" are controls: the head recipe on a frozen random backbone.

A plain loop trains, not LoraTrainer, which takes the ResNet as it is (dict
batches of `pixel_values`, `labels`) but cost 1-3 s more per run here (fc: 6.6 s
vs 3.8 s, same 200 steps) over 180 runs; the MLP would need a forward returning
a loss. One loop for every row: the same AdamW, constant rate, and batches.
"Frozen" is requires_grad=False: BatchNorm running statistics are buffers; in
train mode they adapt to the new digits in every ResNet recipe.

Pretraining adds random small rotations, scalings and shifts (features less
specific to 0-4; `--plain-pretraining` drops them). Learning rates: three per
recipe (RECIPES), chosen on a validation split of 5-9 (10 per class, apart from
the training pool and the test set); test accuracy is read only at the chosen
rate. `--quick` uses the rates the full run chose (the first of each list).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lorakit
from lorakit.render import plot as lorakit_plot

ROOT = Path(__file__).resolve().parent.parent
SPLIT_SEED, SHOTS, VALIDATION_PER_CLASS, POOL_PER_CLASS = 0, 20, 10, 70
OLD = range(0, 5)  # pretraining digits; 5-9 are the new task
TRANSFER_EPOCHS, BATCH = 40, 20  # 100 images: 5 steps an epoch
PRETRAIN = {"mlp": (1e-3, 60), "resnet": (1e-3, 20)}  # learning rate, epochs on digits 0-4 (batch 32)
HEAD_ONLY, FULL = lorakit.Freeze(backbone=True), None

# model -> recipe -> (what trains, wrap specs (None: full fine-tuning, nothing to wrap), learning-rate grid
# (the full run's choice first: --quick uses it), starts from the pretrained model?)
RECIPES = {
    "mlp": {
        "scratch": ("random init, every layer", FULL, [3e-2, 1e-2, 3e-3], False),
        "random-head": ("control: head on frozen random layers", {"freeze": HEAD_ONLY}, [3e-2, 1e-2, 3e-3], False),
        "head": ("new head only", {"freeze": HEAD_ONLY}, [1e-2, 3e-3, 3e-2], True),
        "head-last": ("head + last hidden layer", {"freeze": lorakit.Freeze(first_layers=1)}, [3e-3, 1e-3, 1e-2], True),
        "lora": ("LoRA r=8, hidden layers + head", {"lora": lorakit.Lora(r=8, targets="all-linear")},
                 [1e-2, 3e-3, 1e-3], True),
        "full": ("every layer", FULL, [3e-3, 1e-3, 1e-2], True),
    },
    "resnet": {
        "scratch": ("random init, every layer", FULL, [1e-3, 3e-4, 3e-3], False),
        "random-fc": ("control: fc on a frozen random backbone", {"freeze": HEAD_ONLY}, [1e-2, 3e-3, 3e-2], False),
        "fc": ("new fc only", {"freeze": HEAD_ONLY}, [1e-2, 3e-3, 3e-2], True),
        "last-stage": ("stage 3 + fc", {"freeze": lorakit.Freeze(embeddings=True, first_layers=3)}, [1e-3, 3e-4, 3e-3],
                       True),
        "lora-conv": ("LoRA r=4, convolutions + fc", {"lora": lorakit.Lora(r=4, targets="conv")}, [1e-3, 3e-4, 3e-3],
                      True),
        "full": ("every layer", FULL, [1e-3, 3e-4, 3e-3], True),
    },
}


class MLP(nn.Module):
    """64 -> 256 -> 128 -> 10 with ReLU; forward returns logits."""

    def __init__(self, sizes: tuple[int, ...] = (64, 256, 128), classes: int = 10):
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.classifier = nn.Linear(sizes[-1], classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            pixel_values = torch.relu(layer(pixel_values))
        return self.classifier(pixel_values)


def build(kind: str) -> nn.Module:
    if kind == "mlp":
        return MLP()
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                          layer_type="basic", num_labels=10)
    return ResNetForImageClassification(config)


def digits(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as model input (flat 64 for the MLP, 1x32x32 for the ResNet), scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images, labels = torch.tensor(data.images, dtype=torch.float32) / 16.0, torch.tensor(data.target)
    if kind == "mlp":
        return images.reshape(len(images), 64), labels
    return nn.functional.interpolate(images[:, None], size=(32, 32), mode="bilinear", align_corners=False), labels


def split(labels: torch.Tensor) -> dict[str, np.ndarray]:
    """Fixed indices: 0-4 pretrain/pretrain-val (80/20); 5-9 validation (10/class), pool (70/class), test (rest)."""
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list] = {"pretrain": [], "pretrain_val": [], "validation": [], "test": [], "pool": []}
    for digit in range(10):
        index = rng.permutation(np.flatnonzero(labels.numpy() == digit))
        cut = int(0.8 * len(index)) if digit in OLD else VALIDATION_PER_CLASS
        if digit in OLD:
            parts["pretrain"].append(index[:cut])
            parts["pretrain_val"].append(index[cut:])
        else:
            parts["validation"].append(index[:cut])
            parts["pool"].append(index[cut:cut + POOL_PER_CLASS])  # one array per digit: shots() draws per class
            parts["test"].append(index[cut + POOL_PER_CLASS:])
    return {k: v if k == "pool" else np.concatenate(v) for k, v in parts.items()}


def shots(pool: list[np.ndarray], seed: int, per_class: int = SHOTS) -> np.ndarray:
    """The seed's `per_class` images of each new digit, from the pool."""
    rng = np.random.default_rng(1000 + seed)
    return np.concatenate([rng.choice(images, per_class, replace=False) for images in pool])


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


def logits_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(pixel_values=x)
    return out if isinstance(out, torch.Tensor) else out.logits


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, learning_rate: float, epochs: int, seed: int,
          batch_size: int = BATCH, distort: bool = False) -> float:
    """AdamW on the trainable parameters, shuffled batches; returns the seconds it took."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate, weight_decay=0)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(batch_size):
            inputs = augment(x[batch], generator) if distort else x[batch]
            loss = nn.functional.cross_entropy(logits_of(model, inputs), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (logits_of(model, x).argmax(-1) == y).float().mean().item()


def pretrain(kind: str, x: torch.Tensor, y: torch.Tensor, parts: dict, distort: bool = True) -> nn.Module:
    """The model trained on digits 0-4 (always seed SPLIT_SEED: every transfer run starts from this one)."""
    torch.manual_seed(SPLIT_SEED)
    model = build(kind)
    learning_rate, epochs = PRETRAIN[kind]
    seconds = train(model, x[parts["pretrain"]], y[parts["pretrain"]], learning_rate, epochs, SPLIT_SEED,
                    batch_size=32, distort=distort)
    print(f"{kind}: pretrained on digits 0-4, {len(parts['pretrain'])} images, {seconds:.0f} s; accuracy on held-out "
          f"0-4: {100 * accuracy(model, x[parts['pretrain_val']], y[parts['pretrain_val']]):.1f}%", flush=True)
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


def run_recipe(kind: str, recipe: str, pretrained: nn.Module, data: tuple, parts: dict, seeds: list[int],
               learning_rates: list[float], per_class: int = SHOTS) -> dict:
    """Train `recipe` for every seed and learning rate; the rate is chosen on validation, test read for it only."""
    x, y = data
    runs: dict[float, list[dict]] = {}
    for learning_rate in learning_rates:
        for seed in seeds:
            model = prepare(kind, recipe, pretrained, seed)
            chosen = shots(parts["pool"], seed, per_class)
            seconds = train(model, x[chosen], y[chosen], learning_rate, TRANSFER_EPOCHS, seed)
            runs.setdefault(learning_rate, []).append({
                "seconds": seconds, "test": accuracy(model, x[parts["test"]], y[parts["test"]]),
                "validation": accuracy(model, x[parts["validation"]], y[parts["validation"]])})
    validation = {lr: statistics.mean(r["validation"] for r in runs[lr]) for lr in learning_rates}
    best = max(sorted(learning_rates), key=lambda lr: validation[lr])  # a tie goes to the smaller rate
    report = lorakit.report(prepare(kind, recipe, pretrained, seeds[0]))
    tests = [r["test"] for r in runs[best]]
    return {"model": kind, "recipe": recipe, "trains": RECIPES[kind][recipe][0], "learning_rate": best,
            "validation_by_rate": validation, "tests": tests, "test_mean": mean_std(tests)[0],
            "test_std": mean_std(tests)[1], "seconds": statistics.mean(r["seconds"] for r in runs[best]),
            "report": report, "trainable": report.total.trainable_parameters,
            "full_finetune": report.total.full_finetune_trainable_parameters}


def experiment(kind: str, seeds: list[int], grid: bool = True, per_class: int = SHOTS,
               distort: bool = True) -> list[dict]:
    """Pretrain once, run every recipe; each row gets its margin over scratch, paired by seed (same images)."""
    data = digits(kind)
    parts = split(data[1])
    pretrained = pretrain(kind, *data, parts, distort)
    rows = []
    for recipe, (_, _, rates, _) in RECIPES[kind].items():
        rows.append(run_recipe(kind, recipe, pretrained, data, parts, seeds, rates if grid else rates[:1], per_class))
        row, tried = rows[-1], ", ".join(f"{lr:g}: {100 * v:.1f}%" for lr, v in rows[-1]["validation_by_rate"].items())
        print(f"  {kind} {recipe:11s} validation {tried}; test at {row['learning_rate']:g}: "
              f"{100 * row['test_mean']:.1f} +- {100 * row['test_std']:.1f}%  ({row['seconds']:.1f} s/run)", flush=True)
    for row in rows[1:]:  # scratch is the first recipe
        row["margin"] = mean_std([a - b for a, b in zip(row["tests"], rows[0]["tests"])])
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | recipe | trains | lr | test accuracy | vs scratch (paired) | trainable params "
             "| of full FT | time a run |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        margin = f"{100 * r['margin'][0]:+.1f} +- {100 * r['margin'][1]:.1f}" if "margin" in r else "-"
        lines.append(f"| {r['model']} | {r['recipe']} | {r['trains']} | {r['learning_rate']:g} | "
                     f"{100 * r['test_mean']:.1f} +- {100 * r['test_std']:.1f}% | {margin} | {r['trainable']:,} | "
                     f"{100 * r['trainable'] / r['full_finetune']:.1f}% | {r['seconds']:.1f} s |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 seeds, each recipe's chosen rate only")
    parser.add_argument("--models", default="mlp,resnet")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 5, --quick 2)")
    parser.add_argument("--shots", type=int, default=SHOTS, help="labelled images per new digit")
    parser.add_argument("--plain-pretraining", action="store_true", help="pretrain without random distortions")
    parser.add_argument("--plots", help="folder for the per-layer plots (default: docs/ in the full run)")
    parser.add_argument("--json", help="also write the rows (accuracies per seed, rates tried) to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # on our shared 2-core machine, one thread ran these small models 4x faster than two
    start = time.perf_counter()
    seeds = list(range(args.seeds or (2 if args.quick else 5)))
    rows = []
    for kind in args.models.split(","):
        rows += experiment(kind, seeds, grid=not args.quick, per_class=args.shots, distort=not args.plain_pretraining)
    print("\n" + markdown(rows))
    plots = args.plots or (None if args.quick else str(ROOT / "docs"))
    for r in rows if plots else []:  # each recipe's per-layer report, through lorakit's own plot renderer
        if RECIPES[r["model"]][r["recipe"]][3]:
            Path(plots).mkdir(parents=True, exist_ok=True)
            titled = dataclasses.replace(r["report"], model=f"digits {r['model']} '{r['recipe']}'")
            lorakit_plot(titled, str(Path(plots) / f"transfer-digits-{r['model']}-{r['recipe']}.png"))
    if args.json:
        keep = [{k: v for k, v in r.items() if k != "report"} for r in rows]
        Path(args.json).write_text(json.dumps(keep, indent=1) + "\n")
    print(f"\n{len(seeds)} seeds, {'chosen rates' if args.quick else 'rate grid'}: {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
