"""precision as an `evaluate` module, loaded by path when the Hub is out of reach."""

from sklearn.metrics import precision_score

from lorakit.train.metrics._sklearn import make_metric


def _score(references, predictions, **kwargs):
    kwargs.setdefault("zero_division", 0)
    return precision_score(references, predictions, **kwargs)


Precision = make_metric("precision", _score)
