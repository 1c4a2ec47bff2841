"""Serve adapters in vLLM itself and compare its answers with transformers + peft: what `lorakit check --run` does.

vLLM runs in its side environment (vllm_env.py) through vllm_worker.py, on token ids (no tokenizer of its own), at
temperature 0, float32. The reference is the same base in transformers with the adapter as lorakit loads it
(`load_adapter`: peft's files and lorakit's trained-in-full tensors, the adapter as it was trained), run over the
prompt and vLLM's tokens in one forward pass. Each case ends in one verdict:

* alike: at every step vLLM's token is peft's greedy choice (or ties with it within TOLERANCE, after which the
  sequences may part) and each top logprob vLLM reports is within TOLERANCE of peft's for the same token;
* refused: vLLM would not load the adapter; its error, word for word;
* different: vLLM loaded it and answered otherwise (the first step that parts, or the largest logprob gap);
* failed: vLLM loaded it but could not run it on this machine (its CPU build lacks a kernel).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapter.format import load_adapter
from ..core.errors import LorakitError
from ..model.load import load
from . import vllm_env

TOLERANCE = 1e-3  # nats, float32 both sides (measured gaps on SmolLM2-135M: about 3e-5)
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot")
WORKER = Path(__file__).with_name("vllm_worker.py")


@dataclass(frozen=True)
class Served:
    """What vLLM did with one adapter (or with a merged model, served plain)."""

    name: str
    verdict: str  # "alike", "refused", "different", "failed"
    detail: str
    vllm: str
    tokens: int = 0  # tokens compared
    gap: float | None = None  # the largest |logprob| gap over vLLM's top logprobs

    def line(self) -> str:
        return f"{self.name}: {self.verdict} in vLLM {self.vllm}: {self.detail}"


def need_env() -> Path:
    exe = vllm_env.python()
    if exe is None:
        raise LorakitError(f"vLLM's side environment is not built ({vllm_env.folder()})",
                           hint=f"build it once: lorakit vllm-env ({vllm_env.VLLM}; {vllm_env.SIZE}, several minutes)")
    return exe


def run_vllm(base: str | Path, prompts: list[list[int]], adapters: list[dict] | None = None, *,
             max_tokens: int = 8, max_lora_rank: int = 16, together: list[str] | None = None,
             timeout: int = 900) -> dict:
    """Serve `prompts` (token ids) on `base` in vLLM, with each adapter ({name, path[, is_3d_lora_weight]}) in
    turn (none: the base itself), and `together` in one batch; the worker's result (see vllm_worker.py)."""
    exe = need_env()
    job = {"base": str(base), "prompts": prompts, "max_tokens": max_tokens, "logprobs": 5,
           "max_lora_rank": max_lora_rank, "adapters": adapters or [], "together": together or []}
    with tempfile.TemporaryDirectory(prefix="lorakit-vllm-") as tmp:
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        out, log = Path(tmp) / "out.json", Path(tmp) / "vllm.log"
        with open(log, "w") as handle:
            try:
                done = subprocess.run([str(exe), str(WORKER), str(Path(tmp) / "job.json"), str(out)], stdout=handle,
                                      stderr=subprocess.STDOUT, timeout=timeout, cwd=tmp)
            except subprocess.TimeoutExpired:
                raise LorakitError(f"vLLM did not answer within {timeout} s",
                                   hint="fewer prompts or tokens; vLLM on CPU starts in about 15 s") from None
        if done.returncode or not out.is_file():
            tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-8:])
            raise LorakitError(f"vLLM's worker stopped (exit {done.returncode}):\n{tail}",
                               hint=f"its environment: {vllm_env.folder()}; rebuild it with lorakit vllm-env")
        result = json.loads(out.read_text())
    if result.get("engine_error"):
        raise LorakitError(f"vLLM {result['vllm']} could not serve {base}: {result['engine_error']}",
                           hint="vLLM serves the architectures it implements, from a folder with config.json and "
                                "safetensors weights")
    return result


def reference_model(base: str | Path, adapter: str | Path | None) -> Any:
    """The base in float32 with the adapter as lorakit loads it (None: the base alone), in eval mode."""
    import torch

    model = load(base, dtype=torch.float32)
    return (load_adapter(model, adapter) if adapter is not None else model).eval()


def compare(name: str, answers: list[dict], model: Any, prompts: list[list[int]], version: str) -> Served:
    """The verdict on vLLM's answers (one per prompt) against `model` (see the module's docstring)."""
    import torch

    worst, compared = 0.0, 0
    for number, (prompt, answer) in enumerate(zip(prompts, answers)):
        tokens = answer["tokens"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
        steps = torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)], dim=-1)
        for step, (token, reported) in enumerate(zip(tokens, answer["logprobs"])):
            ours = steps[step]
            for key, value in reported.items():
                worst = max(worst, abs(value - float(ours[int(key)])))
            compared += 1
            best = int(ours.argmax())
            if token != best:
                gap = float(ours[best] - ours[token])
                if gap > TOLERANCE:
                    return Served(name, "different", f"prompt {number + 1}, token {step + 1}: vLLM chose {token}, "
                                  f"peft chooses {best} ({gap:.3g} nats likelier)", version, compared, worst)
                break  # a tie: the sequences may part from here on
    if worst > TOLERANCE:
        return Served(name, "different", f"greedy tokens as peft's, but a top logprob {worst:.3g} nats from peft's "
                      f"(tolerance {TOLERANCE:g})", version, compared, worst)
    return Served(name, "alike", f"{compared} greedy tokens as transformers + peft's, top-5 logprobs within "
                  f"{worst:.1e} nats (tolerance {TOLERANCE:g})", version, compared, worst)


def verdicts(result: dict, references: dict[str, Any], prompts: list[list[int]]) -> dict[str, Served]:
    """One verdict per run of `run_vllm`'s result (and per adapter of its `together` batch, named "NAME together"),
    each compared with its reference model (by run name; None for the base alone)."""
    version = result["vllm"]
    found = {}
    for run in result["runs"]:
        name = run["name"]
        if "refused" in run:
            found[name] = Served(name, "refused", run["refused"], version)
        elif "failed" in run:
            found[name] = Served(name, "failed", run["failed"], version)
        else:
            found[name] = compare(name or "base", run["answers"], references[name], prompts, version)
    for name, answers in (result.get("together") or {}).items():
        found[f"{name} together"] = compare(f"{name} together", answers, references[name], prompts, version)
    return found


def prompt_ids(base: str | Path, texts: list[str] | None = None) -> list[list[int]]:
    """The prompts as token ids, by the base's tokenizer; without one (or without texts), fixed ids."""
    from transformers import AutoConfig, AutoTokenizer

    texts = texts or list(PROMPTS)
    found = []
    if any((Path(base) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        try:  # (transformers builds an empty tokenizer for a folder without one: hence the file check)
            tokenizer = AutoTokenizer.from_pretrained(str(base))
            found = [tokenizer(text)["input_ids"] for text in texts]
        except (OSError, ValueError):
            found = []
    if found and all(found):
        return found
    vocab = AutoConfig.from_pretrained(str(base)).get_text_config().vocab_size
    return [[(7 * i + 3 * j + 1) % vocab for j in range(6)] for i in range(len(texts))]


def base_of(adapter: str | Path, base: str | Path | None) -> Path:
    """The base model folder: `base`, else the adapter's base_model_name_or_path when it is a local folder."""
    named = base if base is not None else json.loads((Path(adapter) / "adapter_config.json").read_text()).get(
        "base_model_name_or_path")
    found = Path(str(named or "")).expanduser()
    if not named or not (found / "config.json").is_file():
        raise LorakitError(f"no base model folder at {named}" if named else "the adapter names no base model",
                           hint="pass --base FOLDER: the model the adapter was trained on, with its config.json")
    return found


def serve_adapter(adapter: str | Path, base: str | Path | None = None, texts: list[str] | None = None, *,
                  max_tokens: int = 16, max_lora_rank: int = 16) -> Served:
    """Serve one adapter in vLLM on a few prompts and compare with transformers + peft."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise LorakitError(f"{folder} has no adapter_config.json: not a peft adapter folder",
                           hint="pass the folder save_pretrained / LoraTrainer wrote")
    need_env()
    root = base_of(folder, base)
    prompts = prompt_ids(root, texts)
    entry = {"name": folder.name, "path": str(folder.resolve())}  # as `vllm serve --enable-lora` loads it
    result = run_vllm(root, prompts, [entry], max_tokens=max_tokens, max_lora_rank=max_lora_rank)
    if "refused" in result["runs"][0] or "failed" in result["runs"][0]:
        return verdicts(result, {}, prompts)[folder.name]
    return verdicts(result, {folder.name: reference_model(root, folder)}, prompts)[folder.name]
