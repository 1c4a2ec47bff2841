"""Can an adapter be served unmerged, next to others on one base (vLLM, SGLang)? Each rule it breaks, with the fix.

vLLM's rules are read from its source: `vllm/lora/peft_helper.py` (PEFTHelper._validate_features and
validate_legal) and `vllm/config/lora.py` (max_lora_rank is one of MaxLoRARanks, default 16; the extra
vocabulary is gone). Both servers load only peft's lora_A/lora_B tensors from adapter_model.safetensors:
whatever else an adapter carries (heads trained in full, biases, DoRA magnitudes, lorakit's own
trained-in-full file, fused-expert `target_parameters`) is refused or silently dropped. SGLang reads the
same adapter_config.json (`sglang/srt/lora/lora_config.py`) and sizes its pool from the adapters' ranks,
so it has no fixed rank set. The merge path (`lorakit merge`, which folds everything in) has none of these limits.

`note_unservable` is the one line LoraTrainer.save_model logs for a final adapter that breaks a rule: of the server
its Lora named (serve_for), else of vLLM, the usual unmerged server; nothing when it can be served as it is, and
nothing for checkpoints. A merge gets no such line: serving the merged model as a plain model is itself the fix
every rule names, and the merged folder has no adapter rules left.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import LorakitError, SpecError
from ..spec.serving_rules import SERVERS, VLLM_DEFAULT_RANK, VLLM_INITS, VLLM_MODULES_TO_SAVE, VLLM_RANKS
from .format import MANIFEST, saved_plan
from .format import TRAINED as TRAINED_FILE
EMBEDDINGS = ("embed_tokens", "lm_head", "wte", "embed_in", "word_embeddings", "output")
logger = logging.getLogger("lorakit")
MERGE = "merge it instead (lorakit merge --base BASE --adapter DIR --out DIR) and serve the merged model"


@dataclass(frozen=True)
class Breach:
    """One serving rule the adapter breaks."""

    rule: str  # the adapter_config.json field or file the rule is about
    problem: str
    fix: str

    def line(self) -> str:
        return f"{self.rule}: {self.problem}; fix: {self.fix}"


def _tensors(folder: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        return {}
    with safe_open(str(file), "pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def _base_vocab(config: dict, folder: Path) -> int | None:
    """The base's vocabulary size, when the base named by the adapter is a local folder."""
    base = Path(str(config.get("base_model_name_or_path") or "")).expanduser()
    if base.is_absolute() or (folder / base).is_dir():
        base_config = (base if base.is_absolute() else folder / base) / "config.json"
        if base_config.is_file():
            data = json.loads(base_config.read_text())
            return data.get("vocab_size") or data.get("text_config", {}).get("vocab_size")
    return None


def serving_breaches(adapter: str | Path, server: str = "vllm") -> list[Breach]:
    """Every rule of `server` the adapter folder breaks (empty: it can be served as it is)."""
    if server not in SERVERS:
        raise SpecError(f"unknown server {server!r}", hint=f"servers lorakit checks for: {', '.join(SERVERS)}")
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise LorakitError(f"{folder} has no adapter_config.json: not a peft adapter folder",
                           hint="pass the folder save_pretrained / LoraTrainer wrote")
    config = json.loads((folder / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        return [Breach("peft_type", f"a {config['peft_type']} adapter; servers load LoRA only", MERGE)]
    tensors = _tensors(folder)
    found = []
    rank = max([int(config.get("r", 8)), *map(int, (config.get("rank_pattern") or {}).values())])
    if server == "vllm" and rank > VLLM_RANKS[-1]:
        found.append(Breach("r", f"rank {rank} is above {VLLM_RANKS[-1]}, vLLM's largest max_lora_rank",
                            f"train with r <= {VLLM_RANKS[-1]}, or {MERGE}"))
    elif server == "vllm" and rank > VLLM_DEFAULT_RANK:
        allowed = next(r for r in VLLM_RANKS if r >= rank)
        found.append(Breach("r", f"rank {rank} is above vLLM's default max_lora_rank {VLLM_DEFAULT_RANK}",
                            f"start vLLM with --max-lora-rank {allowed} (it allows only {VLLM_RANKS}), or train with "
                            f"r <= {VLLM_DEFAULT_RANK}"))
    saved = [m for m in config.get("modules_to_save") or []
             if server != "vllm" or m not in VLLM_MODULES_TO_SAVE]
    if saved:
        found.append(Breach("modules_to_save", f"{', '.join(saved)} trained in full and saved with the adapter: "
                            f"{server} does not load them", f"{MERGE}; or train them as LoRA targets, not in full "
                            "(Lora(train_fully=[]), and a head that is not resized)"))
    if config.get("use_dora"):
        found.append(Breach("use_dora", f"DoRA: {server} applies plain LoRA only",
                            f"train with Lora(use_dora=False), or {MERGE}"))
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        found.append(Breach("bias", f"trained biases ({config.get('bias')!r}, lora_bias={config.get('lora_bias')}): "
                            f"{server} loads no adapter bias", f"train with Lora(bias='none'), or {MERGE}"))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INITS:
        found.append(Breach("init_lora_weights", f"{init!r} rewrites the base weights when peft loads the adapter; "
                            f"{server} serves the unmodified base", "convert it to a plain LoRA with peft's "
                            f"path_initial_model_for_weight_conversion, or {MERGE}"))
    for key, what in (("alora_invocation_tokens", "Activated LoRA"), ("layer_replication", "layer_replication"),
                      ("use_qalora", "QALoRA")):
        if config.get(key):
            found.append(Breach(key, f"{what}: {server} does not implement it", MERGE))
    if config.get("target_parameters"):
        found.append(Breach("target_parameters", f"adapters on fused MoE expert tensors "
                            f"({', '.join(config['target_parameters'])}): {server} does not load them from "
                            "peft's format", MERGE))
    if (folder / TRAINED_FILE).is_file():
        found.append(Breach(TRAINED_FILE, f"tensors lorakit trained in full outside peft: {server} ignores the file",
                            MERGE))
    found += _embedding_breaches(config, tensors, folder, server)
    return found


def _embedding_breaches(config: dict, tensors: dict, folder: Path, server: str) -> list[Breach]:
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    on_embeddings = sorted({t.rpartition(".")[2] for t in targets if t.rpartition(".")[2] in EMBEDDINGS} |
                           {k.split(".lora_embedding_")[0].rpartition(".")[2] for k in tensors if "lora_embedding_" in k})
    found = []
    if on_embeddings:
        found.append(Breach("target_modules", f"LoRA on {', '.join(on_embeddings)}: {server} adapts embeddings and "
                            "the output head only on the model classes that declare them (embedding_modules), and "
                            "refuses the adapter elsewhere", f"leave them out of Lora(targets=...), or {MERGE}"))
    vocab = _base_vocab(config, folder)
    rows = {shape[0] for key, shape in tensors.items() if "lora_" not in key and len(shape) == 2
            and key.rpartition(".")[0].rpartition(".")[2] in EMBEDDINGS}
    rows |= {shape[1] for key, shape in tensors.items() if "lora_embedding_A" in key}
    if vocab is not None and rows - {vocab}:
        found.append(Breach("vocabulary", f"the adapter's vocabulary ({', '.join(map(str, sorted(rows)))} tokens) "
                            f"differs from the base's ({vocab}): {server} serves the base vocabulary only", MERGE))
    return found


def note_unservable(adapter: str | Path) -> str | None:
    """Log (lorakit's logger, level WARNING) and return one line when the saved adapter breaks a serving rule:
    the rules of its Lora's serve_for, else vLLM's. None, and silence, when it breaks none or is no adapter
    (freeze-only training saves no adapter_config.json)."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        return None
    manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else None
    server = (saved_plan(manifest).get("lora") or {}).get("serve_for") or "vllm"
    try:
        breaches = serving_breaches(folder, server)
    except LorakitError:  # a note after a save that worked must not fail it
        return None
    if not breaches:
        return None
    rules = ", ".join(dict.fromkeys(b.rule for b in breaches))
    text = (f"{folder} cannot be served unmerged by {server} as saved ({rules}): `lorakit check {folder} "
            f"--serve {server}` gives each fix; a merged model (lorakit merge) has no such limits")
    logger.warning(text)
    return text
