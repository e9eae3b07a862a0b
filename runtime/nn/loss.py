"""Loss Cells."""
from __future__ import annotations

from runtime.nn.cell import Cell
from runtime.ops import api as F


class _Loss(Cell):
    def __init__(self, reduction="mean"):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"{type(self).__name__}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction

    def reduce(self, x):
        if self.reduction == "mean":
            return F.reduce_mean(x)
        if self.reduction == "sum":
            return F.reduce_sum(x)
        return x

    def extend_repr(self):
        return f"reduction={self.reduction!r}"


class SoftmaxCrossEntropyWithLogits(_Loss):
    """Cross entropy of softmax(logits). sparse=True: labels are class ids; else one-hot/probabilities."""

    def __init__(self, sparse=False, reduction="none"):
        super().__init__(reduction)
        self.sparse = bool(sparse)

    def construct(self, logits, labels):
        self.check(logits.ndim == 2, f"expects logits of shape (batch, classes) but got {tuple(logits.shape)}")
        if self.sparse:
            self.check(tuple(labels.shape) == (logits.shape[0],),
                       f"sparse labels must have shape ({logits.shape[0]},) for logits {tuple(logits.shape)}, "
                       f"got {tuple(labels.shape)}")
        else:
            self.check(tuple(labels.shape) == tuple(logits.shape),
                       f"one-hot labels must have the logits' shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
        return self.reduce(F.softmax_cross_entropy(logits, labels, self.sparse))


class MSELoss(_Loss):
    def construct(self, pred, target):
        self.check(tuple(pred.shape) == tuple(target.shape),
                   f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        d = F.sub(pred, target)
        return self.reduce(F.mul(d, d))
