"""Check a merged checkpoint against base + adapter run through peft, on a fixed sample batch.

The reference is peft itself (`PeftModel.from_pretrained`, and `add_weighted_adapter` for several
adapters), never lorakit's own merge arithmetic, so a verified merge means peft agrees.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import LorakitError, ModelNotFoundError
from ..model.batches import sample_inputs
from ..model.load import load, quiet_loading
from ..model.tasks import auto_class, task_from_config
from ..model.wrap import quiet_peft, written_by_lorakit
from ..spec.specs import Quant

FP32_TOLERANCE = 1e-4
# A bf16/fp16 merge is checked against base + adapter in fp32 (both run in fp32, the merged weights
# upcast), so the difference is only what rounding the weights costs. The unit is torch.testing's
# default relative tolerance for the dtype (torch.testing.assert_close: bf16 1.6e-2, fp16 1e-3), taken
# of the largest logit, since near-zero logits have no scale of their own.
HALF_RELATIVE_TOLERANCE = {"bfloat16": 1.6e-2, "float16": 1e-3}
DEQUANTIZED_TOLERANCE = 1e-2


def base_model(base: Any, task_config: Any, quant: Any = None) -> Any:
    import torch

    if hasattr(base, "named_parameters"):
        return base
    task = task_from_config(task_config)
    where = str(base)  # its folder when on disk (merge resolved it), else its id
    if quant is not None:
        model = load(where, task=task, quant=quant, num_labels=task_config.num_labels,
                     id2label=task_config.id2label, label2id=task_config.label2id)
    else:
        try:
            # fp32 whatever the checkpoint holds: the reference a bf16/fp16 merge is checked against
            with quiet_loading():
                model = auto_class(task).from_pretrained(where, config=task_config, use_safetensors=True,
                                                         dtype=torch.float32)
        except OSError as exc:
            raise ModelNotFoundError(f"cannot read the base weights in {where}: {str(exc).splitlines()[0]}",
                                     hint="the base needs model.safetensors; lorakit never unpickles "
                                          "pytorch_model.bin (convert it once with save_pretrained)") from None
    return model.eval()


def peft_model(base: Any, loaded: list[dict], task_config: Any, weights: list[float] | None, method: str,
                quant: Any = None) -> Any:
    from peft import PeftModel

    with quiet_peft(as_written=all(written_by_lorakit(a["plan"]) for a in loaded)):
        model = PeftModel.from_pretrained(base_model(base, task_config, quant), str(loaded[0]["folder"]),
                                          adapter_name="adapter0")
        for i, adapter in enumerate(loaded[1:], start=1):
            model.load_adapter(str(adapter["folder"]), adapter_name=f"adapter{i}")
    if len(loaded) > 1:
        names = [f"adapter{i}" for i in range(len(loaded))]
        kwargs = {"density": 0.5} if method in ("ties", "dare_linear", "dare_ties") else {}
        import torch

        torch.manual_seed(0)  # DARE drops at random: the merge and its verification must drop alike
        model.add_weighted_adapter(names, weights or [1.0 / len(loaded)] * len(loaded), "merged",
                                   combination_type=method, **kwargs)
        model.set_adapter("merged")
        for name in names:
            model.delete_adapter(name)
    return model.eval()


def _logits(model: Any, inputs: dict, merged: bool = False) -> Any:
    import torch

    try:
        with torch.no_grad():
            out = model(**inputs)
    except Exception as exc:  # noqa: BLE001 - sorted below: lorakit's sample batch, or the merge itself
        batch = ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items())
        if merged:  # base + adapter ran on this batch: the merged checkpoint is at fault
            raise LorakitError(f"merge verification failed: the merged checkpoint does not run on the batch base + "
                               f"adapter ran on ({batch}): {str(exc).splitlines()[0][:200]}",
                               hint="nothing was written; report this with the adapter and base") from exc
        raise LorakitError(f"the merge cannot be verified: {type(model).__name__} does not run on lorakit's sample "
                           f"batch ({batch}): {str(exc).splitlines()[0][:200]}",
                           hint="nothing was written; merge with verify=False (--no-verify) and check the merged "
                                "model on inputs it takes") from None
    return (out.logits if hasattr(out, "logits") else out[0]).float()


def _rounding_floor(reference_model: Any, inputs: dict, reference: Any, dtype: str) -> float:
    """How far peft's fp32 merge moves the logits once its weights are rounded to `dtype`: the least
    difference any merge stored in that dtype can have from the fp32 reference."""
    import torch

    merged = reference_model.merge_and_unload(safe_merge=True)
    with torch.no_grad():
        for param in merged.parameters():
            param.copy_(param.to(getattr(torch, dtype)).float())
    return float((_logits(merged, inputs) - reference).abs().max())


def verify_merged(base: Any, loaded: list[dict], staging: Path, task_config: Any, weights: list[float] | None,
            method: str, dtype: str | None, into: str) -> dict:
    """Max |logits| difference between base+adapter through peft and the merged checkpoint."""
    import torch

    inputs = sample_inputs(task_config)
    quant_spec = loaded[0]["plan"].get("quant")
    quant = Quant(**quant_spec) if quant_spec else None
    reference_model = peft_model(base, loaded, task_config, weights, method,
                                  quant if into == "dequantized" else None)
    reference = _logits(reference_model, inputs)
    half = dtype in ("bfloat16", "float16")
    # peft's own merge, stored in the merge's dtype (float32 too: a real 30-layer model's fp32 merge moves its
    # logits by about 1.5e-4, SmolLM2-135M), is as far as a right merge can get
    floor = _rounding_floor(reference_model, inputs, reference, dtype if half else "float32") if not hasattr(
        base, "named_parameters") and into == "original" else None
    del reference_model
    # Upcast to fp32: the difference is then what storing the merge in bf16/fp16 costs, not fp32 vs half arithmetic
    with quiet_loading():
        merged = auto_class(task_from_config(task_config)).from_pretrained(str(staging), use_safetensors=True,
                                                                           dtype=torch.float32).eval()
    candidate = _logits(merged, inputs, merged=True)
    difference = float((reference - candidate).abs().max())
    scale = float(reference.abs().max())
    tolerance = HALF_RELATIVE_TOLERANCE[dtype] * scale if half else FP32_TOLERANCE
    if floor is not None:  # allow that plus the fp32 bound, instead of a rule of thumb about the dtype
        tolerance = 1.5 * floor + FP32_TOLERANCE
    if into == "dequantized":
        # The reference runs bitsandbytes' own 4-bit kernel, not the exact dequantized weights; on CPU
        # it differed from them by about 2e-3 in the logits of our tests, hence this looser bound.
        tolerance = max(tolerance, DEQUANTIZED_TOLERANCE)
    figures = {"max_abs_logit_difference": difference, "tolerance": tolerance,
               "max_relative_to_largest_logit": difference / scale if scale else 0.0,
               "rounding_floor": floor, "dtype": dtype,
               "reference": "base + adapter through peft" + (" on the quantized base" if into == "dequantized"
                                                             else ""),
               "sample": {k: list(v.shape) for k, v in inputs.items()}}
    if quant is not None and into == "original":
        figures["quantization_gap"] = _quantization_gap(base, loaded, task_config, quant, inputs, candidate)
    if not difference <= tolerance:
        raise LorakitError(f"merge verification failed: logits differ by {difference:.3g} (tolerance {tolerance:.3g})",
                           hint="nothing was written; report this with the adapter and base")
    return figures


def _quantization_gap(base: Any, loaded: list[dict], task_config: Any, quant: Quant, inputs: dict,
                      candidate: Any) -> dict:
    """The adapter on the quantized base it trained on, against the merged model: a figure, not a check of the
    merge. Where bitsandbytes cannot run that base here (its CPU inference kernels take layers whose sizes are
    whole multiples of their blocks), it says so instead of failing the merge."""
    meaning = "the adapter on the quantized base it trained on, against the merged full-precision model"
    try:
        quantized = _logits(peft_model(base, loaded, task_config, None, "linear", quant), inputs)
    except LorakitError as exc:
        return {"max_abs_logit_difference": None, "meaning": meaning, "not_measured": exc.message}
    return {"max_abs_logit_difference": float((quantized - candidate).abs().max()), "meaning": meaning}
