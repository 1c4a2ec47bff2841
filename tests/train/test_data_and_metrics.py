"""Data helpers (datasets -> tokenized sets) and the offline evaluate metrics."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import minilm_path

import lorakit


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def write(path, text):
    path.write_text(text)
    return path


def test_csv_tsv_json_and_parquet_give_the_same_tokenized_rows(tmp_path, tokenizer):
    import datasets

    rows = {"text": ["good stuff", "awful", "meh it is ok"], "label": ["positive", "negative", "neutral"]}
    table = datasets.Dataset.from_dict(rows)
    table.to_csv(str(tmp_path / "d.csv"), index=False)
    table.to_csv(str(tmp_path / "d.tsv"), index=False, sep="\t")
    table.to_json(str(tmp_path / "d.jsonl"))
    table.to_parquet(str(tmp_path / "d.parquet"))
    results = [lorakit.classification_data(tmp_path / f"d.{ext}", tokenizer)
               for ext in ("csv", "tsv", "jsonl", "parquet")]
    for data, names in results:
        assert names == ["negative", "neutral", "positive"]  # sorted when not given
        assert data["labels"] == [2, 0, 1]
        assert data["input_ids"] == results[0][0]["input_ids"]
    assert data["input_ids"][0][0] == tokenizer.cls_token_id


def test_missing_column_lists_what_exists(tmp_path, tokenizer):
    path = write(tmp_path / "d.csv", "review,rating\nfine,positive\n")
    with pytest.raises(lorakit.LorakitError, match="review, rating"):
        lorakit.classification_data(path, tokenizer)


def test_labels_outside_num_labels_and_empty_data(tmp_path, tokenizer):
    path = write(tmp_path / "d.csv", "text,label\na,0\nb,3\n")
    with pytest.raises(lorakit.LorakitError, match=r"outside num_labels=3"):
        lorakit.classification_data(path, tokenizer, num_labels=3)
    with pytest.raises(lorakit.LorakitError, match="not in the label list"):
        lorakit.classification_data(write(tmp_path / "e.csv", "text,label\na,good\n"), tokenizer, labels=["bad"])
    with pytest.raises(lorakit.LorakitError, match="empty"):
        lorakit.classification_data(write(tmp_path / "f.csv", "text,label\n"), tokenizer)


def test_tokenizer_without_pad_token_gets_eos_and_says_so(caplog):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, "hello": 1, "world": 2, "[UNK]": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="[UNK]")
    assert tok.pad_token is None
    data = lorakit.causal_lm_data(_table(), tok, max_length=4, pack=True)
    assert tok.pad_token == "</s>" and "no pad token" in caplog.text
    # 3+1, 4+1 (split 4 | 1) and 1+1 tokens with EOS: whole pieces packed into rows of at most 4, none dropped
    assert data["input_ids"] == [[1, 2, 1, 0], [2, 1, 2, 2], [0, 1, 0]]
    batch = lorakit.collator(tok, "causal-lm")([{"input_ids": [1, 2]}, {"input_ids": [1]}])
    assert batch["input_ids"].shape == (2, 2) and batch["labels"][1, 1] == -100


def _table():
    import datasets

    return datasets.Dataset.from_dict({"text": ["hello world hello", "world hello world world", "hello"]})


def test_offline_metrics_match_hand_computation():
    from transformers import EvalPrediction

    compute = lorakit.classification_metrics(offline=True)
    logits = np.eye(3)[[0, 1, 2, 0, 2]]
    labels = np.array([0, 1, 1, 0, 2])
    result = compute(EvalPrediction(predictions=logits, label_ids=labels))
    # per class (precision, recall): 0 -> (1, 1); 1 -> (1, 1/2); 2 -> (1/2, 1)
    assert result["accuracy"] == pytest.approx(4 / 5)
    assert result["precision"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert result["recall"] == pytest.approx((1 + 0.5 + 1) / 3)
    f1 = [1.0, 2 * 0.5 / 1.5, 2 * 0.5 / 1.5]
    assert result["f1"] == pytest.approx(sum(f1) / 3)


def test_metric_that_needs_the_hub_is_a_clear_error():
    with pytest.raises(lorakit.LorakitError, match="offline metrics are"):
        lorakit.load_metric("bleu", offline=True)


def _word_tokenizer(eos: bool = True):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, "hello": 1, "world": 2, "[UNK]": 3, "[PAD]": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]",
                                   **({"eos_token": "</s>"} if eos else {}))


def test_string_column_named_labels_maps_to_ids(tokenizer):
    import datasets

    table = datasets.Dataset.from_dict({"text": ["good", "bad", "fine"], "labels": ["pos", "neg", "pos"]})
    data, names = lorakit.classification_data(table, tokenizer, label_column="labels")
    assert names == ["neg", "pos"] and data["labels"] == [1, 0, 1]


def test_missing_label_empty_file_and_empty_folder_are_clear_errors(tmp_path, tokenizer):
    path = write(tmp_path / "d.csv", "text,label\na,pos\nb,\nc,neg\n")
    with pytest.raises(lorakit.LorakitError, match="row 1 has no 'label'"):
        lorakit.classification_data(path, tokenizer)
    with pytest.raises(lorakit.LorakitError, match="empty"):
        lorakit.classification_data(write(tmp_path / "z.csv", ""), tokenizer)
    (tmp_path / "folder").mkdir()
    with pytest.raises(lorakit.LorakitError, match="holds no data files"):
        lorakit.classification_data(tmp_path / "folder", tokenizer)


def test_causal_lm_data_needs_an_eos_token():
    with pytest.raises(lorakit.LorakitError, match="no EOS token"):
        lorakit.causal_lm_data(_table(), _word_tokenizer(eos=False), pack=True)


def test_packing_texts_shorter_than_max_length_keeps_them_all():
    tok = _word_tokenizer()
    data = lorakit.causal_lm_data(_table(), tok, max_length=64, pack=True)
    # all three texts (4 + 5 + 2 tokens with their EOS) in one row, positions restarting per text
    assert data["input_ids"] == [[1, 2, 1, 0, 2, 1, 2, 2, 0, 1, 0]]
    assert data["position_ids"] == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1]]
    assert data["labels"] == data["input_ids"]


def test_token_classification_and_seq2seq_collators_pad_labels_with_minus_100():
    tok = _word_tokenizer()
    rows = [{"input_ids": [1, 2, 1], "labels": [0, 1, 0]}, {"input_ids": [2], "labels": [1]}]
    for task in ("token-cls", "seq2seq"):
        batch = lorakit.collator(tok, task)([dict(r) for r in rows])
        assert batch["labels"].tolist() == [[0, 1, 0], [1, -100, -100]], task
        assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]], task
    with pytest.raises(lorakit.LorakitError, match="no collator for task 'image-cls'"):
        lorakit.collator(tok, "image-cls")


def test_training_without_an_eval_set_needs_no_eval_strategy(tmp_path):
    import datasets
    from conftest import build

    rows = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]] * 4, "labels": [[1, 2, 3, 4]] * 4})
    args = lorakit.training_args(str(tmp_path), max_steps=1, save_strategy="no", use_cpu=True, disable_tqdm=True)
    lorakit.LoraTrainer(model=build("llama"), args=args, train_dataset=rows, lora=lorakit.Lora(r=2)).train()
    args = lorakit.training_args(str(tmp_path), max_steps=1, save_strategy="no", use_cpu=True)
    lorakit.LoraTrainer(model=build("llama"), args=args, train_dataset=rows, eval_dataset=rows,
                        lora=lorakit.Lora(r=2))
    assert args.eval_strategy == "epoch"  # an eval set turns per-epoch evaluation on


def test_packed_rows_reach_the_collator_through_trainer_with_their_sample_starts(tmp_path):
    """Trainer drops columns the model's forward does not take; position_ids survive, so packing does."""
    import datasets
    from conftest import build

    tok = _word_tokenizer()
    texts = ["hello world hello"] * 4 + ["world"] * 4
    data = lorakit.causal_lm_data(datasets.Dataset.from_dict({"text": texts}), tok, max_length=16, pack=True)
    batches = []
    collate = lorakit.collator(tok, "causal-lm")
    args = lorakit.training_args(str(tmp_path), max_steps=1, per_device_train_batch_size=8, save_strategy="no",
                                 use_cpu=True, disable_tqdm=True)
    lorakit.LoraTrainer(model=build("llama"), args=args, train_dataset=data, lora=lorakit.Lora(r=2),
                        data_collator=lambda rows: batches.append(collate(rows)) or batches[-1]).train()
    positions = batches[0]["position_ids"][0].tolist()  # the sampler shuffles the two packed rows
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    # four "world</s>" and four "hello world hello</s>"
    assert sorted(b - a for a, b in zip(starts, starts[1:])) == [2] * 4 + [4] * 4
    assert "attention_mask" not in batches[0]
