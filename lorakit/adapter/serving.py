"""Can an adapter be served unmerged, next to others on one base (vLLM, SGLang)? Each rule it breaks, with the fix.

vLLM's rules are read from its source (`vllm/lora/peft_helper.py`: PEFTHelper._validate_features and
validate_legal; `vllm/config/lora.py`: max_lora_rank is one of MaxLoRARanks, default 16; `lora_model.py`: the
vocabulary and unexpected-module checks; each model class's `embedding_modules`, listed per architecture in
spec/vllm_embedding_lora.json) and each was tried in vLLM 0.32.0 itself (tests/deploy/test_vllm.py): a rule that
vLLM enforces by refusing carries vLLM's own words (`Breach.says`); the one it does not (lorakit's trained-in-full
file) is a rule because vLLM then answers otherwise. SGLang reads the same adapter_config.json
(`sglang/srt/lora/lora_config.py`) and sizes its pool from the adapters' ranks, so it has no fixed rank set; its
rules are read from its source and not run (no CPU build in the package registry). The merge path (`lorakit
merge`, which folds everything in) has none of these limits.

`note_unservable` is the one line LoraTrainer.save_model logs for a final adapter that breaks a rule: of the server
its Lora named (serve_for), else of vLLM, the usual unmerged server; nothing when it can be served as it is, and
nothing for checkpoints. A merge gets no such line: serving the merged model as a plain model is itself the fix
every rule names, and the merged folder has no adapter rules left.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import LorakitError, SpecError
from ..spec.serving_rules import (SERVERS, VLLM_CHECKED, VLLM_DEFAULT_RANK, VLLM_INITS, VLLM_MODULES_TO_SAVE,
                                  VLLM_RANKS)
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
    says: str = ""  # vLLM's own words when it refuses (tested in vLLM); "": it loads the adapter and answers otherwise

    def line(self) -> str:
        return f"{self.rule}: {self.problem}; fix: {self.fix}"


def _tensors(folder: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        return {}
    with safe_open(str(file), "pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def _base_config(config: dict, folder: Path, base: str | Path | None) -> dict | None:
    """The base's config.json, when the base (`base`, else the one the adapter names) is a local folder."""
    named = Path(str(base if base is not None else config.get("base_model_name_or_path") or "")).expanduser()
    for candidate in (named, folder / named):
        if str(named) not in ("", ".") and (candidate / "config.json").is_file():
            return json.loads((candidate / "config.json").read_text())
    return None


def serving_breaches(adapter: str | Path, server: str = "vllm", *, max_lora_rank: int | None = None,
                     base: str | Path | None = None) -> list[Breach]:
    """Every rule of `server` the adapter folder breaks (empty: it can be served as it is). `max_lora_rank`: the
    server's (vLLM's default, 16, when None); `base`: the base model folder (default: the one the adapter names)."""
    if server not in SERVERS:
        raise SpecError(f"unknown server {server!r}", hint=f"servers lorakit checks for: {', '.join(SERVERS)}")
    if max_lora_rank is not None and max_lora_rank not in VLLM_RANKS:
        raise SpecError(f"max_lora_rank {max_lora_rank}: vLLM takes only {', '.join(map(str, VLLM_RANKS))}",
                        hint="give the value your vLLM server was started with")
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
    limit = max_lora_rank or VLLM_DEFAULT_RANK
    says = f"LoRA rank {rank} is greater than max_lora_rank {limit}."
    if server == "vllm" and rank > VLLM_RANKS[-1]:
        found.append(Breach("r", f"rank {rank} is above {VLLM_RANKS[-1]}, vLLM's largest max_lora_rank",
                            f"train with r <= {VLLM_RANKS[-1]}, or {MERGE}", says))
    elif server == "vllm" and rank > limit:
        allowed = next(r for r in VLLM_RANKS if r >= rank)
        found.append(Breach("r", f"rank {rank} is above the server's max_lora_rank {limit}"
                            f"{' (vLLM’s default)' if max_lora_rank is None else ''}",
                            f"start vLLM with --max-lora-rank {allowed} (it allows only {VLLM_RANKS}), or train with "
                            f"r <= {limit}", says))
    saved = [m for m in config.get("modules_to_save") or []
             if server != "vllm" or m not in VLLM_MODULES_TO_SAVE]
    if saved:
        found.append(Breach("modules_to_save", f"{', '.join(saved)} trained in full and saved with the adapter: "
                            f"{server} does not load them", f"{MERGE}; or train them as LoRA targets, not in full "
                            "(Lora(train_fully=[]), and a head that is not resized)",
                            "vLLM only supports modules_to_save being either None or"))
    if config.get("use_dora"):
        found.append(Breach("use_dora", f"DoRA: {server} applies plain LoRA only",
                            f"train with Lora(use_dora=False), or {MERGE}", "vLLM does not yet support DoRA."))
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        found.append(Breach("bias", f"trained biases ({config.get('bias')!r}, lora_bias={config.get('lora_bias')}): "
                            f"{server} loads no adapter bias, and vLLM refuses bias={config.get('bias')!r} even on a "
                            "model without biases", f"train with Lora(bias='none'), or {MERGE}",
                            "Adapter bias is not supported." if config.get("bias", "none") != "none" else
                            "vLLM does not support LoRA bias (lora_bias)."))
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in VLLM_INITS:
        found.append(Breach("init_lora_weights", f"{init!r} rewrites the base weights when peft loads the adapter; "
                            f"{server} serves the unmodified base", "convert it to a plain LoRA with peft's "
                            f"path_initial_model_for_weight_conversion, or {MERGE}",
                            f"vLLM does not support init_lora_weights={init!r}."))
    for key, what, says in (("alora_invocation_tokens", "Activated LoRA", "Activated LoRA (aLoRA)"),
                            ("layer_replication", "layer_replication", "layer_replication"),
                            ("use_bdlora", "block-diagonal LoRA", "block-diagonal LoRA (BD-LoRA)"),
                            ("use_qalora", "QALoRA", "QALoRA")):
        if config.get(key):
            found.append(Breach(key, f"{what}: {server} does not implement it", MERGE, f"vLLM does not support {says}."))
    if config.get("target_parameters"):
        found.append(Breach("target_parameters", f"adapters on fused MoE expert tensors "
                            f"({', '.join(config['target_parameters'])}): peft's 3D format, which vLLM refuses "
                            "unless told", "start vLLM with --enable-mixed-moe-lora-format and load the adapter with "
                            "is_3d_lora_weight (--lora-modules '{\"name\": ..., \"path\": ..., \"is_3d_lora_weight\": "
                            f"true}}'): vLLM's own fix, not run here (its CPU build has no MoE LoRA kernel); or {MERGE}",
                            "contains fused 3D MoE weights"))
    if (folder / TRAINED_FILE).is_file():
        found.append(Breach(TRAINED_FILE, f"tensors lorakit trained in full outside peft (blocks left unfrozen): "
                            f"{server} ignores the file and answers as if they were never trained", MERGE))
    found += _embedding_breaches(config, tensors, _base_config(config, folder, base), server)
    return found


def _embedding_breaches(config: dict, tensors: dict, base: dict | None, server: str) -> list[Breach]:
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    on_embeddings = sorted({t.rpartition(".")[2] for t in targets if t.rpartition(".")[2] in EMBEDDINGS} |
                           {k.split(".lora_embedding_")[0].rpartition(".")[2] for k in tensors if "lora_embedding_" in k})
    found = []
    architecture = ((base or {}).get("architectures") or [None])[0]
    served = _vllm_embedding_lora().get(architecture) if server == "vllm" else None
    if on_embeddings and not (served is not None and set(on_embeddings) <= set(served)):
        which = ("SGLang's classes are not listed here" if server != "vllm" else
                 f"its vLLM class for {architecture} adapts {', '.join(served) or 'no embedding'}" if served is not None
                 else f"{architecture} is not among the architectures vLLM {VLLM_CHECKED} was read for" if architecture
                 else "the base is not at hand to tell its architecture (pass --base)")
        found.append(Breach("target_modules", f"LoRA on {', '.join(on_embeddings)}: {server} adapts embeddings and "
                            f"the output head only on the model classes that declare them; {which}",
                            f"leave them out of Lora(targets=...), or {MERGE}",
                            "expected target modules in" if served is not None else ""))
    vocab = (base or {}).get("vocab_size") or (base or {}).get("text_config", {}).get("vocab_size")
    rows = {shape[0] for key, shape in tensors.items() if "lora_" not in key and len(shape) == 2
            and key.rpartition(".")[0].rpartition(".")[2] in EMBEDDINGS}
    lora_rows = {shape[1] for key, shape in tensors.items() if "lora_embedding_A" in key}
    if vocab is not None and (rows | lora_rows) - {vocab}:
        found.append(Breach("vocabulary", f"the adapter's vocabulary ({', '.join(map(str, sorted(rows | lora_rows)))} "
                            f"tokens) differs from the base's ({vocab}): {server} serves the base vocabulary only",
                            MERGE, "must be consistent with the base model's vocabulary size" if lora_rows - {vocab}
                            else "is unsupported LoRA weight"))
    return found


@functools.cache
def _vllm_embedding_lora() -> dict[str, list[str]]:
    """Architecture -> the embedding modules its vLLM class adapts ([] where it adapts none), read from vLLM."""
    data = json.loads((Path(__file__).parents[1] / "spec" / "vllm_embedding_lora.json").read_text())
    return {**{name: [] for name in data["no_embedding_lora"]}, **data["embedding_modules"]}


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
