"""The tasks lorakit knows, each with its transformers Auto class, and a model built from a config for one."""

from __future__ import annotations

import copy
from typing import Any

from ..core.errors import LorakitError, SpecError, closest
from ..spec.names import task_of_class
from ..spec.specs import torch_dtype


TASKS = {
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "token-cls": "AutoModelForTokenClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "image-cls": "AutoModelForImageClassification",
    "masked-lm": "AutoModelForMaskedLM",
    "image-text-to-text": "AutoModelForImageTextToText",
    "speech-seq2seq": "AutoModelForSpeechSeq2Seq",
    "audio-cls": "AutoModelForAudioClassification",
    "base": "AutoModel",
}


def check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        near = closest(task, TASKS)
        raise SpecError(f"unknown task {task!r}",
                        hint=f"tasks are: {', '.join(TASKS)}" + (f"; did you mean {near[0]!r}?" if near else ""))


def task_from_config(config: Any) -> str:
    for architecture in getattr(config, "architectures", None) or []:
        task = task_of_class(architecture)
        if task is not None:
            return task
    return "base"


def auto_class(task: str) -> Any:
    import transformers

    return getattr(transformers, TASKS[task])


def build_from_config(config: Any, task: str | None = None, *, meta: bool = False,
                      trust_remote_code: bool = False, dtype: Any = None) -> Any:
    """A model of `config`'s architecture with fresh weights, or none at all on the meta device."""
    import torch

    check_task(task)
    task = task or task_from_config(config)
    cls = auto_class(task)
    config = with_architectures(config)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = torch_dtype(dtype)
    try:
        if meta:  # no weights to partition: transformers' own switch keeps DeepSpeed's zero.Init out (ZeRO-3 runs)
            from transformers.modeling_utils import set_zero3_state

            with torch.device("meta"), set_zero3_state():
                return cls.from_config(config, **kwargs)
        return cls.from_config(config, **kwargs)
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as exc:  # RuntimeError: bad dimensions
        raise LorakitError(f"cannot build a {task} model from this {config.model_type} config: {exc}",
                           hint=f"pick another task with task=... (one of {', '.join(TASKS)})") from None


def with_architectures(config: Any) -> Any:
    """The config as transformers' Auto classes can build it: they iterate `architectures` when a config type
    has several classes (DeiT), so a config without any gets an empty list (on a copy)."""
    if getattr(config, "architectures", None) is not None:
        return config
    config = copy.copy(config)
    config.architectures = []
    return config
