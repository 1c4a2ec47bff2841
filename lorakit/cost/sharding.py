"""Sharded training: FSDP2 (through accelerate) and DeepSpeed ZeRO-2/3 (through Trainer), never lorakit's own.

What lorakit sets for them, and nothing else:
  * `kind(args)`: the sharding TrainingArguments ask for: "fsdp" (FSDP2 only), "zero2", "zero3" or None;
  * `quant_for` / `check_storage`: a 4-bit model whose parameters are sharded stores its packed weights in the
    compute dtype (bitsandbytes `quant_storage`), since FSDP and ZeRO-3 shard every parameter alike;
  * `full_value`: one parameter in full on every rank (a collective), for the base fingerprint;
  * `gather_trainable`: the trained tensors in full, for an adapter-only checkpoint (every rank takes part,
    rank 0 writes); `load_trainable`: the same tensors put back into a sharded model on resume;
  * `trainable_digest` / `unchanged`: what the first DeepSpeed step changed, for LoraTrainer's gradient check;
  * `auto_buckets`: DeepSpeed's bucket sizes from the model's hidden size where the config says nothing.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..core.errors import LorakitError
from ..model.fingerprint import gathered
from ..spec.names import base_name
from ..spec.specs import Quant, torch_dtype

SHARDS_PARAMETERS = ("fsdp", "zero3")  # a rank holds a slice of every parameter (ZeRO-2 keeps them whole)
SHARDED_HEAD = "lm_head's weight is sharded (FSDP / ZeRO-3)"  # why the chunked loss is off there
# DeepSpeed's defaults for these are sized for full fine-tuning of large models: reduce_bucket_size is 5e8
# elements, a buffer allocated whole on every rank however few parameters train (2 GB in fp32, 1 GB in bf16).
# Trainer sizes them from the model's hidden size where they say "auto", as Hugging Face's example configs do.
AUTO_BUCKETS = {1: ("reduce_bucket_size",), 2: ("reduce_bucket_size",),
                3: ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")}


def deepspeed_stage(args: Any) -> int | None:
    config = getattr(args, "deepspeed", None)
    if not config:
        return None
    if isinstance(config, str):  # a path to DeepSpeed's JSON, as Trainer accepts it
        try:
            with open(config) as handle:
                config = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise LorakitError(f"cannot read the DeepSpeed config {config}: {exc}",
                               hint="pass a readable JSON file or a dict to training_args(deepspeed=...)") from None
    return int(config.get("zero_optimization", {}).get("stage", 0))


def kind(args: Any) -> str | None:
    """"fsdp", "zero2", "zero3" (ZeRO-1 counts as "zero2": parameters stay whole) or None."""
    if args is None:
        return None
    if getattr(args, "fsdp", None):
        config = getattr(args, "fsdp_config", None) or {}  # TrainingArguments strips the keys' "fsdp_"
        version = int(config.get("version", config.get("fsdp_version", 2)))
        if version != 2:
            raise LorakitError(f"FSDP version {version} is not supported by lorakit: its adapter checkpoints "
                               "and resume are built on FSDP2", hint="use training_args(fsdp=..., fsdp_config="
                               "{'fsdp_version': 2, ...}), transformers' default")
        return "fsdp"
    stage = deepspeed_stage(args)
    if stage is None:
        return None
    return "zero3" if stage == 3 else "zero2"


def auto_buckets(args: Any, model: Any) -> list[str]:
    """Set the DeepSpeed bucket sizes the user's config leaves out (`AUTO_BUCKETS`) to "auto", for Trainer to
    size from the model's hidden size; the keys set. Values the config gives are kept, and a model without a
    hidden size keeps DeepSpeed's defaults (Trainer cannot fill "auto" there)."""
    config = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
    model_config = getattr(model, "config", None)
    if not config or not (getattr(model_config, "hidden_size", None) or getattr(model_config, "hidden_sizes", None)):
        return []
    zero = config.setdefault("zero_optimization", {})
    keys = [key for key in AUTO_BUCKETS.get(int(zero.get("stage", 0)), ()) if key not in zero]
    zero.update(dict.fromkeys(keys, "auto"))
    return keys


def _storage_hint(dtype: str) -> str:
    return (f"quantize with lorakit.Quant(bits=4, quant_storage={dtype!r}) (the compute dtype), or leave "
            "quant_storage unset and pass quant= to LoraTrainer, which sets it")


def quant_for(quant: Any, args: Any, model: Any) -> Any:
    """The 4-bit spec with `quant_storage` set to the compute dtype when `args` shard parameters; an explicit
    storage of another dtype is refused, since FSDP and ZeRO-3 need one dtype for every parameter they shard."""
    quant = Quant.coerce(quant)
    if quant is None or quant.bits != 4 or kind(args) not in SHARDS_PARAMETERS:
        return quant
    model_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    compute = str(torch_dtype(quant.compute_dtype) or model_dtype).removeprefix("torch.")
    if quant.quant_storage is None:
        return dataclasses.replace(quant, quant_storage=compute)
    if quant.quant_storage != compute:
        raise LorakitError(f"{kind(args)} shards the 4-bit weights with the others, but Quant.quant_storage is "
                           f"{quant.quant_storage} and the compute dtype {compute}", hint=_storage_hint(compute))
    return quant


def check_storage(model: Any, args: Any) -> None:
    """Refuse a model quantized beforehand (lorakit.load(quant=...)) whose 4-bit storage cannot be sharded."""
    if kind(args) not in SHARDS_PARAMETERS:
        return
    packed = {p.dtype for p in model.parameters() if type(p).__name__ == "Params4bit"}
    wrong = {dtype for dtype in packed if not dtype.is_floating_point}  # uint8, bitsandbytes' default
    if wrong:
        compute = str(next((p.dtype for p in model.parameters() if p.is_floating_point()), "bfloat16"))
        compute = compute.removeprefix("torch.")
        raise LorakitError(f"{kind(args)} shards every parameter, but this 4-bit model stores its packed weights "
                           f"as {', '.join(sorted(str(d).removeprefix('torch.') for d in wrong))}",
                           hint=_storage_hint(compute))


def gather_trainable(model: Any) -> dict[str, Any]:
    """Every trainable tensor of `model` in full, on the CPU, by its name in `model.state_dict()`. Every rank
    must call it; under FSDP2 only rank 0 gets the tensors (the others an empty dict), which is the one
    that writes."""
    trained = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    if any(type(p).__name__ == "DTensor" for _, p in trained):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(model, options=options)
    with gathered([p for _, p in trained]):  # ZeRO-3: the full tensors exist within this block
        return {name: param.detach().cpu().clone() for name, param in trained}


def stepped(engine: Any) -> bool:
    """Whether DeepSpeed applied an optimizer step in the last backward (between gradient accumulation
    boundaries, or skipped for an fp16 overflow: no)."""
    return engine.was_step_applied()


def trainable_digest(model: Any) -> dict[str, tuple[float, float]]:
    """Per trainable tensor, its float64 sum and sum of squares, in slices of 1M elements (a ZeRO-3 parameter
    gathered alone): what the first step's check compares, where a copy of every trained tensor would cost
    full fine-tuning the whole model twice over on every rank. Every rank must call it under ZeRO-3."""
    import torch

    digests = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        with gathered([param]), torch.no_grad():
            sums = torch.zeros(2, dtype=torch.float64, device=param.device)
            for piece in param.detach().reshape(-1).split(1 << 20):
                piece = piece.double()
                sums += torch.stack([piece.sum(), piece.square().sum()])
            digests[name] = tuple(sums.tolist())
    return digests


def unchanged(before: dict[str, Any], model: Any) -> list[str]:
    """The trainable tensors a DeepSpeed step left as they were (`before`: `trainable_digest` ahead of it):
    they got no gradient. Not lora_A, whose first gradient is zero as long as lora_B is."""
    after = trainable_digest(model)
    return [name for name, value in before.items() if "lora_A" not in name and value == after[name]]


def load_trainable(model: Any, tensors: dict[str, Any]) -> None:
    """Put full tensors (names as in `model.state_dict()`) into an FSDP2 model, each rank keeping its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def load_adapter_files(model: Any, folder: Any, trained_file: str) -> None:
    """Resume under FSDP2: a checkpoint's adapter (peft's file) and trained-in-full tensors (lorakit's, by base
    name) into the sharded model. peft names the saved keys; asking it to name each trainable parameter's
    index gives the way back from a saved key to the parameter."""
    from pathlib import Path

    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    tensors = {}
    if (folder / "adapter_model.safetensors").is_file():
        tags = get_peft_model_state_dict(model, state_dict={n: torch.tensor(i) for i, n in enumerate(names)})
        saved = load_file(str(folder / "adapter_model.safetensors"))
        tensors.update({names[int(tag)]: saved[key] for key, tag in tags.items() if key in saved})
    if (folder / trained_file).is_file():
        by_base = {base_name(n): n for n in names if base_name(n) is not None}
        tensors.update({by_base[key]: value for key, value in load_file(str(folder / trained_file)).items()})
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise LorakitError(f"{folder} lacks {len(missing)} trained tensors, e.g. {missing[0]}",
                           hint="resume from a checkpoint of this run (same LoRA and freeze specs)")
    load_trainable(model, tensors)


def save_fsdp_optimizer(trainer: Any, output_dir: str) -> None:
    """Trainer's FSDP checkpoint without the model: the sharded optimizer state (accelerate's format) and the
    scheduler. The model's trained part is the adapter files; its frozen base is not saved again."""
    import torch
    from accelerate.utils import save_fsdp_optimizer as save

    from transformers.trainer import SCHEDULER_NAME

    save(trainer.accelerator.state.fsdp_plugin, trainer.accelerator, trainer.optimizer, trainer.model, output_dir)
    if trainer.args.should_save:
        torch.save(trainer.lr_scheduler.state_dict(), f"{output_dir}/{SCHEDULER_NAME}")
