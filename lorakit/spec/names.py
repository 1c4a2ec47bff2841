"""Facts about module and parameter names and kinds, asked in one place.

Nothing here decides what a spec does (that is `plan`): these functions only
answer "does this suffix match?", "what kind of layer is this?", "what is this
peft parameter called in the base model?", "which task does this class do?".
"""

from __future__ import annotations

from typing import Any

# Architecture-name endings -> task, to default the task from a config's architectures or a model's class.
ARCHITECTURE_TASKS = (
    ("ForSequenceClassification", "seq-cls"), ("ForTokenClassification", "token-cls"),
    ("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"), ("ForConditionalGeneration", "seq2seq"),
    ("ForImageClassification", "image-cls"), ("ForMaskedLM", "masked-lm"),
)
# peft's parameter-name markers for adapter tensors
LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def suffix_match(name: str, suffix: str) -> bool:
    """`suffix` names `name` itself or its last dotted parts (peft's rule for target_modules)."""
    return name == suffix or name.endswith("." + suffix)


def under(name: str, prefixes: Any) -> bool:
    """`name` is one of `prefixes` or lies inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def outermost(names: Any) -> list[str]:
    """The names not inside another of them (`classifier`, not also `classifier.dense`)."""
    chosen = set(names)
    return sorted(n for n in chosen if not any(n.startswith(o + ".") for o in chosen))


# A class's task, from transformers' own Auto-class tables first: endings cannot tell a vision-language
# model, Whisper and T5 apart ("ForConditionalGeneration"), see that wav2vec2's "ForSequenceClassification"
# classifies audio, or that MarianMTModel translates. The more specific tables come first (Gemma 3's
# ForConditionalGeneration is in the causal-LM table too).
MAPPED_TASKS = (("audio-cls", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES"),
                ("image-text-to-text", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
                ("speech-seq2seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES"),
                ("seq2seq", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
                ("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
                ("masked-lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES"),
                ("seq-cls", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
                ("token-cls", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
                ("image-cls", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES"))


def task_of_class(class_name: str) -> str | None:
    from transformers.models.auto import modeling_auto

    for task, table in MAPPED_TASKS:
        classes = getattr(modeling_auto, table).values()
        if any(class_name == c or isinstance(c, tuple) and class_name in c for c in classes):
            return task
    return next((task for ending, task in ARCHITECTURE_TASKS if class_name.endswith(ending)), None)


def adaptable_kind(module: Any) -> str | None:
    """What peft can put LoRA on: "Linear" (bitsandbytes layers subclass it), "Conv1D", "Conv2d",
    "Embedding"; None for anything else."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return "Linear"
    if isinstance(module, Conv1D):
        return "Conv1D"
    if isinstance(module, torch.nn.Conv2d):
        return "Conv2d"
    if isinstance(module, torch.nn.Embedding):
        return "Embedding"
    return None


def is_router(module: Any) -> bool:
    """An MoE layer's router (transformers 5: `*TopKRouter`, `*Router`), whatever it subclasses."""
    return type(module).__name__.lower().endswith("router")


def expert_tensors(module: Any) -> list[str]:
    """The names of this module's fused 3D expert tensors: transformers 5 keeps an MoE layer's experts as 3D
    parameters of an `*Experts` module, not as Linear layers (peft adapts them through target_parameters)."""
    if not type(module).__name__.endswith("Experts"):
        return []
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.is_floating_point()]


def is_norm(module: Any) -> bool:
    return "norm" in type(module).__name__.lower()


def module_kind(module: Any) -> str:
    """The kind a report groups by: Linear (Conv1D and quantized layers too), Conv, Embedding, Norm, or the
    class name."""
    kind = adaptable_kind(module)
    if is_router(module):
        return "Router"
    if expert_tensors(module):
        return "Experts"
    if kind in ("Linear", "Conv1D"):
        return "Linear"
    if kind == "Conv2d" or type(module).__name__.startswith("Conv"):
        return "Conv"
    if kind == "Embedding" or "Embedding" in type(module).__name__:
        return "Embedding"
    return "Norm" if is_norm(module) else type(module).__name__


def shape_of(param: Any) -> tuple[int, ...]:
    """A parameter's shape as its layer uses it, never its storage's: bitsandbytes packs a 4-bit weight into
    bytes ([n/2, 1]) and keeps the real shape in its quant state; ZeRO-3 leaves an empty tensor in place of
    each parameter (the full shape is ds_shape)."""
    state = getattr(param, "quant_state", None)
    if state is not None:
        return tuple(state.shape)
    return tuple(getattr(param, "ds_shape", None) or param.shape)


def is_packed(param: Any) -> bool:
    """A bitsandbytes 8/4-bit weight: its storage dtype (uint8, int8, or the quant_storage a 4-bit weight is kept
    in for sharding, bf16 say) is not the dtype of the values it holds."""
    return type(param).__name__ in ("Params4bit", "Int8Params")


def bnb_bits(module: Any) -> int | None:
    """8 or 4 for a bitsandbytes layer (Linear8bitLt, Linear4bit and their subclasses: told by class, so that it
    needs no bitsandbytes import), None for anything else, peft's wrappers of them included. Its weight is
    packed (`is_packed`) unless the layer was never filled: a head the checkpoint lacked, say."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in ("Linear4bit", "Linear8bitLt"):
            return 4 if cls.__name__ == "Linear4bit" else 8
    return None


def out_features(module: Any) -> int:
    """Output features of a Linear/Conv1D weight (Conv1D stores its weight transposed)."""
    shape = shape_of(module.weight)
    return shape[1] if adaptable_kind(module) == "Conv1D" else shape[0]


def output_embedding_names(model: Any) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    output = get() if callable(get) else None
    return {n for n, m in model.named_modules() if output is not None and m is output}


# ---- peft's names ------------------------------------------------------------

def peft_role(name: str) -> tuple[str, str]:
    """(role, name in the unwrapped base) of a parameter or module name of a peft-wrapped model.

    role is "lora" (adapter weights, named by the module they adapt), "copy" (a modules_to_save
    copy, named by the module it copies) or "base"."""
    stripped = name.removeprefix("base_model.model.")
    if "lora_" in stripped:  # nested wrappers (several expert tensors of one module) add .base_layer
        return "lora", stripped.split(".lora_")[0].replace(".base_layer", "")
    if ".modules_to_save." in stripped:
        return "copy", stripped.split(".modules_to_save")[0]
    return "base", stripped.replace(".base_layer", "").replace(".original_module", "")


def base_name(name: str) -> str | None:
    """A parameter's name in the unwrapped base model, or None for peft's own (LoRA, copies)."""
    role, original = peft_role(name)
    return original if role == "base" else None


def adapter_key(key: str) -> tuple[str, str | None]:
    """A key of adapter_model.safetensors as (module name in the base, LoRA part), or (base parameter
    name, None) for a tensor of a module trained in full (peft saves those under their base names)."""
    name = key.removeprefix("base_model.model.")
    for part in LORA_PARTS:
        marker = f".{part}"
        if marker in name:
            return name.split(marker)[0], part
    return name, None
