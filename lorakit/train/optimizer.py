"""LoraTrainer's optimizer groups: LoRA+ (lora_B at a multiple of lora_A's rate), a learning rate of its own for
what trains in full (heads), and no weight decay on biases and norms."""

from __future__ import annotations

from typing import Any


def parameter_groups(model: Any, learning_rate: float, weight_decay: float, loraplus_ratio: float | None,
                     head_learning_rate: float | None) -> list[dict]:
    """The trainable parameters of `model` in optimizer groups, one for each (rate, decay)."""
    modules = dict(model.named_modules())
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        module = modules[name.rpartition(".")[0]]
        if "lora_B" in name and loraplus_ratio:
            rate = learning_rate * loraplus_ratio
        elif "lora_" in name:
            rate = learning_rate
        else:
            rate = head_learning_rate or learning_rate
        no_decay = name.endswith("bias") or "norm" in type(module).__name__.lower()
        groups.setdefault((rate, 0.0 if no_decay else weight_decay), []).append(param)
    return [{"params": params, "lr": rate, "weight_decay": decay} for (rate, decay), params in groups.items()]
