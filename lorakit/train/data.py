"""From `datasets` sources to tokenized train/eval sets, with clear errors.

Sources: a `datasets.Dataset`, a CSV/TSV/JSON(L)/parquet file, a local
folder, or a Hub dataset name. Padding is dynamic (the collators pad each
batch to its longest row).

Causal-LM rows carry their own `labels`, built at tokenization (a copy of
`input_ids`, EOS appended). The collator masks padding by length, never by
comparing ids with the pad id: most chat models pad with their EOS token, and
masking every pad id would mask every EOS, so the model would never learn to
stop. Chat data (`messages`, prompt/completion) is in `lorakit.train.chat`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import LorakitError

logger = logging.getLogger("lorakit")
_BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
             ".jsonl": ("json", {}), ".parquet": ("parquet", {})}
COLLATOR_TASKS = ("seq-cls", "causal-lm", "token-cls", "seq2seq", "masked-lm", "image-text-to-text")


def load_table(source: Any, split: str = "train") -> Any:
    """A `datasets.Dataset` from a Dataset, a file, a folder or a Hub name."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        return source[split]
    path = Path(str(source)).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        try:
            return datasets.load_dataset(str(path), split=split)
        except FileNotFoundError:  # datasets' EmptyDatasetError
            raise LorakitError(f"the folder {path} holds no data files",
                               hint=f"put {', '.join(_BUILDERS)} files in it, or pass a file") from None
    try:
        return datasets.load_dataset(str(source), split=split)
    except Exception as exc:  # noqa: BLE001 - the Hub's many failure types all mean "not found here"
        raise LorakitError(f"cannot load dataset {source!r}: {exc}",
                           hint="pass a local file (csv, tsv, json, jsonl, parquet) or folder") from None


def _read_file(path: Path) -> Any:
    import datasets

    if path.suffix.lower() not in _BUILDERS:
        raise LorakitError(f"cannot read {path.name}: unknown file type", hint=f"use one of {', '.join(_BUILDERS)}")
    if path.stat().st_size == 0:  # datasets answers a bare "An error occurred while generating the dataset"
        raise LorakitError(f"the file {path.name} is empty (0 bytes)", hint="check the file")
    builder, kwargs = _BUILDERS[path.suffix.lower()]
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # noqa: BLE001 - datasets and its readers raise many types for a bad file
        if "no data" in str(exc):
            raise LorakitError(f"the dataset {path.name} is empty", hint="check the file") from None
        raise LorakitError(f"cannot read {path.name}: {exc}", hint="check the file's format") from None


def is_processor(tokenizer: Any) -> bool:
    """A vision-language model's processor (tokenizer and image processor) rather than a tokenizer."""
    return hasattr(tokenizer, "image_processor")


def ensure_pad_token(tokenizer: Any) -> Any:
    """Causal-LM tokenizers often have no pad token; use EOS, and say so."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LorakitError("the tokenizer has neither a pad token nor an EOS token",
                               hint="tokenizer.add_special_tokens({'pad_token': '[PAD]'}) and resize the "
                                    "model's embeddings")
        tokenizer.pad_token = tokenizer.eos_token
        logger.warning("tokenizer had no pad token; set pad_token = eos_token (%r)", tokenizer.eos_token)
    return tokenizer


def check_columns(table: Any, *columns: str) -> None:
    """Raise unless every column exists (naming the ones that do) and the table has rows."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise LorakitError(f"the dataset has no column {', '.join(map(repr, missing))}",
                           hint=f"its columns are: {', '.join(table.column_names)}; pass text_column=/label_column=")
    if len(table) == 0:
        raise LorakitError("the dataset is empty", hint="check the file and the split")


def check_filled(table: Any, *columns: str) -> None:
    """Raise naming the first row whose value is missing (an empty CSV cell reads as None)."""
    for column in columns:
        empty = [i for i, value in enumerate(table[column]) if value is None]
        if empty:
            more = f" (and {len(empty) - 1} more rows)" if len(empty) > 1 else ""
            raise LorakitError(f"row {empty[0]} has no {column!r}{more}",
                               hint="fill or drop those rows (rows count from 0, without the header line)")


def classification_data(source: Any, tokenizer: Any, *, text_column: str = "text", label_column: str = "label",
                        labels: list | None = None, num_labels: int | None = None, max_length: int = 128,
                        split: str = "train") -> tuple[Any, list]:
    """(tokenized dataset with `labels`, label names). String labels map to ids in `labels` order
    (default: sorted); integer labels must lie in [0, num_labels)."""
    table = load_table(source, split)
    check_columns(table, text_column, label_column)
    check_filled(table, text_column, label_column)
    ensure_pad_token(tokenizer)
    values = list(table[label_column])
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        names = labels or list(range(max(values) + 1))
        ids = values
    else:
        names = list(labels) if labels is not None else sorted(set(values), key=str)
        unknown = sorted(set(values) - set(names), key=str)
        if unknown:
            raise LorakitError(f"labels {unknown} are not in the label list {names}", hint="pass labels=[...]")
        index = {name: i for i, name in enumerate(names)}
        ids = [index[v] for v in values]
    limit = num_labels if num_labels is not None else len(names)
    bad = sorted({i for i in ids if not 0 <= i < limit})
    if bad:
        raise LorakitError(f"label ids {bad} are outside num_labels={limit}",
                           hint=f"load the model with num_labels={max(ids) + 1} or fix the labels")
    # Always the ids: a column already named `labels` may hold the label strings themselves.
    if "labels" in table.column_names:
        table = table.remove_columns("labels")
    table = table.add_column("labels", ids)

    def tokenize(batch: dict) -> dict:
        return tokenizer(batch[text_column], truncation=True, max_length=max_length)

    keep = {"labels"}
    return table.map(tokenize, batched=True, remove_columns=[c for c in table.column_names if c not in keep]), names


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise LorakitError("the tokenizer has no EOS token, so the model could not learn where a text ends",
                           hint="tokenizer.add_special_tokens({'eos_token': '</s>'}) and resize the model's "
                                "embeddings, or use the tokenizer the model was trained with")
    return tokenizer.eos_token_id


def causal_lm_data(source: Any, tokenizer: Any, *, text_column: str = "text", max_length: int = 256,
                   pack: bool = False, split: str = "train") -> Any:
    """Tokenized text for causal LM: EOS appended to every text, `labels` = `input_ids`.

    pack=False: one text per row, cut at max_length (how many were cut is logged).
    pack=True: texts longer than max_length are split into max_length pieces (nothing is dropped), and whole
    pieces are packed in order into rows of at most max_length tokens; each row's `position_ids` restart at
    every piece, so `collator(tokenizer, "causal-lm")` keeps the pieces from attending to each other.
    """
    table = load_table(source, split)
    check_columns(table, text_column)
    check_filled(table, text_column)
    ensure_pad_token(tokenizer)
    eos = eos_id(tokenizer)

    def tokenize(batch: dict) -> dict:
        # Untruncated first, so that EOS marks where a text really ends, not where max_length cut it.
        rows, cut = [], []
        for ids in tokenizer(batch[text_column])["input_ids"]:
            ids = ids if ids and ids[-1] == eos else ids + [eos]
            pieces = [ids[i:i + max_length] for i in range(0, len(ids), max_length)] if pack else [ids[:max_length]]
            rows += pieces
            cut += [len(ids) > max_length] * len(pieces)
        return {"input_ids": rows, "labels": [list(r) for r in rows], "cut": cut}

    tokenized = table.map(tokenize, batched=True, remove_columns=table.column_names)
    cut = sum(tokenized["cut"])
    tokenized = tokenized.remove_columns("cut")
    if cut and not pack:
        logger.warning("%d of %d texts were longer than max_length=%d and were cut (and lost their EOS)",
                       cut, len(tokenized), max_length)
    return pack_rows(tokenized, max_length) if pack else tokenized


def pack_rows(dataset: Any, max_length: int) -> Any:
    """Whole samples (rows of `input_ids` and `labels`, each at most max_length long), in order, into rows of at
    most max_length tokens, with `position_ids` restarting at each sample. One pass: linear time.

    `position_ids` rather than a list of lengths, because Trainer keeps only columns the model's forward
    takes (`remove_unused_columns`), and a row must not lose where its samples start.
    """
    def group(batch: dict) -> dict:
        rows: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            if not rows["input_ids"] or len(rows["input_ids"][-1]) + len(ids) > max_length:
                for column in rows.values():
                    column.append([])
            rows["input_ids"][-1] += ids
            rows["labels"][-1] += labels
            rows["position_ids"][-1] += range(len(ids))
        return rows

    return dataset.map(group, batched=True, remove_columns=dataset.column_names)


@dataclass
class CausalLMCollator:
    """Pads causal-LM rows: `labels` padded with -100 by length (rows without labels get labels = input_ids),
    `attention_mask` 0 on padding. Packed rows (with `position_ids`) are split into their samples and
    flattened by transformers' `DataCollatorWithFlattening`: position ids restart per sample and there is no
    attention mask, which sdpa, eager and flash attention read as separate sequences (with `use_cache=False`,
    as Trainer sets it)."""

    tokenizer: Any
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict:
        from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

        if "position_ids" in features[0]:
            return DataCollatorWithFlattening()([sample for row in features for sample in _split_packed(row)])
        features = [f if "labels" in f else dict(f, labels=list(f["input_ids"])) for f in features]
        return DataCollatorForSeq2Seq(self.tokenizer, label_pad_token_id=-100,
                                      pad_to_multiple_of=self.pad_to_multiple_of)(features)


@dataclass
class VisionChatCollator:
    """Pads the chat rows of a vision-language model (`chat_data` with a processor) and turns their images into
    the model's image inputs. `input_ids` are padded with the pad id, `labels` with -100, per-token type ids
    with 0, and an `attention_mask` marks the padding; the processor's own image processor makes
    `pixel_values` (and `image_grid_thw`, `pixel_attention_mask`, ... where the model takes them)."""

    processor: Any

    def __call__(self, features: list[dict]) -> dict:
        import torch

        tokenizer = self.processor.tokenizer
        longest = max(len(f["input_ids"]) for f in features)
        per_token = [k for k in features[0] if k == "input_ids" or k == "labels" or k.endswith("token_type_ids")]
        fill = {"input_ids": tokenizer.pad_token_id, "labels": -100}
        batch = {}
        for key in per_token:
            rows = [list(f[key]) + [fill.get(key, 0)] * (longest - len(f[key])) for f in features]
            batch[key] = torch.tensor(rows)
        batch["attention_mask"] = torch.tensor([[1] * len(f["input_ids"]) + [0] * (longest - len(f["input_ids"]))
                                                for f in features])
        images = [list(f.get("images") or []) for f in features]
        if any(images):
            batch.update(self.processor.image_processor(images=[i for i in images if i], return_tensors="pt"))
        return batch


def _split_packed(row: dict) -> list[dict]:
    positions = list(row["position_ids"])
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return [{"input_ids": list(row["input_ids"][a:b]), "labels": list(row["labels"][a:b])}
            for a, b in zip(starts, starts[1:])]


def collator(tokenizer: Any, task: str = "seq-cls") -> Any:
    """Dynamic padding for a task (`tokenizer`: a processor for image-text-to-text, `VisionChatCollator`):
    seq-cls `DataCollatorWithPadding`, token-cls
    `DataCollatorForTokenClassification`, seq2seq `DataCollatorForSeq2Seq` (labels padded with -100),
    masked-lm `DataCollatorForLanguageModeling`, causal-lm `CausalLMCollator` (see there)."""
    import transformers

    if task not in COLLATOR_TASKS:
        raise LorakitError(f"no collator for task {task!r}", hint=f"tasks are: {', '.join(COLLATOR_TASKS)}")
    if task == "image-text-to-text":
        if not is_processor(tokenizer):
            raise LorakitError("the image-text-to-text collator needs the model's processor, not its tokenizer",
                               hint="pass AutoProcessor.from_pretrained(...) (the one given to chat_data)")
        ensure_pad_token(tokenizer.tokenizer)
        return VisionChatCollator(tokenizer)
    ensure_pad_token(tokenizer)
    if task == "causal-lm":
        return CausalLMCollator(tokenizer)
    if task == "token-cls":
        return transformers.DataCollatorForTokenClassification(tokenizer)
    if task == "seq2seq":
        return transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    if task == "masked-lm":
        return transformers.DataCollatorForLanguageModeling(tokenizer, mlm=True)
    return transformers.DataCollatorWithPadding(tokenizer)
