"""accuracy as an `evaluate` module, loaded by path when the Hub is out of reach."""

from sklearn.metrics import accuracy_score

from lorakit.train.metrics._sklearn import make_metric


def _score(references, predictions, **kwargs):
    return accuracy_score(references, predictions, **kwargs)


Accuracy = make_metric("accuracy", _score)
