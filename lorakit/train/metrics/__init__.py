"""Metrics through `evaluate`, with an offline path.

`evaluate.load("accuracy")` fetches the metric script from the Hub at run
time. That real path is used when the Hub is reachable. Offline, the same
metrics load from the small `evaluate` modules in this folder, by path: they
are ordinary `evaluate.Metric`s computed with scikit-learn, as the Hub's are.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ...core.errors import LorakitError
from ...model.load import hub_reachable

OFFLINE_METRICS = ("accuracy", "precision", "recall", "f1")
logger = logging.getLogger("lorakit")


def load_metric(name: str, *, offline: bool | None = None) -> Any:
    """`evaluate.load(name)` when the Hub is reachable, else lorakit's bundled module of the same name."""
    import evaluate

    if offline is None:
        offline = not hub_reachable()
    if not offline:
        try:
            return evaluate.load(name)
        except Exception as exc:  # noqa: BLE001 - any Hub failure falls back to the bundled module
            logger.warning("evaluate.load(%r) failed (%s); using lorakit's offline module", name, exc)
    if name not in OFFLINE_METRICS:
        raise LorakitError(f"metric {name!r} needs the Hub, which is not reachable",
                           hint=f"offline metrics are: {', '.join(OFFLINE_METRICS)}")
    return evaluate.load(str(Path(__file__).parent / f"{name}.py"))


def classification_metrics(names: tuple[str, ...] = OFFLINE_METRICS, *, average: str = "macro",
                           offline: bool | None = None) -> Any:
    """A `compute_metrics` for `Trainer`: argmax of the logits against the labels."""
    import numpy as np

    metrics = {name: load_metric(name, offline=offline) for name in names}

    def compute(eval_prediction: Any) -> dict[str, float]:
        if hasattr(eval_prediction, "predictions"):  # transformers.EvalPrediction
            logits, labels = eval_prediction.predictions, eval_prediction.label_ids
        else:
            logits, labels = eval_prediction[0], eval_prediction[1]
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = np.argmax(logits, axis=-1)
        results: dict[str, float] = {}
        for name, metric in metrics.items():
            kwargs = {} if name == "accuracy" else {"average": average}
            results.update(metric.compute(predictions=predictions, references=labels, **kwargs))
        return {k: float(v) for k, v in results.items()}

    return compute
