"""Serve adapters in vLLM and write what it answered. Runs in the vLLM side environment, never in lorakit's
(vLLM pins another transformers): stdlib and vLLM only, no lorakit import. `python vllm_worker.py JOB OUT`.

JOB (JSON): base (a model folder), prompts (token-id lists), max_tokens, logprobs, max_lora_rank,
adapters ([{name, path, is_3d_lora_weight}]), together (adapter names served in one batch, prompt i with adapter i mod n).
OUT (JSON): {"vllm": version, "runs": [{name, answers: [{tokens, logprobs}]} or {name, refused} or {name, failed}],
"together": {name: answers}} or {"engine_error": text}. The engine runs in this process (no engine-core process, one uniprocess executor), so an
adapter vLLM refuses raises here and the engine serves the next one: in vLLM's default multiprocess engine a refused
adapter kills the engine.
"""

from __future__ import annotations

import json
import os
import sys


def _answers(outputs) -> list[dict]:
    return [{"tokens": list(out.outputs[0].token_ids),
             "logprobs": [{str(k): v.logprob for k, v in step.items()} for step in out.outputs[0].logprobs]}
            for out in outputs]


def serve(job: dict) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    adapters = job.get("adapters") or []
    settings = dict(model=job["base"], dtype="float32", enforce_eager=True, skip_tokenizer_init=True, seed=0,
                    gpu_memory_utilization=job.get("memory", 0.1), max_model_len=job.get("max_model_len", 512),
                    distributed_executor_backend="uni")
    if adapters:
        settings.update(enable_lora=True, max_lora_rank=job.get("max_lora_rank", 16),
                        max_loras=max(1, len(job.get("together") or [])))
        if any(a.get("is_3d_lora_weight") for a in adapters):  # peft's fused-expert tensors (target_parameters)
            settings["enable_mixed_moe_lora_format"] = True
    result: dict = {"vllm": vllm.__version__, "runs": []}
    try:
        llm = LLM(**settings)
    except Exception as exc:  # vLLM's own refusal of the base: the caller reports it
        return {**result, "engine_error": f"{type(exc).__name__}: {exc}"}
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=job.get("logprobs", 5),
                            detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    requests = {}
    for number, adapter in enumerate(adapters, start=1):
        request = LoRARequest(adapter["name"], number, adapter["path"],
                              is_3d_lora_weight=bool(adapter.get("is_3d_lora_weight")))
        try:
            llm.llm_engine.add_lora(request)  # vLLM reads and checks the adapter here, before any prompt
        except Exception as exc:
            result["runs"].append({"name": adapter["name"], "refused": f"{type(exc).__name__}: {exc}"})
            continue
        try:
            answers = _answers(llm.generate(prompts, params, lora_request=request, use_tqdm=False))
        except Exception as exc:  # loaded, but this build cannot run it (vLLM's CPU build has no MoE LoRA kernel)
            result["runs"].append({"name": adapter["name"], "failed": f"{type(exc).__name__}: {exc}"})
            continue
        finally:
            llm.llm_engine.remove_lora(number)
        requests[adapter["name"]] = request
        result["runs"].append({"name": adapter["name"], "answers": answers})
    if not adapters:
        result["runs"].append({"name": None, "answers": _answers(llm.generate(prompts, params, use_tqdm=False))})
    together = [requests[name] for name in job.get("together") or [] if name in requests]
    if len(together) > 1:
        batch = [(prompt, request) for request in together for prompt in prompts]
        outputs = llm.generate([p for p, _ in batch], params, lora_request=[r for _, r in batch], use_tqdm=False)
        answers = _answers(outputs)
        result["together"] = {r.lora_name: answers[i * len(prompts):(i + 1) * len(prompts)]
                              for i, r in enumerate(together)}
    return result


if __name__ == "__main__":
    job_file, out_file = sys.argv[1:3]
    with open(job_file) as handle:
        outcome = serve(json.load(handle))
    with open(out_file + ".part", "w") as handle:
        json.dump(outcome, handle)
    os.replace(out_file + ".part", out_file)
