"""The tiled MLP (lorakit.cost.tiled_mlp): the same loss and gradients as the whole MLP (LoRA on gate, up and down,
a 4-bit base, gradient checkpointing), one tile's activations instead of the sequence's, the simulator counting
exactly what a real CPU step holds, LoraTrainer training the same adapter with it, and clear refusals where an
MLP does not act on each position alone."""

import pytest
import torch
from conftest import FAMILIES, build_family, family_config

import lorakit
from lorakit.cost.counting import LiveBytes
from lorakit.cost.simulate import simulate
from lorakit.cost.tiled_mlp import tile_count, tiled_mlp, tiled_mlp_blocker


def wide_llama_config(blocks: int = 2):
    """An MLP 16 times as wide as the model, and a sequence many tiles long: the MLP's activations dominate."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=1024, num_hidden_layers=blocks, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=1024,
                       architectures=["LlamaForCausalLM"])


def step(quant=None, tiled=False, checkpointing=False):
    """One forward and backward of the same wrapped model: (loss, every trainable tensor's gradient, live bytes
    at the peak)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = lorakit.wrap(AutoModelForCausalLM.from_config(wide_llama_config()), quant=quant,
                         lora=lorakit.Lora(r=4, targets="all-linear", dropout=0.0)).train()
    for name, parameter in model.named_parameters():  # B starts at zero: give every adapter something to say
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    if checkpointing:
        model.get_base_model().activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 128, (2, 512), generator=torch.Generator().manual_seed(1))
    counter = LiveBytes(cuda=False)
    with counter, tiled_mlp(model) if tiled else torch.enable_grad():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, counter.peak


@pytest.mark.parametrize("quant,checkpointing", [(None, False), ("4bit", False), (None, True)])
def test_the_tiled_mlp_gives_the_loss_and_every_gradient_of_the_whole_one(quant, checkpointing):
    loss, expected, whole = step(quant, tiled=False, checkpointing=checkpointing)
    tiled_loss, got, tiled = step(quant, tiled=True, checkpointing=checkpointing)
    assert expected.keys() == got.keys() and any(".mlp." in k for k in got)
    assert abs(tiled_loss - loss) <= 1e-6
    assert all((got[k] - expected[k]).abs().max() <= 1e-6 for k in expected)
    assert tiled < whole  # the gate, up and activation tensors of 512 tokens never exist whole


def test_tiles_are_as_long_as_the_model_is_wide():
    assert tile_count(512, 64) == 8 and tile_count(100, 64) == 2 and tile_count(10, 4096) == 2


def test_the_simulator_counts_what_a_real_tiled_step_holds_and_the_tiles_save_most_of_it():
    settings = dict(lora=lorakit.Lora(r=8, targets="all-linear"), task="causal-lm", batch_size=1,
                    gradient_checkpointing=True)  # bf16 autocast: flash attention, whose memory is linear
    config = wide_llama_config()
    fake = simulate(config, tiled_mlp=True, seq_len=512, **settings)
    assert fake.settings["tiled_mlp"] and fake.peak_allocated == simulate(
        config, tiled_mlp=True, real=True, seq_len=512, **settings).peak_allocated
    config.intermediate_size = 4096  # an MLP 64 times as wide as the model, over 2048 tokens
    whole, tiled = (simulate(config, tiled_mlp=flag, seq_len=2048, **settings) for flag in (False, True))
    assert not whole.settings["tiled_mlp"] and tiled.peak_allocated <= 0.5 * whole.peak_allocated


def test_lora_trainer_trains_the_same_adapter_with_the_tiled_mlp(tmp_path):
    from transformers import AutoModelForCausalLM

    def trained(folder, **levers):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(wide_llama_config())
        rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 128, (4, 256),
                                                                            generator=torch.Generator().manual_seed(2))]
        args = lorakit.training_args(str(folder), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                                     save_strategy="no", seed=0, gradient_checkpointing=True, **levers)
        trainer = lorakit.LoraTrainer(model=model, args=args, train_dataset=rows,
                                      lora=lorakit.Lora(r=4, targets="all-linear", dropout=0.0))
        trainer.train()
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}

    expected, got = trained(tmp_path / "whole"), trained(tmp_path / "tiled", tiled_mlp=True)
    assert all((got[k] - expected[k]).abs().max() <= 1e-5 for k in expected)


def test_an_mlp_that_is_not_position_wise_is_refused_with_the_reason(tmp_path):
    moe = lorakit.wrap(build_family("qwen3-moe"), lora=lorakit.Lora(r=4))
    assert "mixture-of-experts" in tiled_mlp_blocker(moe)
    with pytest.raises(lorakit.LorakitError, match="mixture-of-experts"):
        lorakit.LoraTrainer(model=moe, args=lorakit.training_args(str(tmp_path), tiled_mlp=True))
    assert "no MLP" in tiled_mlp_blocker(build_family("bert"))
    with pytest.raises(lorakit.LorakitError, match="mixture-of-experts"):
        simulate(family_config("qwen3-moe"), task=FAMILIES["qwen3-moe"]["task"], seq_len=16, tiled_mlp=True)
    # where it is only wanted where it applies (fit's rung), an MoE model runs whole, and the run says why
    sim = simulate(family_config("qwen3-moe"), task=FAMILIES["qwen3-moe"]["task"], seq_len=16, tiled_mlp=None)
    assert not sim.settings["tiled_mlp"] and any("mixture-of-experts" in w for w in sim.warnings)
