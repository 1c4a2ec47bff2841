"""examples/transfer_digits.py: every recipe's trainable count against a count from layer shapes, and the
quick path on the MLP (real digits, one seed, each recipe's chosen learning rate)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import lorakit

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))
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


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, above all on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_path_on_the_mlp_measures_the_directions_the_readme_states(one_thread):
    """Real digits, seed 0, each recipe's chosen rate. The full run (README) found that pretraining on 0-4 does
    not beat training from scratch on 20 images of each of 5-9: frozen 0-4 features lose clearly, and every
    recipe that trains hidden layers lands level with scratch. These are the directions asserted here."""
    rows = {r["recipe"]: r for r in td.experiment("mlp", seeds=[0], grid=False)}
    accuracy = {name: row["test_mean"] for name, row in rows.items()}
    assert list(accuracy) == list(td.RECIPES["mlp"])
    assert accuracy["head"] < accuracy["scratch"]  # a frozen 0-4 backbone loses to training from scratch
    for recipe in ("head-last", "lora", "full"):  # unfreezing hidden layers recovers what the frozen head lost
        assert accuracy[recipe] > accuracy["head"] + 0.02, (recipe, accuracy)
        assert abs(accuracy[recipe] - accuracy["scratch"]) < 0.03, (recipe, accuracy)
    # margins are paired by seed: the same 20 images per class for scratch and for each recipe
    assert rows["full"]["margin"][0] == pytest.approx(accuracy["full"] - accuracy["scratch"])
