"""The shared body of lorakit's offline `evaluate` metrics (scikit-learn, like the Hub's versions)."""

from __future__ import annotations

import datasets
import evaluate


def make_metric(metric_name: str, score):
    """An `evaluate.Metric` class named `metric_name` whose value is `score(references, predictions, **kw)`."""

    class SklearnMetric(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description=f"{metric_name} (scikit-learn), lorakit's offline copy of the Hub metric",
                citation="Pedregosa et al., Scikit-learn: Machine Learning in Python, JMLR 12, 2011.",
                inputs_description="predictions and references: lists of integer class ids",
                features=datasets.Features({"predictions": datasets.Value("int64"),
                                            "references": datasets.Value("int64")}),
            )

        def _compute(self, predictions, references, **kwargs):
            return {metric_name: float(score(references, predictions, **kwargs))}

    SklearnMetric.__name__ = metric_name.capitalize()
    return SklearnMetric
