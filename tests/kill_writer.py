"""Kill a lorakit writer with SIGKILL at random moments, many times, and check the invariants after each kill.

    python tests/kill_writer.py trainer|merge WORKDIR KILLS SEED

The parent imports everything once and forks a child per attempt (so a kill costs milliseconds, not an
import); the child writes, the parent kills it at a random moment within one write's duration. After each
kill: every folder with a final name is complete and loads; the user's inputs are byte for byte unchanged.
At the end one run goes through and must clean up what the killed runs left. Prints a JSON summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lorakit  # noqa: E402
from lorakit.adapter.format import verify  # noqa: E402
from lorakit.train.checkpoints import verify_checkpoint  # noqa: E402

torch.set_num_threads(1)  # forking a process with a live OpenMP pool can hang the child


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64))


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_in_child(write) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            write()
            os._exit(0)
        except BaseException as exc:  # noqa: BLE001 - reported through the exit status
            print(f"child failed: {exc!r}", file=sys.stderr)
            os._exit(3)
    return pid


def trainer_setup(work: Path):
    data = [{"input_ids": [1, 2, 3, 4, 5, 6], "labels": [1, 2, 3, 4, 5, 6]}] * 16
    run = work / "run"

    def write() -> None:
        resume = any(run.glob("checkpoint-*"))
        args = lorakit.training_args(str(run), max_steps=6, per_device_train_batch_size=2, save_strategy="steps",
                                     save_steps=1, save_total_limit=2, logging_steps=1, use_cpu=True,
                                     disable_tqdm=True, seed=0, eval_strategy="no")
        trainer = lorakit.LoraTrainer(model=tiny_llama(), args=args, train_dataset=data, lora=lorakit.Lora(r=2))
        trainer.train(resume_from_checkpoint=True if resume else None)

    def check() -> list[str]:
        problems = []
        for folder in sorted(run.glob("checkpoint-*")):
            try:
                verify_checkpoint(folder)
                verify(folder)
            except lorakit.LorakitError as exc:
                problems.append(f"{folder.name}: {exc.message}")
        return problems

    def reset() -> None:
        import shutil

        shutil.rmtree(run, ignore_errors=True)

    return write, check, {}, reset, run


def merge_setup(work: Path):
    base, adapter, out = work / "base", work / "adapter", work / "out"

    def prepare() -> None:
        tiny_llama().save_pretrained(base)
        model = lorakit.wrap(lorakit.load(base), lora=lorakit.Lora(r=2))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.1)
        model.save_pretrained(adapter)
        from lorakit.adapter.format import save_extras

        save_extras(model, adapter)
        lorakit.merge(base, adapter, out)

    # in a child too: the parent must fork with no threads started (from_pretrained uses a thread pool)
    assert os.waitstatus_to_exitcode(os.waitpid(run_in_child(prepare), 0)[1]) == 0, "setup failed"
    inputs = {"base": digest(base), "adapter": digest(adapter)}

    def write() -> None:
        lorakit.merge(base, adapter, out, force=True)

    def check() -> list[str]:
        problems = [f"{name} changed" for name in inputs if digest(work / name) != inputs[name]]
        if out.exists():
            if not (out / "merge_report.json").is_file():
                problems.append("out exists without merge_report.json")
            else:  # loads, in a child for the same reason
                load = run_in_child(lambda: LlamaForCausalLM.from_pretrained(out, use_safetensors=True))
                if os.waitstatus_to_exitcode(os.waitpid(load, 0)[1]) != 0:
                    problems.append("out does not load")
        return problems

    return write, check, inputs, lambda: None, out


def main() -> None:
    mode, work, kills, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    work.mkdir(parents=True, exist_ok=True)
    write, check, _, reset, target = (trainer_setup if mode == "trainer" else merge_setup)(work)
    # A write's duration, the window kills fall in: the shorter of two unkilled runs, so that a one-off cost of
    # the first (a cold disk cache) does not widen the window past what a write takes.
    durations = []
    for _ in range(2):
        started = time.perf_counter()
        pid = run_in_child(write)
        status = os.waitpid(pid, 0)[1]
        durations.append(time.perf_counter() - started)
        assert os.waitstatus_to_exitcode(status) == 0, "the unkilled run failed"
        reset()
    duration = min(durations)
    rng = random.Random(seed)
    problems, killed = [], 0
    for attempt in range(kills):
        pid = run_in_child(write)
        time.sleep(rng.uniform(0.0, duration))
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
        killed += os.WIFSIGNALED(status)
        problems += [f"after kill {attempt}: {p}" for p in check()]
        if not os.WIFSIGNALED(status):  # it finished: start the next write afresh, or it would have nothing to do
            reset()
    pid = run_in_child(write)  # one run goes through, and cleans up after the killed ones
    finished = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    leftovers = sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".") and "lorakit" in p.name)
    leftovers += sorted(p.name for p in target.iterdir() if p.name.startswith(".lorakit")) if target.is_dir() else []
    problems += check()
    print("RESULT " + json.dumps({"mode": mode, "attempts": kills, "killed": killed, "write_seconds": duration,
                                  "finished": finished, "leftovers": leftovers, "problems": problems}))


if __name__ == "__main__":
    main()
