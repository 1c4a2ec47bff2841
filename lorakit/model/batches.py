"""A small batch that a model's forward takes, built from its config alone.

Merge verification compares logits on it and the architecture tests train on it, so it covers every
input kind lorakit supports: tokens (decoders, encoders, encoder-decoders), pixels (image classifiers),
tokens and pixels (CLIP), image placeholders and pixels (vision-language models), log-mel features
(Whisper) and waveforms (wav2vec 2.0). Token ids avoid the config's special tokens (an image placeholder
or an end-of-text id in the middle of a batch changes what the model does).
"""

from __future__ import annotations

import math
from typing import Any

from ..core.errors import LorakitError
from .tasks import task_from_config

_VLM_FAMILIES = ("llava", "smolvlm", "idefics3", "gemma3", "paligemma", "qwen2_vl", "qwen2_5_vl")


def sample_batch(config: Any, task: str, *, batch_size: int = 2, seq_len: int = 8, labels: bool = True,
                 seed: int = 0) -> dict:
    """Inputs (and, with `labels`, the labels that make the model return a loss) for `task` on `config`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shape = (batch_size, seq_len)
    if task == "image-text-to-text":
        batch = _vision_language(config, batch_size, seq_len, g)
    elif task in ("speech-seq2seq", "audio-cls") or any(
            hasattr(config, a) for a in ("num_mel_bins", "conv_stride", "input_feat_per_channel")):
        batch = _audio(config, task, batch_size, seq_len, g)
    elif task == "image-cls" or (hasattr(config, "num_channels") and not hasattr(config, "vocab_size")
                                 and not hasattr(config, "text_config")):
        size = _side(getattr(config, "image_size", 32))
        batch = {"pixel_values": torch.randn(batch_size, getattr(config, "num_channels", 3), size, size, generator=g),
                 "labels": _classes(config, (batch_size,), g)}
    elif hasattr(config, "text_config") and hasattr(config, "vision_config"):  # a dual encoder: CLIP, SigLIP
        text, vision = config.text_config, config.vision_config
        ids = _tokens(config, (batch_size, min(seq_len, getattr(text, "max_position_embeddings", seq_len))), g)
        if getattr(text, "bos_token_id", None) is not None:
            ids[:, 0] = text.bos_token_id
        ids[:, -1] = text.vocab_size - 1  # CLIP pools where the largest id is when its eos id is the legacy 2
        size, channels = _side(vision.image_size), getattr(vision, "num_channels", 3)
        batch = {"input_ids": ids, "pixel_values": torch.randn(batch_size, channels, size, size, generator=g),
                 "return_loss": True}
    else:
        ids = _tokens(config, shape, g)
        batch = {"input_ids": ids}
        if task != "causal-lm":  # encoders read a padding mask (and check for padding without one)
            batch["attention_mask"] = torch.ones_like(ids)
        if task in ("causal-lm", "masked-lm"):
            batch["labels"] = ids.clone()
        elif task == "seq-cls":
            batch["labels"] = _classes(config, (batch_size,), g)
        elif task == "token-cls":
            batch["labels"] = _classes(config, shape, g)
        elif task == "seq2seq" or getattr(config, "is_encoder_decoder", False):
            batch["labels"] = _tokens(config, (batch_size, max(seq_len // 2, 1)), g)
    return batch if labels else _without_labels(batch, config, task)


def _without_labels(batch: dict, config: Any, task: str) -> dict:
    """Inputs only; an encoder-decoder then takes decoder inputs of its own (the labels made them)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "return_loss")}
    if task in ("seq2seq", "speech-seq2seq") or (task == "base" and getattr(config, "is_encoder_decoder", False)):
        inputs["decoder_input_ids"] = batch["labels"].clamp(min=0)
    return inputs


def _side(size: Any) -> int:
    return size if isinstance(size, int) else size[0]


def _special_ids(config: Any) -> set[int]:
    ids = set()
    for part in (config, getattr(config, "text_config", None)):
        for key, value in (part.to_dict() if part is not None else {}).items():
            if key.endswith(("_token_id", "_token_index")) and isinstance(value, int):
                ids.add(value)
            elif key.endswith("_token_id") and isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
    return ids


def _tokens(config: Any, shape: tuple, g: Any) -> Any:
    import torch

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None) or 100
    special = _special_ids(config)
    allowed = torch.tensor([i for i in range(min(vocab, 1000)) if i not in special])
    return allowed[torch.randint(len(allowed), shape, generator=g)]


def _classes(config: Any, shape: tuple, g: Any) -> Any:
    import torch

    return torch.randint(max(getattr(config, "num_labels", 2), 1), shape, generator=g)


def _audio(config: Any, task: str, batch_size: int, seq_len: int, g: Any) -> dict:
    import torch

    if hasattr(config, "num_mel_bins"):  # Whisper: log-mel frames, exactly twice its encoder positions
        features = torch.randn(batch_size, config.num_mel_bins, 2 * config.max_source_positions, generator=g)
        batch = {"input_features": features}
    elif hasattr(config, "input_feat_per_channel"):  # Speech2Text: filter-bank frames, (batch, time, features)
        features = torch.randn(batch_size, 32, config.input_feat_per_channel * getattr(config, "input_channels", 1),
                               generator=g)
        batch = {"input_features": features}
    elif hasattr(config, "conv_stride"):  # wav2vec 2.0 and kin: 32 frames of the feature encoder (SpecAugment
        # masks up to 10 of them)
        batch = {"input_values": torch.randn(batch_size, 32 * math.prod(config.conv_stride), generator=g)}
    else:
        raise LorakitError(f"lorakit cannot build a sample batch for a {config.model_type} audio model",
                           hint="merge with verify=False (--no-verify) and check the merged model yourself")
    if task == "audio-cls":
        batch["labels"] = _classes(config, (batch_size,), g)
    else:
        batch["labels"] = _tokens(config, (batch_size, max(seq_len // 2, 1)), g)
    return batch


def _vision_language(config: Any, batch_size: int, seq_len: int, g: Any) -> dict:
    """One image per row: its placeholder tokens (as many as the model turns the image into), then text."""
    import torch

    family, vision = config.model_type, config.vision_config
    if family not in _VLM_FAMILIES:
        raise LorakitError(f"lorakit cannot build a sample batch for a {family} vision-language model",
                           hint=f"families it can: {', '.join(_VLM_FAMILIES)}; pass a merge or batch of your own "
                                "(merge(..., verify=False) skips the check that needs it)")
    size = _side(getattr(vision, "image_size", 0))  # Qwen2-VL takes patches of any grid: no image size
    extra, before, after = {}, [], []
    if family == "llava":
        count = (size // vision.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")
        pixels = torch.randn(batch_size, vision.num_channels, size, size, generator=g)
    elif family in ("smolvlm", "idefics3"):
        count = (size // vision.patch_size) ** 2 // config.scale_factor ** 2
        pixels = torch.randn(batch_size, 1, vision.num_channels, size, size, generator=g)
    elif family == "paligemma":
        count = config.text_config.num_image_tokens
        pixels = torch.randn(batch_size, vision.num_channels, size, size, generator=g)
    elif family == "gemma3":
        count = config.mm_tokens_per_image
        pixels = torch.randn(batch_size, vision.num_channels, size, size, generator=g)
        before, after = [config.boi_token_id], [config.eoi_token_id]
    else:  # Qwen2-VL: flattened patches of a (1, 2m, 2m) grid, m patches merged per side into one token
        merge = vision.spatial_merge_size
        grid = (1, 2 * merge, 2 * merge)
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        pixels = torch.randn(batch_size * math.prod(grid), patch, generator=g)
        count = math.prod(grid) // merge ** 2
        extra["image_grid_thw"] = torch.tensor([grid] * batch_size)
        before, after = [config.vision_start_token_id], [config.vision_end_token_id]
    image = config.image_token_id
    prefix = torch.tensor([before + [image] * count + after] * batch_size, dtype=torch.long)
    ids = torch.cat([prefix, _tokens(config, (batch_size, seq_len), g)], dim=1)
    is_image = ids == image
    if family == "gemma3":
        extra["token_type_ids"] = is_image.long()  # bidirectional attention among an image's tokens
    if family == "paligemma":
        extra["token_type_ids"] = (~is_image).long()  # the image is the prefix, the text the suffix it learns
    if family in ("qwen2_vl", "qwen2_5_vl"):
        extra["mm_token_type_ids"] = is_image.int()
    return {"input_ids": ids, "pixel_values": pixels, "labels": ids.masked_fill(is_image, -100), **extra}


def sample_inputs(config: Any) -> dict:
    """A fixed batch of inputs for a model's task, the one merge and GGUF verification compare logits on."""
    return sample_batch(config, task_from_config(config), seq_len=16, labels=False)
