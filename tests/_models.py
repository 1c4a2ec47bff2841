"""Models and adapters that tests of several parts build alike: a Llama wide enough for bitsandbytes' CPU 4-bit
kernels, an adapter saved with random B, and the table of specs wrap is checked against (tests/model/test_wrap.py),
which the report's tests reuse."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import build, look_trained

import lorakit
from lorakit.adapter.format import save_extras


def wide_llama():
    """bitsandbytes' CPU 4-bit inference path needs in_features >= its 64-value block."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100))


def make_adapter(arch: str, folder: Path, lora: dict, seed: int = 1, quant: str | None = None) -> Path:
    """Save a base to folder/base and an adapter with random (non-zero) B to folder/adapter-<seed>."""
    base_dir = folder / "base"
    if not base_dir.exists():
        (wide_llama() if arch == "wide-llama" else build(arch)).save_pretrained(base_dir, max_shard_size="5KB")
    model = look_trained(lorakit.wrap(lorakit.load(base_dir), lora=lora, quant=quant), 0.1, seed=seed,
                         also=lambda name, _: "modules_to_save" in name)
    out = folder / f"adapter-{seed}"
    model.save_pretrained(out)
    save_extras(model, out)
    return out


# name -> (lorakit spec, regex of the modules that must get LoRA, heads trained in full,
#          the LoraConfig a peft user would write by hand for the same thing)
CASES = {
    "bert": (dict(r=4), r"bert\.encoder\.layer\.\d\.attention\.self\.(query|value)", ["bert.pooler", "classifier"],
             dict(target_modules=["query", "value"], modules_to_save=["classifier", "pooler"], task_type="SEQ_CLS")),
    "roberta": (dict(r=4), r"roberta\.encoder\.layer\.\d\.attention\.self\.(query|value)", ["classifier"],
                dict(target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")),
    "distilbert": (dict(r=4), r"distilbert\.transformer\.layer\.\d\.attention\.(q_lin|v_lin)",
                   ["classifier", "pre_classifier"],
                   dict(target_modules=["q_lin", "v_lin"], modules_to_save=["pre_classifier", "classifier"],
                        task_type="SEQ_CLS")),
    "gpt2": (dict(r=4, targets="attention"), r"transformer\.h\.\d\.attn\.(c_attn|c_proj)", [],
             dict(target_modules=["c_attn", "attn.c_proj"], fan_in_fan_out=True, task_type="CAUSAL_LM")),
    "llama": (dict(r=4, targets="all-linear"), r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj", [],
              dict(target_modules="all-linear", task_type="CAUSAL_LM")),
    "mistral": (dict(r=4, targets="all-linear"), r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj", [],
                dict(target_modules="all-linear", task_type="CAUSAL_LM")),
    "qwen2": (dict(r=4, targets="all-linear"), r"model\.layers\.\d\.(self_attn|mlp)\.\w+_proj", [],
              dict(target_modules="all-linear", task_type="CAUSAL_LM")),
    "t5": (dict(r=4, targets="all-linear"),
           r"(en|de)coder\.block\.\d\.layer\.\d\.(SelfAttention\.[qkvo]|EncDecAttention\.[qkvo]|DenseReluDense\.w[io])",
           [], dict(target_modules="all-linear", task_type="SEQ_2_SEQ_LM")),
    "vit": (dict(r=4, targets="mlp"), r"vit\.layers\.\d\.mlp\.fc[12]", ["classifier"],
            dict(target_modules=["fc1", "fc2"], modules_to_save=["classifier"])),
    "resnet": (dict(r=4), r"resnet\.encoder\.stages\.\d\.layers\.\d\.(shortcut|layer\.\d)\.convolution",
               ["classifier"],
               dict(target_modules=r".*encoder\.stages.*convolution", modules_to_save=["classifier"])),
    "mlp": (dict(r=4, targets="all-linear"), r"net\.[024]", [], dict(target_modules=["net.0", "net.2", "net.4"])),
}
