"""`training_args`: transformers' TrainingArguments with lorakit's defaults and its memory levers."""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import TrainingArguments

from ..core.errors import LorakitError


def training_args(output_dir: str, *, chunked_loss: bool | None = None, activation_offload: bool = False,
                  tiled_mlp: bool = False, **overrides: Any) -> TrainingArguments:
    """TrainingArguments with lorakit's defaults: on CUDA bf16 where supported, else fp16; fp32 on CPU;
    non-reentrant gradient checkpointing when it is turned on; no external loggers. Evaluation is off unless
    eval_strategy is given; `LoraTrainer` turns on per-epoch evaluation when it gets an eval_dataset and
    eval_strategy was left to this default (Trainer refuses to evaluate without an eval set). Without a
    learning_rate, `LoraTrainer` uses the LoRA plan's (the family preset's, see `Plan.defaults`).

    Three memory levers of `LoraTrainer` (see `lorakit.cost.levers` and `lorakit.cost.tiled_mlp`):
    chunked_loss: a causal LM's training loss over lm_head's weight in chunks, never the full-vocabulary
        logits. None (default): on wherever it computes exactly the standard loss; False: the standard loss.
    activation_offload: what the forward saves for backward (the checkpointed layer inputs) is kept in host
        memory; needs gradient checkpointing.
    tiled_mlp: every decoder block's MLP runs over the sequence in tiles, recomputed in backward, so that no MLP
        activation of the whole sequence is held (exact; one more MLP forward a step)."""
    import torch

    if chunked_loss not in (None, True, False):
        raise LorakitError(f"chunked_loss must be True, False or None, got {chunked_loss!r}",
                           hint="None (the default) uses it wherever it gives the standard loss")
    overrides = current_names(overrides)
    checkpointing = overrides.get("gradient_checkpointing") or overrides.get("activation_checkpointing")
    if activation_offload and not checkpointing:
        raise LorakitError("activation_offload=True needs gradient checkpointing: without it every activation "
                           "would cross to the host and back", hint="add gradient_checkpointing=True")

    defaults: dict[str, Any] = {"report_to": "none", "save_strategy": "epoch", "eval_strategy": "no",
                                "logging_strategy": "steps", "logging_steps": 10}
    if overrides.get("load_best_model_at_end"):  # Trainer needs evaluation at every save for this
        defaults["eval_strategy"] = overrides.get("save_strategy", defaults["save_strategy"])
    if torch.cuda.is_available():
        defaults["bf16" if torch.cuda.is_bf16_supported() else "fp16"] = True
    else:  # pinned memory only helps copies to a GPU; without one, torch warns on every DataLoader
        defaults["dataloader_pin_memory"] = False
    if checkpointing:
        defaults[checkpointing_keywords_name()] = {"use_reentrant": False}
    args = TrainingArguments(output_dir=output_dir, **{**defaults, **overrides})
    args.lorakit_chunked_loss, args.lorakit_activation_offload = chunked_loss, bool(activation_offload)
    args.lorakit_tiled_mlp = bool(tiled_mlp)
    args.lorakit_eval_by_default = "eval_strategy" not in overrides and not overrides.get("load_best_model_at_end")
    # the rate TrainingArguments chose for lack of one; LoraTrainer replaces it with the plan's if still unchanged
    args.lorakit_default_rate = None if "learning_rate" in overrides else args.learning_rate
    return args


# renamed within transformers 5 (5.25 warns, FutureWarning, on the old names): the name is taken from the fields
RENAMED = (("gradient_checkpointing", "activation_checkpointing"),
           ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))


def current_names(arguments: dict[str, Any]) -> dict[str, Any]:
    """The arguments with each old name given as the name this transformers has (lorakit's docs and `fit` say
    gradient_checkpointing, which every transformers 5 takes), so that nothing warns about a name."""
    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    renamed = dict(arguments)
    for old, new in RENAMED:
        if new in fields and old in renamed and new not in renamed:
            renamed[new] = renamed.pop(old)
    return renamed


def checkpointing_keywords_name() -> str:
    """The TrainingArguments field transformers' Trainer reads the checkpoint function's keywords from."""
    return next(iter(current_names({"gradient_checkpointing_kwargs": None})))


def non_reentrant_checkpointing(args: TrainingArguments | None) -> None:
    """Reentrant checkpointing with frozen inputs leaves LoRA without gradients: where checkpointing is on and no
    keywords were given (in TrainingArguments made without training_args too), the non-reentrant kind."""
    keywords = checkpointing_keywords_name()
    if args is not None and args.gradient_checkpointing and getattr(args, keywords) is None:
        setattr(args, keywords, {"use_reentrant": False})
