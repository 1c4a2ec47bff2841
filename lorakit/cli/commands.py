"""The `lorakit` command. `main(argv)` is testable without a subprocess.

A user mistake prints one `error:` line and a `hint:` line, exits 2, and shows
no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Any
from pathlib import Path

from ..adapter.serving import serving_breaches
from ..core.errors import LorakitError, SpecError
from ..core.files import atomic_path, refuse_existing, write_text_atomic
from ..cost.fit import choices_json, fit, parse_memory, render_fit
from ..cost.longest import render_longest
from ..cost.plot import check_path
from ..cost.render import FORMATS, architecture_summary, architecture_table, plot
from ..cost.report import report
from ..cost.simulate import simulate
from ..deploy import vllm_env
from ..deploy.merge import merge
from ..deploy.served import serve_adapter
from ..model.load import resolve_config
from ..model.tasks import build_from_config
from ..model.wrap import targets
from ..spec.serving_rules import CHECKED, VLLM_DEFAULT_RANK
from ..spec.specs import Freeze, Lora, Quant
from ..spec.zoo import bundled_configs, presets
from .args import build_parser
from .console import progress_line, quiet


def _spec_from_args(args: argparse.Namespace) -> tuple[Lora | None, Freeze | None, Quant | None]:
    lora_flags = [f for f in ("lora_r", "lora_alpha", "lora_targets", "lora_layers", "lora_dropout")
                  if getattr(args, f) is not None]
    if args.no_lora and lora_flags:
        raise SpecError(f"--no-lora contradicts --{lora_flags[0].replace('_', '-')}", hint="drop one of them")
    freeze = Freeze.parse(args.freeze) if args.freeze else None
    lora = None
    if not args.no_lora and (lora_flags or freeze is None):
        fields = {"r": args.lora_r, "alpha": args.lora_alpha, "targets": args.lora_targets,
                  "layers": args.lora_layers, "dropout": args.lora_dropout}
        lora = Lora(**{k: v for k, v in fields.items() if v is not None})
    quant = Quant.coerce(args.quant)
    if lora is None and freeze is None and quant is None:
        raise SpecError("--no-lora leaves nothing to compare", hint="add --freeze SPEC or --quant 4bit")
    return lora, freeze, quant


def cmd_compare_parameters(args: argparse.Namespace) -> int:
    if args.depth is not None and args.by == "kind":
        raise SpecError("--depth and --by kind contradict each other", hint="use one of them")
    if args.plot:
        if Path(args.plot).suffix.lower() not in (".png", ".svg", ".pdf"):
            raise LorakitError(f"--plot {args.plot}: unknown image type", hint="end the name in .png or .svg")
        refuse_existing(args.plot, args.force)
    if args.output:  # checked before the report is built, not after
        refuse_existing(args.output, args.force)
    if (args.batch_size is None) != (args.seq_len is None):
        raise SpecError("--batch-size and --seq-len go together", hint="give both, or neither")
    if args.memory_plot:
        if args.batch_size is None:
            raise SpecError("--memory-plot draws a simulated training step", hint="add --batch-size and --seq-len")
        check_path(args.memory_plot, args.force)
    gpu_memory = parse_memory(args.gpu_memory) if args.gpu_memory else None
    if gpu_memory and not args.memory_plot:
        raise SpecError("--gpu-memory is drawn on the memory plot", hint="add --memory-plot FILE.png, or use "
                        "`lorakit fit MODEL --gpu-memory ...` for what fits")
    lora, freeze, quant = _spec_from_args(args)
    show = progress_line("simulating")
    if args.batch_size is not None:
        show(f"two training steps of {args.model}")
    result = report(args.model, lora=lora, freeze=freeze, quant=quant, task=args.task, optimizer=args.optimizer,
                    by=args.depth if args.depth is not None else args.by, dtype=args.dtype, batch_size=args.batch_size,
                    seq_len=args.seq_len, gradient_checkpointing=args.gradient_checkpointing, attn=args.attn,
                    trust_remote_code=args.trust_remote_code, quant_path=args.quant_path, gpus=args.gpus,
                    shard=args.shard)
    sim = result.simulation
    if args.memory_plot and sim.timeline is None:  # worked out from 2 and 3 blocks: the picture needs them all
        show(f"every block of {args.model} for the memory plot")
        sim = simulate(args.model, lora=lora, freeze=freeze, quant=quant, task=args.task, dtype=result.dtype,
                       optimizer=args.optimizer, batch_size=args.batch_size, seq_len=args.seq_len,
                       gradient_checkpointing=args.gradient_checkpointing, attn=args.attn,
                       trust_remote_code=args.trust_remote_code, quant_path=args.quant_path, extrapolate=False,
                       gpus=args.gpus, shard=args.shard)
    show(None)
    text = FORMATS[args.format](result)
    if args.output:
        write_text_atomic(args.output, text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.plot:
        with atomic_path(args.plot) as tmp:
            plot(result, tmp)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.memory_plot:
        sim.plot(args.memory_plot, gpu_memory=gpu_memory, force=args.force)
        print(f"wrote {args.memory_plot}", file=sys.stderr)
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    config, _ = resolve_config(args.model, trust_remote_code=args.trust_remote_code)
    model = build_from_config(config, args.task, meta=True, trust_remote_code=args.trust_remote_code)
    lora = Lora(**{k: v for k, v in {"r": 8, "targets": args.lora_targets, "layers": args.lora_layers}.items()
                   if v is not None})
    print(targets(model, lora))
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    weights = None
    if args.weights:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError:
            raise SpecError(f"--weights {args.weights!r} is not a list of numbers", hint="e.g. --weights 0.7,0.3"
                            ) from None
    show = progress_line("merging")
    show(f"{', '.join(args.adapter)} into {args.base or 'the base in the manifest'}")
    done = merge(args.base, args.adapter, args.out, weights=weights, method=args.method, dtype=args.dtype,
                 verify=not args.no_verify, force=args.force, into=args.into, gguf=args.gguf,
                 gguf_type=args.gguf_type, ollama=args.ollama, verify_logits=args.verify_logits)
    show(None)
    check = done["verification"]
    print(f"wrote {args.out} ({done['path']}, {done['merged_layers']} layers, {done['wall_seconds']:.1f} s)")
    if check and check["modules"]:
        modules = check["modules"]
        print(f"verified: {modules['tensors']} tensors, {modules['lora_tensors_probed']} LoRA updates on random "
              f"probes (worst {modules['worst_ratio_to_tolerance']:.2f} of the rounding tolerance)")
    if check and "max_abs_logit_difference" in check:
        print(f"verified: max |logit difference| {check['max_abs_logit_difference']:.2e} "
              f"(tolerance {check['tolerance']:.0e})")
        gap = check.get("quantization_gap")
        if gap and gap["max_abs_logit_difference"] is not None:
            print(f"quantization cost: adapter on its quantized base vs merged full precision: "
                  f"{gap['max_abs_logit_difference']:.3g}")
        elif gap:
            print(f"quantization cost: not measured ({gap['not_measured']})")
    elif check:
        print(f"logits check {check['logits_check']} (--verify-logits runs it)")
    if done["gguf"]:
        gguf = done["gguf"]
        print(f"wrote {gguf['path']} ({gguf['type']}, {gguf['bytes'] / 2**20:.1f} MiB, tokenizer {gguf['tokenizer']})")
        if gguf["verification"]:
            print(f"verified: {gguf['verification']['summary']}")
        if gguf["modelfile"]:
            made = gguf["modelfile"]
            what = [f"{made['template']} chat template" if made["template"] else None, made.get("note")]
            print(f"wrote {made['path']} ({'; '.join(filter(None, what))}; ollama create NAME -f {made['path']})")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    limit = parse_memory(args.gpu_memory)  # before any simulation
    lora = Lora(**{k: v for k, v in {"r": args.lora_r, "alpha": args.lora_alpha, "targets": args.lora_targets}.items()
                   if v is not None})
    text = args.global_batch.strip()
    if not text.isdigit() or int(text) < 1:
        raise LorakitError(f"cannot read a global batch from {args.global_batch!r}",
                           hint="give a positive whole number: micro-batch x gradient accumulation, e.g. 32")
    show = progress_line("simulating")
    if args.max_seq_len:
        return _longest(args, limit, lora, int(text), show)
    choices = fit(args.model, limit, seq_len=args.seq_len, global_batch=int(text), lora=lora, attn=args.attn,
                  optimizer=args.optimizer, task=args.task, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                  methods=tuple(args.method or ("full", "lora", "qlora")), quant_path=args.quant_path, progress=show,
                  gpus=args.gpus, shard=args.shard)
    show(None)
    if args.format == "json":
        print(json.dumps({"model": args.model, "gpu_memory": limit, "seq_len": args.seq_len,
                          "global_batch": int(text), "quant_path": args.quant_path, "gpus": args.gpus,
                          "shard": args.shard,
                          "methods": choices_json(choices)}, indent=2))
    else:
        sys.stdout.write(render_fit(choices, args.model, limit, args.seq_len, int(text), args.quant_path,
                                    args.gpus, args.shard))
    return 0


def _longest(args: argparse.Namespace, limit: int, lora: Lora, global_batch: int, show: Any) -> int:
    answers = fit(args.model, limit, global_batch=global_batch, lora=lora, attn=args.attn, optimizer=args.optimizer,
                  task=args.task, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                  methods=tuple(args.method or ("full", "lora", "qlora")), quant_path=args.quant_path, progress=show,
                  gpus=args.gpus, shard=args.shard, max_seq_len=True)
    show(None)
    if args.format == "json":
        print(json.dumps({"model": args.model, "gpu_memory": limit, "batch": 1, "quant_path": args.quant_path,
                          "gpus": args.gpus, "shard": args.shard, "methods": [asdict(a) for a in answers]}, indent=2))
    else:
        sys.stdout.write(render_longest(answers, args.model, limit, args.gpus, args.shard))
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    print("presets (adapters_zoo/presets):")
    for name, preset in presets().items():
        print(f"  {name:12s} {', '.join(preset.model_types) or '(any other model)'}")
    print("bundled configs (adapters_zoo/configs), usable offline:")
    for model_id in bundled_configs():
        print(f"  {model_id}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    if args.run and args.serve != "vllm":
        raise SpecError(f"--run serves in vLLM only: {args.serve} has no CPU build lorakit can install",
                        hint=f"drop --run to check {args.serve}'s rules, read from its source")
    breaches = serving_breaches(args.adapter, args.serve, max_lora_rank=args.max_lora_rank, base=args.base)
    for breach in breaches:
        print(f"- {breach.rule}: {breach.problem}\n  fix: {breach.fix}")
        if args.serve == "vllm":
            print(f"  {CHECKED['vllm']} " + (f"refuses it: {breach.says}" if breach.says else
                                             "loads it and answers otherwise"))
    print(f"{args.adapter} breaks {len(breaches)} rule(s) of {args.serve}" if breaches else
          f"{args.adapter} can be served by {args.serve} as it is", f"(rules checked in {CHECKED[args.serve]})")
    if not args.run:
        return 1 if breaches else 0
    served = serve_adapter(args.adapter, args.base, args.prompt, max_tokens=args.max_tokens,
                           max_lora_rank=args.max_lora_rank or VLLM_DEFAULT_RANK)
    print(f"served in vLLM {served.vllm}: {served.verdict}: {served.detail}")
    if (served.verdict == "alike") == bool(breaches):  # the rules and vLLM disagree: say so, never hide it
        print(f"lorakit's rules predicted {'a refusal' if breaches else 'no problem'}; vLLM disagrees: please "
              "report it with this output")
    return 0 if served.verdict == "alike" and not breaches else 1


def cmd_vllm_env(args: argparse.Namespace) -> int:
    try:
        vllm_env.ensure()
    except RuntimeError as exc:
        raise LorakitError(str(exc), hint="it needs the package registry (pip) and about 4 GB of disk") from None
    return 0


def cmd_architectures(args: argparse.Namespace) -> int:
    print(architecture_summary() if args.by_group else architecture_table(), end="")
    return 0


# Commands that load transformers anyway: only they pay for importing its logging switches.
LOADS_TRANSFORMERS = ("compare-parameters", "targets", "merge", "fit")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = globals()["cmd_" + args.command.replace("-", "_")]  # looked up when it runs (tests replace one)
    try:
        with quiet(args.command in LOADS_TRANSFORMERS or getattr(args, "run", False)):
            return command(args)
    except LorakitError as exc:
        return _error(exc.message, exc.hint, 2)
    except BrokenPipeError:  # `lorakit ... | head`: the reader left; stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # the disk, not lorakit: a full disk, a folder that vanished, a permission
        where = f": {exc.filename}" if exc.filename else ""
        return _error(f"{exc.strerror or exc}{where}", "check the path, its permissions and the free space", 1)
    except Exception as exc:  # noqa: BLE001 - a bug: one short line, the traceback on request
        if args.debug:
            raise
        return _error(f"unexpected {type(exc).__name__}: {exc}".splitlines()[0][:300],
                      "this is a bug in lorakit; run again with --debug for the traceback, and report it", 1)
    except KeyboardInterrupt:
        return _error("interrupted", None, 130)


def _error(message: str, hint: str | None, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
