"""LoraTrainer's memory levers as `fit` climbs them, cheapest first: what `simulate` is given for each, and the
`training_args` keywords that turn it on."""

from __future__ import annotations

METHODS = ("full", "lora", "qlora")

# The levers, cheapest first (lorakit.cost.levers, training_args): each rung keeps the ones before it. Per rung:
# what `simulate` is given, and the `training_args` keywords that turn it on.
_RUNGS = {"none": ({"chunked_loss": False}, {"chunked_loss": False}),
          "chunked loss": ({"chunked_loss": None}, {"chunked_loss": True}),
          "checkpointing": ({"gradient_checkpointing": True}, {"gradient_checkpointing": True}),
          "activation offload": ({"activation_offload": True}, {"activation_offload": True}),
          "tiled MLP": ({"tiled_mlp": None}, {"tiled_mlp": True}),
          "8-bit optimizer": ({"optimizer": "adamw-8bit"}, {"optim": "adamw_bnb_8bit"})}
LADDER = tuple(_RUNGS)


def lever_settings(levers: list[str]) -> dict:
    """What `simulate` is given for these rungs of the ladder."""
    settings: dict = {}
    for rung in ["none", *levers]:
        settings.update(_RUNGS[rung][0])
    return settings


def training_args_for(levers: list[str], micro: int, global_batch: int) -> dict:
    """The `training_args` keywords of these rungs, at this micro-batch and global batch."""
    args: dict = {"per_device_train_batch_size": micro, "gradient_accumulation_steps": global_batch // micro}
    for rung in ["none", *levers]:  # a chunked-loss rung is kept only where the chunked loss ran
        args.update(_RUNGS[rung][1])
    return args


def applies(rung: str, optimizer: str, shard: str | None) -> bool:
    """Whether `fit` climbs this rung for a run with this optimizer and sharding: no 8-bit optimizer beside another
    optimizer or under sharding (DeepSpeed is simulated with the AdamW it partitions; bitsandbytes' optimizer takes
    no FSDP2 DTensor), no tiled MLP under sharding (LoraTrainer tiles MLPs in one process or DDP only)."""
    if rung == "8-bit optimizer":
        return optimizer == "adamw" and not shard
    return not (rung == "tiled MLP" and shard)


_ALLOWED_BY_MODEL = {"chunked loss": "chunked_loss", "tiled MLP": "tiled_mlp"}


def ran(rung: str, settings: dict) -> bool:
    """Whether a simulation with this rung on ran it: a model may not allow the chunked loss or the tiled MLP
    (the run's warnings say why), and `simulate` then leaves it off in its settings."""
    key = _ALLOWED_BY_MODEL.get(rung)
    return key is None or bool(settings[key])
