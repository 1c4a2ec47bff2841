"""The `lorakit` command's arguments: one parser, a subcommand per `cli.cmd_*` function."""

from __future__ import annotations

import argparse

from ..adapter.serving import SERVERS
from ..cost.materialise import QUANT_PATHS
from ..deploy.merge import METHODS
from ..gguf.export import GGUF_TYPES
from ..model.tasks import TASKS
from ..plan.accounting import OPTIMIZERS
from ..spec.specs import Freeze, Lora
from .console import version


QUANT_PATH_HELP = "how a quantized model gets onto the GPU: " + "; ".join(f"{k}, {v}" for k, v in QUANT_PATHS.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA, freezing and quantization for Hugging Face "
                                     "models: see exactly what each choice costs.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    parser.add_argument("--version", action="version", version=f"lorakit {version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    compare = sub.add_parser("compare-parameters", help="per-layer trainable parameters and training memory vs "
                             "full fine-tuning", description="Exact per-layer report. Works offline from a config.")
    _add_model_args(compare)
    lora_help = {f.name: f.metadata["help"] for f in Lora.__dataclass_fields__.values()}
    compare.add_argument("--lora-r", type=int, help=lora_help["r"] + " (default 8)")
    compare.add_argument("--lora-alpha", type=float, help=lora_help["alpha"])
    compare.add_argument("--lora-dropout", type=float, help=lora_help["dropout"])
    compare.add_argument("--lora-targets", help=lora_help["targets"])
    compare.add_argument("--lora-layers", help=lora_help["layers"])
    compare.add_argument("--no-lora", action="store_true", help="compare freezing/quantization alone")
    compare.add_argument("--freeze", help=Freeze.parse.__doc__.split("\n\n")[1].strip().replace("\n", " ")
                         if Freeze.parse.__doc__ else "freeze spec")
    compare.add_argument("--quant", default="none", choices=["none", "8bit", "4bit", "fp4"],
                         help="bitsandbytes quantization of Linear layers")
    compare.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                         help="dtype of the weights (default: the config's, else float32)")
    compare.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS))
    compare.add_argument("--depth", type=int, help="group by the first N parts of module names instead of layers")
    compare.add_argument("--by", default="layer", choices=["layer", "kind"], help="rows per layer or per module kind")
    compare.add_argument("--batch-size", type=int, help="with --seq-len: simulate two training steps on fake "
                         "tensors and report peak GPU memory")
    compare.add_argument("--seq-len", type=int)
    compare.add_argument("--gradient-checkpointing", action="store_true", help="simulate with it on")
    _add_gpu_args(compare)
    compare.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash"], help="attention kernel")
    compare.add_argument("--quant-path", default="load", choices=list(QUANT_PATHS), help=QUANT_PATH_HELP)
    compare.add_argument("--format", default="table", choices=["table", "json", "csv", "markdown"])
    compare.add_argument("--output", help="write to this file (atomically) instead of stdout")
    compare.add_argument("--plot", help="also draw a bar chart to FILE.png or FILE.svg (needs matplotlib)")
    compare.add_argument("--memory-plot", help="with --batch-size and --seq-len: draw device memory over the "
                         "simulated step, stacked by kind, to FILE.png or FILE.svg (needs matplotlib)")
    compare.add_argument("--gpu-memory", help="draw this capacity on --memory-plot, e.g. 24GiB")
    compare.add_argument("--force", action="store_true", help="overwrite an existing --output/--plot/--memory-plot")

    show = sub.add_parser("targets", help="the LoRA candidates of a model and what a spec would touch")
    _add_model_args(show)
    show.add_argument("--lora-targets")
    show.add_argument("--lora-layers")

    merge_cmd = sub.add_parser("merge", help="fold adapters into the base weights: a plain transformers checkpoint")
    merge_cmd.add_argument("--base", help="base model (default: the one in the adapter's manifest)")
    merge_cmd.add_argument("--adapter", action="append", required=True, help="adapter folder; repeat for several")
    merge_cmd.add_argument("--weights", help="one weight per adapter, e.g. 0.7,0.3")
    merge_cmd.add_argument("--method", default="linear", choices=list(METHODS), help="peft's add_weighted_adapter method")
    merge_cmd.add_argument("--out", required=True, help="output folder (must not exist unless --force)")
    merge_cmd.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="dtype of the merged weights")
    merge_cmd.add_argument("--into", default="original", choices=["original", "dequantized"],
                       help="for adapters trained on a k-bit base: the original weights, or the dequantized ones")
    merge_cmd.add_argument("--no-verify", action="store_true", help="skip every check against base + adapter")
    merge_cmd.add_argument("--verify-logits", action=argparse.BooleanOptionalAction, default=None,
                           help="run (or skip) the whole-model logits check; default: when the model is small")
    merge_cmd.add_argument("--gguf", help="also write the merged model to this GGUF file (llama.cpp, Ollama)")
    merge_cmd.add_argument("--gguf-type", default="f16", choices=list(GGUF_TYPES), help="GGUF weight type")
    merge_cmd.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile beside the --gguf "
                           "file: FROM it, the chat template (ChatML, Llama 3, Gemma or Phi-3), stop words")
    merge_cmd.add_argument("--force", action="store_true", help="replace an existing --out (and --gguf, Modelfile)")

    fit_cmd = sub.add_parser("fit", help="for full fine-tuning, LoRA and QLoRA: the cheapest configuration that fits",
                             description="Simulated training steps (fake tensors, no GPU needed) for each method, "
                             "trying the memory levers cheapest first: chunked loss, gradient checkpointing, "
                             "activation offload, tiled MLP, 8-bit optimizer, then smaller micro-batches with gradient "
                             "accumulation. --format json gives lorakit.training_args keywords.")
    _add_model_args(fit_cmd)
    fit_cmd.add_argument("--gpu-memory", required=True, help="e.g. 24GiB, 80GB")
    fit_cmd.add_argument("--seq-len", type=int, default=2048)
    fit_cmd.add_argument("--max-seq-len", action="store_true",
                         help="instead: the longest sequence that fits at batch 1, and the cheapest levers that "
                              "get there")
    _add_gpu_args(fit_cmd)
    fit_cmd.add_argument("--global-batch", default="1",
                         help="sequences per optimizer step (micro-batch x gradient accumulation x GPUs); default 1")
    fit_cmd.add_argument("--lora-r", type=int, help="default: the family preset's")
    fit_cmd.add_argument("--lora-alpha", type=float)
    fit_cmd.add_argument("--lora-targets", help="default: the family preset's")
    fit_cmd.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash"])
    fit_cmd.add_argument("--quant-path", default="load", choices=list(QUANT_PATHS), help=QUANT_PATH_HELP)
    fit_cmd.add_argument("--optimizer", default="adamw", choices=list(OPTIMIZERS))
    fit_cmd.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    fit_cmd.add_argument("--method", action="append", choices=["full", "lora", "qlora"],
                     help="only these (repeat the flag); default all three")
    fit_cmd.add_argument("--format", default="table", choices=["table", "json"])

    sub.add_parser("zoo", help="list presets and bundled configs")

    hub = sub.add_parser("architectures", help="the model families lorakit supports and tests, with their limits")
    hub.add_argument("--by-group", action="store_true", help="one row per group of families")

    check = sub.add_parser("check", help="can an adapter be served unmerged? every serving rule it breaks, with the fix")
    check.add_argument("adapter", help="the adapter folder (adapter_config.json, adapter_model.safetensors)")
    check.add_argument("--serve", required=True, choices=list(SERVERS), help="the server to check against")
    check.add_argument("--max-lora-rank", type=int, help="the server's --max-lora-rank (default: vLLM's, 16)")
    check.add_argument("--base", help="the base model folder (default: the adapter's base_model_name_or_path)")
    check.add_argument("--run", action="store_true", help="serve it in vLLM itself (its side environment, see "
                       "`lorakit vllm-env`) on a few prompts and compare with transformers + peft")
    check.add_argument("--prompt", action="append", help="with --run: a prompt (repeat the flag; default three)")
    check.add_argument("--max-tokens", type=int, default=16, help="with --run: tokens per prompt (default 16)")

    sub.add_parser("vllm-env", help="build vLLM's side environment (once, in lorakit's cache; about 3.5 GB)")
    return parser


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="local model folder, bundled zoo name (see `lorakit zoo`) or Hub id")
    parser.add_argument("--task", choices=list(TASKS), help="which head (default: from the config)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow custom model code (off by default)")


def _add_gpu_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, default=1, help="GPUs training together; figures are per GPU, "
                        "batch sizes per GPU (default 1)")
    parser.add_argument("--shard", choices=["fsdp", "zero2", "zero3"], help="how the GPUs share the model: FSDP2 "
                        "as Trainer applies it, or DeepSpeed ZeRO-2/3 (default with --gpus: data parallel, DDP)")
