"""From `datasets` sources to tokenized train/eval sets, with clear errors.

Sources: a `datasets.Dataset`, a CSV/TSV/JSON(L)/parquet file, a local
folder, or a Hub dataset name. Padding is dynamic (the collators pad each
batch to its longest row).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .errors import LorakitError

logger = logging.getLogger("lorakit")
_BUILDERS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
             ".jsonl": ("json", {}), ".parquet": ("parquet", {})}


def load_table(source: Any, split: str = "train") -> Any:
    """A `datasets.Dataset` from a Dataset, a file, a folder or a Hub name."""
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        return source[split]
    path = Path(str(source)).expanduser()
    if path.is_file():
        if path.suffix.lower() not in _BUILDERS:
            raise LorakitError(f"cannot read {path.name}: unknown file type",
                               hint=f"use one of {', '.join(_BUILDERS)}")
        builder, kwargs = _BUILDERS[path.suffix.lower()]
        try:
            return datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        except ValueError as exc:
            if "no data" in str(exc):
                raise LorakitError(f"the dataset {path.name} is empty", hint="check the file") from None
            raise LorakitError(f"cannot read {path.name}: {exc}", hint="check the file's format") from None
    if path.is_dir():
        return datasets.load_dataset(str(path), split=split)
    try:
        return datasets.load_dataset(str(source), split=split)
    except Exception as exc:  # noqa: BLE001 - the Hub's many failure types all mean "not found here"
        raise LorakitError(f"cannot load dataset {source!r}: {exc}",
                           hint="pass a local file (csv, tsv, json, jsonl, parquet) or folder") from None


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


def _check_columns(table: Any, *columns: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise LorakitError(f"the dataset has no column {', '.join(map(repr, missing))}",
                           hint=f"its columns are: {', '.join(table.column_names)}; pass text_column=/label_column=")
    if len(table) == 0:
        raise LorakitError("the dataset is empty", hint="check the file and the split")


def classification_data(source: Any, tokenizer: Any, *, text_column: str = "text", label_column: str = "label",
                        labels: list | None = None, num_labels: int | None = None, max_length: int = 128,
                        split: str = "train") -> tuple[Any, list]:
    """(tokenized dataset with `labels`, label names). String labels map to ids in `labels` order
    (default: sorted); integer labels must lie in [0, num_labels)."""
    table = load_table(source, split)
    _check_columns(table, text_column, label_column)
    ensure_pad_token(tokenizer)
    values = table[label_column]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        names = labels or list(range(max(values) + 1))
        ids = values
    else:
        names = list(labels) if labels is not None else sorted(set(values))
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise LorakitError(f"labels {unknown} are not in the label list {names}", hint="pass labels=[...]")
        index = {name: i for i, name in enumerate(names)}
        ids = [index[v] for v in values]
    limit = num_labels if num_labels is not None else len(names)
    bad = sorted({i for i in ids if not 0 <= i < limit})
    if bad:
        raise LorakitError(f"label ids {bad} are outside num_labels={limit}",
                           hint=f"load the model with num_labels={max(ids) + 1} or fix the labels")
    table = table.add_column("labels", ids) if "labels" not in table.column_names else table

    def tokenize(batch: dict) -> dict:
        return tokenizer(batch[text_column], truncation=True, max_length=max_length)

    keep = {"labels"}
    return table.map(tokenize, batched=True, remove_columns=[c for c in table.column_names if c not in keep]), names


def causal_lm_data(source: Any, tokenizer: Any, *, text_column: str = "text", max_length: int = 256,
                   pack: bool = False, split: str = "train") -> Any:
    """Tokenized text for causal LM; `pack=True` concatenates and cuts into max_length blocks."""
    table = load_table(source, split)
    _check_columns(table, text_column)
    ensure_pad_token(tokenizer)

    def tokenize(batch: dict) -> dict:
        texts = [t + tokenizer.eos_token for t in batch[text_column]] if pack else batch[text_column]
        return tokenizer(texts, truncation=not pack, max_length=None if pack else max_length)

    tokenized = table.map(tokenize, batched=True, remove_columns=table.column_names)
    if not pack:
        return tokenized

    def group(batch: dict) -> dict:
        joined = {k: sum(batch[k], []) for k in batch}
        usable = len(joined["input_ids"]) // max_length * max_length
        return {k: [v[i:i + max_length] for i in range(0, usable, max_length)] for k, v in joined.items()}

    return tokenized.map(group, batched=True)


def collator(tokenizer: Any, task: str = "seq-cls") -> Any:
    """Dynamic padding: `DataCollatorWithPadding` for classification, LM collator (labels = inputs) for causal LM."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

    ensure_pad_token(tokenizer)
    if task == "causal-lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorWithPadding(tokenizer)
