"""What ``insight demo`` trains: the digits CNN with a label-smoothed loss, so every stream has work.

``LabelSmoothingCrossEntropy`` turns the class ids into one-hot rows in the graph (``one_hot`` runs on the
AI CPU stream, as MindSpore places OneHot) and smooths them -- ``(1 - e) * one_hot + e / classes`` -- before
a dense softmax cross entropy. With ``compute_streams=2`` the weight-gradient and optimizer work moves to
``aicore1``; with the data sink the batches arrive through GetNext. So a profiled demo shows aicore0,
aicore1, aicpu, the host's feeder and the events between streams.
"""
from __future__ import annotations

import numpy as np

from runtime import nn
from runtime.ops import api as F


class LabelSmoothingCrossEntropy(nn.Cell):
    """Mean softmax cross entropy against one-hot labels smoothed by ``smoothing`` (0: the plain loss)."""

    def __init__(self, num_classes: int = 10, smoothing: float = 0.1):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"LabelSmoothingCrossEntropy: smoothing must be in [0, 1), got {smoothing!r}")
        if int(num_classes) < 2:
            raise ValueError(f"LabelSmoothingCrossEntropy: num_classes must be at least 2, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.on = float(1.0 - smoothing)
        self.off = float(smoothing / num_classes)
        self.loss = nn.SoftmaxCrossEntropyWithLogits(sparse=False, reduction="mean")

    def construct(self, logits, labels):
        hot = F.one_hot(labels, self.num_classes, np.float32)
        target = F.add(F.mul(hot, self.on), self.off)
        return self.loss(logits, target)

    def extend_repr(self):
        return f"num_classes={self.num_classes}, smoothing={1.0 - self.on:g}"
