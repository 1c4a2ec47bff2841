"""examples/transfer_digits.py: every recipe's trainable count against a count from layer shapes, the split
(source, shots, validation and test apart), and the quick path (real digits, seed 0, 5 shots, first rates)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
import transfer_digits as td  # noqa: E402


def linear(inputs: int, outputs: int) -> int:
    return inputs * outputs + outputs


def lora_pair(inputs: int, outputs: int, r: int, kernel: int = 1) -> int:
    """peft's A (r x inputs, with the layer's kernel) and B (outputs x r, 1x1)."""
    return r * inputs * kernel * kernel + outputs * r


def mlp_expected() -> dict[str, int]:
    """From the architecture 64 -> 256 -> 128 -> 10 alone."""
    first, second, head = linear(64, 256), linear(256, 128), linear(128, 10)
    everything = first + second + head
    return {"scratch": everything, "random-head": head, "head": head, "head-last": second + head,
            "lora": lora_pair(64, 256, 8) + lora_pair(256, 128, 8) + head, "full": everything}


def shape_count(module: torch.nn.Module) -> int:
    """Parameters of one leaf layer from its declared shape, not from its tensors."""
    if isinstance(module, torch.nn.Conv2d):
        kh, kw = module.kernel_size
        return module.out_channels * module.in_channels // module.groups * kh * kw + (
            module.out_channels if module.bias is not None else 0)
    if isinstance(module, torch.nn.BatchNorm2d):
        return 2 * module.num_features if module.affine else 0
    if isinstance(module, torch.nn.Linear):
        return linear(module.in_features, module.out_features)
    assert not list(module.parameters(recurse=False)), f"unexpected layer with parameters: {module}"
    return 0


def resnet_expected() -> dict[str, int]:
    layers = dict(td.build("resnet").named_modules())
    everything = sum(shape_count(m) for m in layers.values())
    head = linear(128, 10)
    last_stage = sum(shape_count(m) for n, m in layers.items() if n.startswith("resnet.encoder.stages.3."))
    # every convolution inside the stages (the preset's "conv" group), rank 4
    convs = [m for n, m in layers.items() if n.startswith("resnet.encoder.stages.") and isinstance(m, torch.nn.Conv2d)]
    lora = sum(lora_pair(m.in_channels, m.out_channels, 4, m.kernel_size[0]) for m in convs)
    return {"scratch": everything, "random-fc": head, "fc": head, "last-stage": last_stage + head,
            "lora-conv": lora + head, "full": everything}


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
def test_reported_trainable_counts_equal_counts_from_layer_shapes(kind):
    expected = mlp_expected() if kind == "mlp" else resnet_expected()
    assert set(expected) == set(td.RECIPES[kind])
    pretrained = td.build(kind)  # the counts do not depend on the weights
    full = expected["full"]
    for recipe, count in expected.items():
        model = td.prepare(kind, recipe, pretrained, seed=0)
        report = lorakit.report(model)
        assert report.total.trainable_parameters == count, recipe
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == count, recipe
        assert report.total.full_finetune_trainable_parameters == full, recipe
    if kind == "resnet":  # the parameter half of the LoRA target: under 10% of full fine-tuning
        assert expected["lora-conv"] < 0.10 * full


def test_source_shots_validation_and_test_are_apart_and_shots_nest():
    clean, shifted, labels = td.digits("mirror")
    parts = td.split(labels)
    pool = np.concatenate(parts["pool"])
    named = [parts["pretrain"], parts["pretrain_val"], parts["validation"], pool, parts["test"]]
    every = np.concatenate(named)
    assert len(every) == len(set(every.tolist())) == len(labels)  # each image in exactly one part
    source = set(np.concatenate(named[:2]).tolist())
    for c, images in enumerate(parts["pool"]):
        assert (labels[images] == c).all() and len(images) == td.POOL_PER_CLASS
    previous: set = set()
    for per_class in td.SHOTS:  # a seed's 1 shot is in its 3 shots, and those in its 5
        chosen = td.shots(parts["pool"], seed=3, per_class=per_class)
        assert np.bincount(labels[chosen].numpy(), minlength=10).tolist() == [per_class] * 10
        assert previous <= set(chosen.tolist()) and not source & set(chosen.tolist())
        previous = set(chosen.tolist())
    # the target is each image mirrored, with noise, kept in [0, 1]
    def distance(a, b):
        return (a - b).abs().mean().item()
    assert shifted.min() >= 0 and shifted.max() <= 1
    assert 0.1 < distance(shifted, clean.flip(-1)) < distance(shifted, clean) - 0.1


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, above all on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_path_shows_transfer_on_both_networks(one_thread):
    """Seed 0, 5 noisy shots per class, each recipe's first rate (the full run's choice). Pretrained on clean
    upright digits, frozen features beat frozen random ones on both networks; the ResNet's best transfer recipe
    beats scratch by 10 points and LoRA on its convolutions is within 2 points of full fine-tuning. The MLP's
    best recipe beats scratch by 4.0 points in the full run (docs/transfer-digits.md): only the direction."""
    mlp = {r["recipe"]: r for r in td.experiment("mlp", seeds=[0], grid=False, shot_counts=(5,))}
    assert list(mlp) == list(td.RECIPES["mlp"])
    accuracy = {name: row["test_mean"] for name, row in mlp.items()}
    assert accuracy["head"] > accuracy["random-head"] + 0.10, accuracy
    assert max(accuracy[r] for r in ("head", "head-last", "lora", "full")) > accuracy["scratch"] + 0.02, accuracy
    # margins are paired by seed: the same 5 images per class for scratch and for each recipe
    assert mlp["full"]["margin"][0] == pytest.approx(accuracy["full"] - accuracy["scratch"])

    recipes = ("scratch", "random-fc", "fc", "lora-conv", "full")
    resnet = {r["recipe"]: r["test_mean"] for r in td.experiment("resnet", [0], False, (5,), recipes=recipes)}
    assert resnet["fc"] > resnet["random-fc"] + 0.10, resnet
    assert max(resnet[r] for r in recipes[2:]) > resnet["scratch"] + 0.10, resnet
    assert resnet["lora-conv"] > resnet["full"] - 0.02, resnet
