"""Evaluation metrics."""
from __future__ import annotations

import numpy as np


class Metric:
    def clear(self): ...
    def update(self, logits, labels, loss=None): ...
    def eval(self): ...


class Accuracy(Metric):
    def __init__(self):
        self.clear()

    def clear(self):
        self.correct = 0
        self.total = 0

    def update(self, logits, labels, loss=None):
        logits, labels = np.asarray(logits), np.asarray(labels)
        if labels.ndim == logits.ndim:  # one-hot
            labels = labels.argmax(-1)
        self.correct += int((logits.argmax(-1) == labels).sum())
        self.total += int(labels.shape[0])

    def eval(self):
        if self.total == 0:
            raise RuntimeError("Accuracy: no samples were evaluated")
        return self.correct / self.total


class Loss(Metric):
    def __init__(self):
        self.clear()

    def clear(self):
        self.sum = 0.0
        self.n = 0

    def update(self, logits, labels, loss=None):
        self.sum += float(loss) * int(np.asarray(labels).shape[0])
        self.n += int(np.asarray(labels).shape[0])

    def eval(self):
        if self.n == 0:
            raise RuntimeError("Loss: no samples were evaluated")
        return self.sum / self.n


_METRICS = {"accuracy": Accuracy, "acc": Accuracy, "loss": Loss}


def get_metric(m):
    if isinstance(m, Metric):
        return m
    try:
        return _METRICS[str(m).lower()]()
    except KeyError:
        raise ValueError(f"unknown metric {m!r}; use one of {sorted(_METRICS)}") from None
