"""The three specs a user writes: `Lora`, `Freeze` and `Quant`.

Each field's help text lives in its metadata (peft's convention) so that one
text feeds `--help`, the README and preset validation. Specs validate
themselves in `__post_init__`; checks that need the model (does this module
exist? is block 30 in range?) happen in `wrap`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..core.errors import SpecError, closest
from .blocks import parse_blocks
from .serving_rules import SERVERS, spec_problems

DTYPES = ("float32", "bfloat16", "float16")
INITS = ("default", "gaussian", "pissa", "olora", "loftq")
REWRITES_BASE = ("pissa", "olora")  # inits that move part of the base weights into the adapters


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def _known_fields(cls: type, value: dict) -> dict:
    """`value` if every key is a field of the spec class `cls`; else a SpecError naming the unknown keys."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        near = closest(unknown[0], names)
        raise SpecError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}",
                        hint=(f"did you mean {near[0]!r}? " if near else "") + f"fields are: {', '.join(names)}")
    return value


@dataclass
class Lora:
    """Low-rank adapters, applied by peft."""

    r: int | None = _help("rank of the update B·A; default: the family preset's (adapters_zoo/presets), else 8",
                          default=None)
    alpha: float | None = _help("scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora); "
                                "default: the preset's alpha/r ratio times r, else 2*r", default=None)
    dropout: float | None = _help("dropout on the adapter input, in [0, 1); default: the preset's, else 0",
                                  default=None)
    targets: str | list[str] | None = _help(
        '"attention", "mlp", "all-linear" or module names (suffixes such as "query", or full names); '
        "default: the family preset's", default=None)
    layers: str | list[int] | None = _help('which blocks get adapters: "0-3,7", "last:4"; default: all', default=None)
    rank_pattern: dict[str, int] = _help("per-module rank, peft's rank_pattern (regex or suffix -> r)",
                                         default_factory=dict)
    expert_rank: int | str | None = _help(
        'rank of each expert\'s adapter on fused MoE expert tensors: a number, or "split" for r // num_experts, '
        "at least 1 (with no more experts than r, the tensor's adapters then hold about as many parameters as one "
        "rank-r adapter); alpha follows, keeping the scaling; default: r",
        default=None)
    alpha_pattern: dict[str, float] = _help("per-module alpha, peft's alpha_pattern", default_factory=dict)
    use_rslora: bool = _help("rank-stabilised scaling alpha/sqrt(r) (peft use_rslora)", default=False)
    use_dora: bool = _help("weight-decomposed LoRA (peft use_dora)", default=False)
    bias: str = _help('train biases too: "none", "all" or "lora_only" (peft bias)', default="none")
    train_fully: list[str] = _help("extra modules trained in full and saved with the adapter "
                                   "(peft modules_to_save)", default_factory=list)
    init: str = _help('how adapters start (peft init_lora_weights): "default" (B = 0), "gaussian", "pissa" or '
                      '"olora" (full-precision bases), "loftq" (4-bit bases)', default="default")
    serve_for: str | None = _help('"vllm" or "sglang": refuse what would keep the adapter from being served unmerged '
                                  "there (lorakit check --serve gives the full list for a saved adapter)", default=None)

    def __post_init__(self) -> None:
        if self.init not in INITS:  # not peft's pissa_niter_N: its randomized SVD cannot be rebuilt on resume
            raise SpecError(f"Lora.init must be one of {', '.join(INITS)}, got {self.init!r}",
                            hint=f"did you mean {(closest(str(self.init), INITS) or ['default'])[0]!r}?")
        if self.r is not None and (isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0):
            raise SpecError(f"Lora.r must be a positive integer, got {self.r!r}", hint="typical ranks are 4, 8 or 16")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < math.inf):
            raise SpecError(f"Lora.alpha must be a finite number > 0, got {self.alpha!r}",
                            hint="a common choice is alpha = 2*r")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise SpecError(f"Lora.dropout must be in [0, 1), got {self.dropout!r}", hint="0.05 or 0.1 are usual")
        if self.bias not in ("none", "all", "lora_only"):
            raise SpecError(f'Lora.bias must be "none", "all" or "lora_only", got {self.bias!r}')
        if self.expert_rank is not None and self.expert_rank != "split" and (
                isinstance(self.expert_rank, bool) or not isinstance(self.expert_rank, int) or self.expert_rank <= 0):
            raise SpecError(f'Lora.expert_rank must be a positive integer or "split", got {self.expert_rank!r}',
                            hint='"split" gives each of E experts rank r // E')
        for name, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise SpecError(f"Lora.rank_pattern[{name!r}] must be a positive integer, got {value!r}")
        for name, value in self.alpha_pattern.items():
            if not (isinstance(value, (int, float)) and 0 < value < math.inf):
                raise SpecError(f"Lora.alpha_pattern[{name!r}] must be a finite number > 0, got {value!r}")
        if isinstance(self.targets, str) and "," in self.targets:
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if isinstance(self.targets, (list, tuple)):
            if not self.targets:
                raise SpecError("Lora.targets is an empty list", hint='name modules, or use "all-linear"')
            self.targets = list(self.targets)
        self.layers = parse_blocks(self.layers)
        self.train_fully = list(self.train_fully)
        if self.serve_for is not None:
            if self.serve_for not in SERVERS:
                raise SpecError(f"Lora.serve_for must be one of {', '.join(SERVERS)}, got {self.serve_for!r}")
            problems = spec_problems(self, self.serve_for)
            if problems:
                raise SpecError(f"this Lora cannot be served by {self.serve_for}: " + "; ".join(problems),
                                hint="change those fields, or drop serve_for and merge the adapter instead")

    @classmethod
    def coerce(cls, value: Lora | dict | int | None) -> Lora | None:
        """Accept a `Lora`, a dict of its fields, or a bare rank."""
        if value is None or isinstance(value, Lora):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(r=value)
        if isinstance(value, dict):
            return cls(**_known_fields(cls, value))
        raise SpecError(f"lora must be a lorakit.Lora, a dict or an int rank, got {type(value).__name__}")


@dataclass
class Freeze:
    """Which base parameters to freeze. Everything not frozen is trained in full.

    With LoRA and no Freeze, the whole base is frozen (peft's default) and
    only adapters and head modules train.
    """

    embeddings: bool = _help("freeze the embedding layers", default=False)
    first_layers: int = _help("freeze the first N blocks", default=0)
    last_layers: int = _help("freeze the last N blocks", default=0)
    layers: str | list[int] | None = _help('freeze these blocks: "0-3,7"', default=None)
    patterns: list[str] = _help("freeze parameters whose name matches one of these regexes (re.search)",
                                default_factory=list)
    backbone: bool = _help('"head only": freeze everything except the head modules (transfer learning)',
                           default=False)
    norms: bool | None = _help("True: freeze every norm; False: train every norm; None: norms follow their block",
                               default=None)
    biases: bool | None = _help("True: freeze every bias; False: train every bias; None: follow their module",
                                default=None)
    keep: list[str] = _help("never freeze parameters whose name matches one of these regexes", default_factory=list)

    def __post_init__(self) -> None:
        for knob in ("first_layers", "last_layers"):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"Freeze.{knob} must be a non-negative integer, got {value!r}")
        self.layers = parse_blocks(self.layers)
        self.patterns, self.keep = list(self.patterns), list(self.keep)
        for regex in self.patterns + self.keep:
            try:
                re.compile(regex)
            except re.error as exc:
                raise SpecError(f"Freeze pattern {regex!r} is not a valid regular expression: {exc}") from None
        if not self.is_active():
            raise SpecError("this Freeze spec freezes nothing",
                            hint='set e.g. embeddings=True, first_layers=4, backbone=True, or use freeze=None')

    def is_active(self) -> bool:
        return bool(self.embeddings or self.first_layers or self.last_layers or self.layers or self.patterns
                    or self.backbone or self.norms is not None or self.biases is not None)

    @classmethod
    def parse(cls, text: str) -> Freeze:
        """Read the short form, tokens separated by spaces or ';'.

        ``head-only`` (or ``backbone``), ``embeddings``, ``first:N``, ``last:N``,
        ``layers:0-3,7``, ``re:REGEX``, ``keep:REGEX``, ``norms`` / ``train-norms``,
        ``biases`` / ``train-biases``.
        """
        fields: dict[str, Any] = {"patterns": [], "keep": []}
        for token in re.split(r"[;\s]+", text.strip()):
            if not token:
                continue
            key, _, arg = token.partition(":")
            if token in ("head-only", "backbone"):
                fields["backbone"] = True
            elif token == "embeddings":
                fields["embeddings"] = True
            elif key in ("first", "last") and arg.isdigit():
                fields[f"{key}_layers"] = int(arg)
            elif key == "layers" and arg:
                fields["layers"] = arg
            elif key in ("re", "keep") and arg:
                fields["patterns" if key == "re" else "keep"].append(arg)
            elif token in ("norms", "train-norms"):
                fields["norms"] = token == "norms"
            elif token in ("biases", "train-biases"):
                fields["biases"] = token == "biases"
            else:
                raise SpecError(
                    f"cannot read freeze token {token!r}",
                    hint="use head-only, embeddings, first:N, last:N, layers:0-3,7, re:REGEX, keep:REGEX, "
                         "norms, train-norms, biases, train-biases",
                )
        return cls(**fields)

    @classmethod
    def coerce(cls, value: Freeze | str | dict | None) -> Freeze | None:
        if value is None or isinstance(value, Freeze):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, dict):
            return cls(**_known_fields(cls, value))
        raise SpecError(f"freeze must be a lorakit.Freeze, a dict or a string, got {type(value).__name__}")


@dataclass
class Quant:
    """bitsandbytes quantization of Linear layers (through transformers.BitsAndBytesConfig)."""

    bits: int = _help("8 (LLM.int8) or 4 (QLoRA)", default=4)
    quant_type: str = _help('4-bit data type: "nf4" or "fp4"', default="nf4")
    double_quant: bool = _help("quantize the 4-bit absmax constants again (saves ~0.4 bit/param)", default=True)
    compute_dtype: str | None = _help("dtype of 4-bit matmuls; default: the model's own dtype "
                                      "(so CPU and GPU behave the same)", default=None)
    skip_modules: list[str] = _help("modules kept in full precision, in addition to heads and embeddings",
                                    default_factory=list)
    quant_storage: str | None = _help('dtype the packed 4-bit weights are stored in (bitsandbytes quant_storage); '
                                      'set "bfloat16" for FSDP, which shards all parameters alike', default=None)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise SpecError(f"Quant.bits must be 4 or 8, got {self.bits!r}")
        if self.quant_type not in ("nf4", "fp4"):
            raise SpecError(f'Quant.quant_type must be "nf4" or "fp4", got {self.quant_type!r}')
        if self.compute_dtype not in (None, "float32", "bfloat16", "float16"):
            raise SpecError(f"Quant.compute_dtype must be float32, bfloat16 or float16, got {self.compute_dtype!r}")
        if self.quant_storage not in (None, "uint8", "float32", "bfloat16", "float16"):
            raise SpecError(f"Quant.quant_storage must be uint8, float32, bfloat16 or float16, "
                            f"got {self.quant_storage!r}")
        self.skip_modules = list(self.skip_modules)

    @classmethod
    def coerce(cls, value: Quant | str | int | None) -> Quant | None:
        if value is None or isinstance(value, Quant):
            return value
        if value in ("none", "", 0):
            return None
        named = {"8bit": 8, "8": 8, "int8": 8, "4bit": 4, "4": 4, "nf4": 4, "fp4": 4}.get(str(value).lower())
        if named:
            return cls(bits=named, quant_type="fp4" if str(value).lower() == "fp4" else "nf4")
        raise SpecError(f"unknown quantization {value!r}", hint='use None, "8bit", "4bit" or lorakit.Quant(...)')


def spec_dict(spec: Any) -> dict | None:
    """A JSON-ready dict of a spec (for manifests and reports)."""
    return None if spec is None else dataclasses.asdict(spec)


def torch_dtype(dtype: Any) -> Any:
    """A dtype name ("float32", "bfloat16", "float16") as a torch.dtype; None and torch dtypes pass through."""
    if dtype is None or not isinstance(dtype, str):
        return dtype
    if dtype not in DTYPES:
        raise SpecError(f"unknown dtype {dtype!r}", hint=f"use one of {', '.join(DTYPES)}")
    import torch

    return getattr(torch, dtype)
