"""recall as an `evaluate` module, loaded by path when the Hub is out of reach."""

from sklearn.metrics import recall_score

from lorakit.train.metrics._sklearn import make_metric


def _score(references, predictions, **kwargs):
    kwargs.setdefault("zero_division", 0)
    return recall_score(references, predictions, **kwargs)


Recall = make_metric("recall", _score)
