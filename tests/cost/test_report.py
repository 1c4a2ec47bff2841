"""report(): exact against peft applied for real, on every architecture, with and
without quantization; offline from configs; and the CLI around it."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import build
from _models import CASES

import lorakit
from lorakit.cli import main
from lorakit.plan.accounting import quantized_bytes


def real_parameter_count(model) -> tuple[int, int]:
    """(trainable, total) of a model as it sits in memory; 4-bit weights by their real shape."""
    trainable = total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        n = math.prod(state.shape) if state is not None else p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def rows(report):
    return [dataclasses.asdict(r) for r in report.rows] + [dataclasses.asdict(report.total)]


@pytest.mark.parametrize("arch", list(CASES))
def test_counts_equal_peft_applied_for_real(arch):
    from peft import LoraConfig, get_peft_model

    spec, _, _, peft_kwargs = CASES[arch]
    predicted = lorakit.report(build(arch), lora=spec)
    by_hand = get_peft_model(build(arch), LoraConfig(r=spec["r"], lora_alpha=8, **peft_kwargs))
    trainable, total = by_hand.get_nb_trainable_parameters()
    assert predicted.total.trainable_parameters == trainable
    assert predicted.total.parameters == total
    base_total = sum(p.numel() for p in build(arch).parameters())
    assert predicted.total.full_finetune_trainable_parameters == base_total
    # the real wrapped model, counted tensor by tensor, gives the same rows as the prediction
    assert rows(lorakit.report(lorakit.wrap(build(arch), lora=spec))) == rows(predicted)


@pytest.mark.parametrize("quant", ["8bit", "4bit"])
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5", "vit", "mlp"])
def test_quantized_counts_and_bytes_equal_the_real_quantized_model(arch, quant):
    spec = CASES[arch][0]
    predicted = lorakit.report(build(arch), lora=spec, quant=quant)
    wrapped = lorakit.wrap(build(arch), lora=spec, quant=quant)
    real = lorakit.report(wrapped)
    assert rows(real) == rows(predicted)
    trainable, total = real_parameter_count(wrapped)
    assert (predicted.total.trainable_parameters, predicted.total.parameters) == (trainable, total)
    # peft's own total counts a 4-bit weight as numel*2 of its packed bytes; ours counts real parameters
    unwrapped_total = sum(p.numel() for p in build(arch).parameters())
    assert predicted.total.parameters - predicted.total.lora_parameters >= unwrapped_total


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(64, 64), (96, 40), (33, 7), (512, 256)])
def test_quantized_byte_formula_matches_bitsandbytes(shape, double_quant):
    import bitsandbytes as bnb

    from lorakit.plan.accounting import quant_state_bytes as _state_bytes

    weight = torch.randn(*shape)
    param = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=double_quant)
    param = param.to("cpu")
    real = param.numel() * param.element_size() + _state_bytes(param.quant_state)
    quant = lorakit.Quant(bits=4, double_quant=double_quant)
    assert quantized_bytes(weight.numel(), shape[0], quant) == real
    int8 = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
    assert quantized_bytes(weight.numel(), shape[0], lorakit.Quant(bits=8)) == int8.numel() + 4 * int8.SCB.numel()


def test_memory_arithmetic_by_hand():
    model = build("mlp")  # 16*32+32 + 32*32+32 + 32*4+4 = 1732 fp32 parameters
    full = lorakit.report(model, freeze="re:net\\.0\\.")
    t = full.total
    assert t.parameters == 1732 and t.trainable_parameters == 1732 - 16 * 32 - 32
    assert t.weight_bytes == 4 * 1732
    assert t.gradient_bytes == 4 * t.trainable_parameters
    assert t.optimizer_bytes == 8 * t.trainable_parameters
    assert t.full_finetune_memory_bytes == (4 + 4 + 8) * 1732
    sgd = lorakit.report(model, freeze="re:net\\.0\\.", optimizer="sgd")
    assert sgd.total.optimizer_bytes == 0


def test_config_report_is_the_meta_build_and_offline():
    from transformers import AutoModelForCausalLM

    from lorakit.model.load import resolve_config

    result = lorakit.report("meta-llama/Llama-3.1-70B", lora=8, quant="4bit")
    assert result.total.full_finetune_trainable_parameters == 70_553_706_496
    # r=8 on q,k,v,o,gate,up,down of 80 blocks: 8*(in+out) per layer, from the published dimensions
    h, kv, ff = 8192, 1024, 28672
    per_block = 8 * ((h + h) * 2 + (h + kv) * 2 + (h + ff) * 3)
    assert result.total.lora_parameters == 80 * per_block
    config = resolve_config("gpt2")[0]
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    assert lorakit.report(config, lora=8).total.full_finetune_trainable_parameters == sum(
        p.numel() for p in meta.parameters())


def test_layer_rows_kind_rows_and_depth():
    result = lorakit.report(build("bert"), lora=4)
    names = [r.name for r in result.rows]
    assert names == ["embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2", "head"]
    by_kind = {r.name: r for r in lorakit.report(build("bert"), lora=4, by="kind").rows}
    assert set(by_kind) == {"Embedding", "Norm", "Linear"}
    assert by_kind["Linear"].lora_parameters == result.total.lora_parameters
    deep = lorakit.report(build("bert"), lora=4, by=5)
    assert "bert.encoder.layer.0.attention" in [r.name for r in deep.rows]
    for view in (by_kind.values(), deep.rows):
        assert sum(r.trainable_parameters for r in view) == result.total.trainable_parameters


def test_batch_and_sequence_add_the_simulated_step():
    result = lorakit.report(build("llama"), lora=4, batch_size=2, seq_len=16)
    assert result.simulation.settings["batch_size"] == 2 and result.simulation.settings["seq_len"] == 16
    assert result.activation_bytes == result.simulation.breakdown["activations"] > 0
    assert "fake tensors" in result.activation_note


# ---- CLI -----------------------------------------------------------------

def test_cli_json_is_stable(capsys):
    assert main(["compare-parameters", "bert-base-uncased", "--task", "seq-cls", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("total_parameters", "trainable_parameters", "full_finetune_trainable_parameters", "memory", "layers"):
        assert key in data
    for key in ("name", "parameters", "trainable_parameters", "full_finetune_trainable_parameters"):
        assert key in data["layers"][0]
    # bert-base-uncased + 2-label head: 109,483,778 parameters (published), plus LoRA on q,v of 12 blocks
    assert data["full_finetune_trainable_parameters"] == 109_483_778
    assert data["lora_parameters"] == 12 * 2 * 8 * (768 + 768)


def test_cli_table_markdown_csv_and_plot(tmp_path, capsys):
    assert main(["compare-parameters", "gpt2"]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.11" in out and "ratio" in out
    assert main(["compare-parameters", "gpt2", "--format", "markdown", "--by", "kind"]) == 0
    assert "| Linear |" in capsys.readouterr().out
    csv_path = tmp_path / "r.csv"
    plot_path = tmp_path / "r.png"
    assert main(["compare-parameters", "t5-base", "--format", "csv", "--output", str(csv_path), "--plot",
                 str(plot_path)]) == 0
    assert csv_path.read_text().startswith("name,parameters,")
    assert plot_path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv,words", [
    (["compare-parameters", "llama-3.1-8c"], "Llama-3.1-8B"),
    (["compare-parameters", "gpt2", "--no-lora", "--lora-r", "4"], "contradicts"),
    (["compare-parameters", "gpt2", "--depth", "2", "--by", "kind"], "contradict"),
    (["compare-parameters", "gpt2", "--plot", "/nonexistent/dir/p.png"], "does not exist"),
    (["compare-parameters", "gpt2", "--lora-targets", "q_proj"], "no LoRA-able module"),
    (["compare-parameters", "gpt2", "--lora-r", "0"], "positive integer"),
    (["compare-parameters", "gpt2", "--batch-size", "2"], "go together"),
])
def test_cli_user_mistakes_are_one_line_errors(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err and "Traceback" not in err
    assert "hint:" in err or "contradicts" in err


def test_cli_refuses_to_overwrite_without_force(tmp_path, capsys):
    target = tmp_path / "out.json"
    target.write_text("keep me")
    assert main(["compare-parameters", "gpt2", "--output", str(target)]) == 2
    assert target.read_text() == "keep me" and "--force" in capsys.readouterr().err
    assert main(["compare-parameters", "gpt2", "--output", str(target), "--force", "--format", "json"]) == 0
    assert json.loads(target.read_text())["model"] == "gpt2"


def test_cli_config_transformers_cannot_build(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 30,
                                                      "num_attention_heads": 7}))
    assert main(["compare-parameters", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_cli_on_every_bundled_config_and_a_local_dir(tmp_path, capsys):
    from lorakit.spec.zoo import bundled_configs

    for model_id in bundled_configs():
        assert main(["compare-parameters", model_id, "--format", "json"]) == 0, model_id
        assert json.loads(capsys.readouterr().out)["trainable_parameters"] > 0
    build("qwen2").save_pretrained(tmp_path)
    assert main(["compare-parameters", str(tmp_path), "--quant", "8bit", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["spec"]["quant"]["bits"] == 8


def test_targets_and_zoo_commands(capsys):
    assert main(["targets", "bert-base-uncased"]) == 0
    assert "attention.self.query" in capsys.readouterr().out
    assert main(["zoo"]) == 0
    assert "meta-llama/Llama-3.1-70B" in capsys.readouterr().out
