"""Models and adapters as users bring them, one regression each: a model already quantized when it reaches lorakit
(from_pretrained with a BitsAndBytesConfig, lorakit.load(quant=...), a saved 4-bit checkpoint), adapters plain
peft made. tests/test_architectures.py walks the same ways over the families of the hub; these are the cases
each fix was for, on every run.
"""

from __future__ import annotations

import pytest
import torch
from conftest import family_batch, first_output, look_trained

import lorakit
from lorakit.adapter.format import save_extras
from lorakit.cli import main
from lorakit.cost.simulate import simulate


def tiny_gpt2(pad_token_id=None):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=128, n_positions=128,
                                      bos_token_id=1, eos_token_id=1, pad_token_id=pad_token_id,
                                      tie_word_embeddings=True))


def loaded_4bit(folder, **bnb):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
                                                                                               **bnb))


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_gpt2_loaded_in_4_bits_counts_its_conv1d_layers_by_shape_and_merges_onto_the_full_precision_base(tmp_path):
    """transformers turns GPT-2's Conv1D layers, stored (in, out), into Linear4bit ones, stored (out, in) and
    packed: the Plan counts them by their real shapes, the adapter merges transposed onto the Conv1D base, and it
    loads onto that base (one base, one fingerprint, however it was loaded)."""
    tiny_gpt2().save_pretrained(tmp_path / "base")
    model = loaded_4bit(tmp_path / "base", bnb_4bit_quant_type="nf4")
    wrapped = lorakit.wrap(model, lora=lorakit.Lora(r=4, targets="all-linear"))
    # c_attn 64 -> 192, c_proj 64 -> 64, c_fc 64 -> 256, mlp.c_proj 256 -> 64, in 2 blocks, r=4
    expected = 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert sum(p.numel() for p in wrapped.parameters() if p.requires_grad) == expected
    look_trained(wrapped, 0.1)
    wrapped.save_pretrained(tmp_path / "adapter")
    save_extras(wrapped, tmp_path / "adapter")
    lorakit.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    from transformers import AutoModelForCausalLM

    ids = torch.randint(2, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    full = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(merged, ids) - logits(full, ids)).abs().max() <= 1e-4
    assert (logits(full, ids) - logits(tiny_gpt2(), ids)).abs().max() > 1e-3  # the adapter did something


def test_a_gpt2_with_a_pad_token_is_simulated(tmp_path):
    """GPT-2 checks its inputs for padding (`pad_token_id in input_ids`) when no attention mask is given, which
    reads values; on the simulator's fake inputs transformers sees a trace and skips it."""
    tiny_gpt2(pad_token_id=0).save_pretrained(tmp_path)
    sim = simulate(str(tmp_path), lora=lorakit.Lora(r=4), batch_size=1, seq_len=16, steps=1)
    assert sim.peak_allocated > 0


def test_a_model_loaded_in_4_bits_is_simulated_with_its_own_quantization(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    model = loaded_4bit(tmp_path, bnb_4bit_quant_type="fp4")
    quant = lorakit.make_plan(model).quant
    assert (quant.bits, quant.quant_type, quant.double_quant) == (4, "fp4", False)  # BitsAndBytesConfig's defaults
    settings = dict(lora=lorakit.Lora(r=4), batch_size=1, seq_len=16, steps=1)
    as_loaded = simulate(model, **settings)
    assert as_loaded.settings["quant"]["quant_type"] == "fp4"
    assert as_loaded.peak_allocated == simulate(str(tmp_path), quant=quant, **settings).peak_allocated
    assert as_loaded.peak_allocated < simulate(str(tmp_path), **settings).peak_allocated  # not as if unquantized


def test_a_checkpoint_saved_in_4_bits_loads_as_saved_and_refuses_another_quant(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "base")
    loaded_4bit(tmp_path / "base", bnb_4bit_quant_type="nf4").save_pretrained(tmp_path / "4bit")
    assert lorakit.make_plan(lorakit.load(tmp_path / "4bit")).quant.quant_type == "nf4"
    with pytest.raises(lorakit.QuantizationError, match="saved quantized already"):
        lorakit.load(tmp_path / "4bit", quant="8bit")


def test_a_bitsandbytes_config_that_quantizes_nothing_is_refused_with_the_reason(tmp_path):
    """Falcon's FalconLinear layers subclass nn.Linear, and transformers' bitsandbytes integration replaces plain
    nn.Linear only: the model arrives unquantized under a quantization config."""
    from conftest import build_family

    build_family("falcon").save_pretrained(tmp_path)
    with pytest.raises(lorakit.QuantizationError, match="none of its layers is quantized"):
        lorakit.wrap(loaded_4bit(tmp_path), lora=lorakit.Lora(r=4))


def test_a_plain_peft_adapter_of_deepseek_v3_merges_and_loads(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from conftest import build_family

    build_family("deepseek-v3").save_pretrained(tmp_path / "base")
    made = look_trained(get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                       LoraConfig(r=4, target_modules="all-linear")), 0.1)
    made.save_pretrained(tmp_path / "adapter")  # peft's files only: no lorakit manifest
    ids = family_batch("deepseek-v3", labels=False)["input_ids"]
    expected = logits(made, ids)
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--out",
                 str(tmp_path / "merged")]) == 0, capsys.readouterr().err
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids) - expected).abs().max() <= 1e-4
    loaded = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert (logits(loaded, ids) - expected).abs().max() <= 1e-4


def test_a_plain_peft_adapter_on_a_shared_weight_is_refused_by_merge_and_loads_unmerged(tmp_path):
    """Zamba's blocks share one transformer block: peft adapts it at one use, a merge would change every use. (Its
    Mamba mixers' out_proj, which lorakit's module rules keep LoRA off, are refused the same way.)"""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from conftest import build_family

    build_family("zamba").save_pretrained(tmp_path / "base")
    made = look_trained(get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                       LoraConfig(r=4, target_modules="all-linear")), 0.1)
    made.save_pretrained(tmp_path / "adapter")
    with pytest.raises(lorakit.LorakitError, match=r"shared_transf\.\S+, which cannot be merged: its weight is shared"):
        lorakit.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    ids = family_batch("zamba", labels=False)["input_ids"]
    loaded = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert (logits(loaded, ids) - logits(made, ids)).abs().max() <= 1e-5


def test_a_new_head_transformers_quantized_with_the_rest_trains_in_full(tmp_path):
    """A classification head the checkpoint lacks is built as a Linear4bit and never filled; one it has is
    quantized with the rest: either way wrap gives it back in full precision, and it learns."""
    from conftest import build_family
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    build_family("bert").bert.save_pretrained(tmp_path)  # the encoder only, as MiniLM is saved: a new head
    model = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, num_labels=3, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    assert type(model.classifier).__name__ == "Linear4bit"
    plan = lorakit.make_plan(model, lora=lorakit.Lora(r=4))
    assert "classifier" in plan.dequantized and "classifier" not in plan.quantized
    wrapped = lorakit.wrap(model, lora=lorakit.Lora(r=4)).train()
    head = wrapped.base_model.model.classifier.modules_to_save["default"]
    assert type(head) is torch.nn.Linear and head.weight.requires_grad
    first_output(wrapped(**family_batch("bert"))).backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
