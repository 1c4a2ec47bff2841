"""The memory levers (lorakit.cost.levers): the chunked causal-LM loss gives the standard loss and gradients on every
causal-LM family of the hub (or says why not, where it would differ), LoraTrainer trains the same adapter with
it, with activation offload and with LoRA inputs left uncast; the full-vocabulary logits never exist; bad
settings are refused."""

import pytest
import torch
from conftest import FAMILIES, build_family, family_batch

import lorakit
from lorakit.cost.counting import LiveBytes
from lorakit.cost.levers import chunked_loss, chunked_loss_blocker, offloaded_activations, uncast_lora_inputs
from lorakit.cost.simulate import simulate

CAUSAL = [name for name, row in FAMILIES.items() if row["task"] == "causal-lm"]
# where the chunked loss would not be the model's loss, and the words of the reason lorakit gives
BLOCKED = {"gemma2": "soft-capped"}


def _wrapped(model):
    # eval mode: no dropout, so two runs compare (gradients flow all the same)
    model = lorakit.wrap(model.float(), lora=lorakit.Lora(r=4, targets="all-linear", dropout=0.0)).eval()
    for parameter in model.parameters():  # LoRA B starts at zero: give the adapters something to say
        if parameter.requires_grad:
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def _loss_and_gradients(model, batch, chunked, **extra):
    model.zero_grad()
    with chunked_loss(model) if chunked else torch.enable_grad():
        loss = model(**batch, **extra).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _close(a, b, tolerance=1e-5):
    return all((a[k] - b[k]).abs().max() <= tolerance * max(1.0, b[k].abs().max()) for k in b)


@pytest.mark.parametrize("name", CAUSAL)
def test_chunked_loss_equals_the_standard_loss_or_says_why_not(name):
    model = _wrapped(build_family(name))
    batch = family_batch(name)
    batch["labels"][:, :3] = -100  # a masked prompt
    blocker = chunked_loss_blocker(model)
    if name in BLOCKED:
        assert blocker is not None and BLOCKED[name] in blocker
    else:
        assert blocker is None
    for extra in ({}, {"num_items_in_batch": torch.tensor(5)}):  # Trainer's token count under accumulation
        standard, expected = _loss_and_gradients(model, batch, False, **extra)
        chunked, got = _loss_and_gradients(model, batch, True, **extra)
        if blocker is None:
            assert abs(chunked - standard) <= 1e-5 and _close(got, expected), name
        else:  # the reason is real: forced, the chunked loss would train another objective
            assert abs(chunked - standard) > 1e-5 or not _close(got, expected), name


@pytest.mark.parametrize("model_type, scale", [("cohere", {"logit_scale": 0.3}), ("granite", {"logits_scaling": 4.0})])
def test_a_linear_logit_scale_is_kept(model_type, scale):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128, **scale)
    torch.manual_seed(0)
    model = _wrapped(AutoModelForCausalLM.from_config(config))
    batch = {"input_ids": torch.randint(0, 128, (2, 12))}
    batch["labels"] = batch["input_ids"].clone()
    assert chunked_loss_blocker(model) is None
    standard, expected = _loss_and_gradients(model, batch, False)
    chunked, got = _loss_and_gradients(model, batch, True)
    assert abs(chunked - standard) <= 1e-5 and _close(got, expected)


def test_real_smollm2_chunked_loss_equals_the_standard_loss(smollm2):
    # tied embeddings: lm_head's weight is the input embedding's. lorakit's own LoRA start, B a little trained:
    # 30 real layers under adapters of the random size _wrapped gives amplify float32 rounding ~20x
    model = lorakit.wrap(smollm2.model().float(), lora=lorakit.Lora(r=4, targets="all-linear", dropout=0.0)).eval()
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=1e-3)
    ids = smollm2.tokenizer(["The capital of France is Paris.", "Two plus two is four, said the teacher."],
                            padding=True, return_tensors="pt")
    labels = ids["input_ids"].masked_fill(ids["attention_mask"] == 0, -100)
    batch = {**ids, "labels": labels}
    standard, expected = _loss_and_gradients(model, batch, False)
    chunked, got = _loss_and_gradients(model, batch, True)
    assert abs(chunked - standard) <= 1e-5 and _close(got, expected)


def test_lm_head_with_lora_or_trained_in_full_takes_the_standard_loss():
    from conftest import family_config
    from transformers import AutoModelForCausalLM

    from peft import LoraConfig, get_peft_model

    config = family_config("llama")
    lora_on_head = get_peft_model(AutoModelForCausalLM.from_config(config),
                                  LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    assert "LoRA" in chunked_loss_blocker(lora_on_head)
    head_in_full = lorakit.wrap(AutoModelForCausalLM.from_config(config), lora=lorakit.Lora(
        r=4, targets=["q_proj"], train_fully=["lm_head"]))
    assert "trained in full" in chunked_loss_blocker(head_in_full)


def _step_bytes(model, batch, chunked):
    counter = LiveBytes(cuda=False, open_custom_ops=True)  # sees inside torch's chunked op too
    with counter:
        with chunked_loss(model) if chunked else torch.enable_grad():
            loss = model(**batch).loss
        loss.backward()
    return counter.peak, max(storage.size for storage in counter.storages.values())


def test_the_full_vocabulary_logits_never_exist():
    from conftest import family_config
    from transformers import AutoModelForCausalLM

    config = family_config("llama")
    config.vocab_size, config.max_position_embeddings = 8192, 512
    torch.manual_seed(0)
    model = lorakit.wrap(AutoModelForCausalLM.from_config(config), lora=lorakit.Lora(r=4, targets="all-linear"))
    model.train()
    ids = torch.randint(0, config.vocab_size, (4, 512))  # 2048 rows: chunks of 256 on the CPU
    batch = {"input_ids": ids, "labels": ids}
    logits = ids.numel() * config.vocab_size * 4
    standard_peak, standard_largest = _step_bytes(model, batch, False)
    chunked_peak, chunked_largest = _step_bytes(model, batch, True)
    assert standard_largest >= logits  # the float32 logits (and their gradient)
    assert chunked_largest <= logits / 8
    assert chunked_peak <= 0.5 * standard_peak


def _trained(tmp_path, **levers):
    from conftest import family_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config("llama"))
    torch.manual_seed(1)
    rows = []
    for i in range(8):  # prompts of different lengths: num_items_in_batch differs between micro-batches
        ids = torch.randint(0, 128, (16,))
        labels = ids.clone()
        labels[: 2 + 3 * (i % 4)] = -100
        rows.append({"input_ids": ids, "labels": labels})
    args = lorakit.training_args(str(tmp_path / "run"), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                 max_steps=2, learning_rate=1e-2, save_strategy="no", logging_steps=1, seed=0,
                                 **levers)
    trainer = lorakit.LoraTrainer(model=model, args=args, train_dataset=rows,
                                  lora=lorakit.Lora(r=4, targets="all-linear", dropout=0.0))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses, {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_lora_trainer_trains_the_same_adapter_with_each_lever(tmp_path):
    standard, standard_losses, expected = _trained(tmp_path / "a", chunked_loss=False)
    chunked, losses, got = _trained(tmp_path / "b")
    assert not standard._chunked_loss and chunked._chunked_loss
    assert losses == pytest.approx(standard_losses, abs=1e-5) and _close(got, expected)
    checkpointed, _, reference = _trained(tmp_path / "c", gradient_checkpointing=True)
    offloaded, offloaded_losses, got = _trained(tmp_path / "d", gradient_checkpointing=True, activation_offload=True)
    assert offloaded._offload and _close(got, reference)


def test_offload_copies_what_backward_needs_and_gives_the_same_gradients():
    from conftest import family_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = _wrapped(AutoModelForCausalLM.from_config(family_config("llama")))
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 128, (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    _, expected = _loss_and_gradients(model, batch, True)
    counter = LiveBytes(cuda=False)
    with counter, offloaded_activations():
        _, got = _loss_and_gradients(model, batch, True)
    assert counter.host_peak >= 2 * ids.numel() * 32 * 4  # at least the two checkpointed layer inputs
    assert _close(got, expected)


def test_uncast_lora_inputs_keeps_the_autocast_result():
    from conftest import family_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = _wrapped(AutoModelForCausalLM.from_config(family_config("llama")))
    ids = torch.randint(0, 128, (2, 16))
    batch = {"input_ids": ids, "labels": ids}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, expected = _loss_and_gradients(model, batch, False)
        with uncast_lora_inputs(model, True):
            _, got = _loss_and_gradients(model, batch, False)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_bad_lever_settings_are_refused(tmp_path):
    from conftest import family_config

    with pytest.raises(lorakit.LorakitError, match="needs gradient checkpointing"):
        lorakit.training_args(str(tmp_path), activation_offload=True)
    with pytest.raises(lorakit.LorakitError, match="chunked_loss must be"):
        lorakit.training_args(str(tmp_path), chunked_loss="yes")
    bert = build_family("bert")
    with pytest.raises(lorakit.LorakitError, match="causal-LM loss"):
        lorakit.LoraTrainer(model=bert, args=lorakit.training_args(str(tmp_path), chunked_loss=True),
                            lora=lorakit.Lora(r=4))
    gemma2 = build_family("gemma2")
    with pytest.raises(lorakit.LorakitError, match="soft-capped"):
        lorakit.LoraTrainer(model=gemma2, args=lorakit.training_args(str(tmp_path), chunked_loss=True),
                            lora=lorakit.Lora(r=4))
    with pytest.raises(lorakit.LorakitError, match="causal-LM loss"):
        simulate(family_config("bert"), task=FAMILIES["bert"]["task"], seq_len=16, chunked_loss=True)
    with pytest.raises(lorakit.LorakitError, match="needs gradient checkpointing"):
        simulate(family_config("llama"), task="causal-lm", seq_len=16, activation_offload=True)


def test_quantized_model_keeps_its_embeddings_head_and_norms_in_their_dtype():
    from conftest import family_config
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(family_config("llama"), dtype=torch.bfloat16)
    wrapped = lorakit.wrap(model, lora=lorakit.Lora(r=4), quant=lorakit.Quant(bits=4, compute_dtype="bfloat16"))
    kept = {n: p.dtype for n, p in wrapped.named_parameters() if "embed" in n or "lm_head" in n or "norm" in n}
    assert len(kept) == 2 + 2 * 2 + 1 and set(kept.values()) == {torch.bfloat16}  # embed, head, 2 norms x 2, final
    counted = {row.name: row for row in lorakit.report(wrapped).rows}
    head = wrapped.get_base_model().lm_head.weight
    assert counted["head"].weight_bytes == head.numel() * 2  # the report counts them in that dtype too