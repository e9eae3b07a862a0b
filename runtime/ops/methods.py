"""Tensor operators and methods, attached to ``runtime.core.Tensor`` when ``runtime.ops`` is imported.

``core`` defines Tensor and ``bind``; the ops are built on ``core``. Attaching the operators here (as
JAX's ``array_methods`` does for its arrays) keeps that dependency one-way.
"""
from __future__ import annotations

from runtime.core import Tensor
from runtime.ops import api as F


def _reshape(self, *shape):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    return F.reshape(self, shape)


def _transpose(self, *perm):
    if len(perm) == 1 and isinstance(perm[0], (tuple, list)):
        perm = tuple(perm[0])
    return F.transpose(self, perm or None)


_METHODS = {
    "__add__": lambda self, o: F.add(self, o),
    "__radd__": lambda self, o: F.add(o, self),
    "__sub__": lambda self, o: F.sub(self, o),
    "__rsub__": lambda self, o: F.sub(o, self),
    "__mul__": lambda self, o: F.mul(self, o),
    "__rmul__": lambda self, o: F.mul(o, self),
    "__truediv__": lambda self, o: F.div(self, o),
    "__rtruediv__": lambda self, o: F.div(o, self),
    "__neg__": lambda self: F.neg(self),
    "__pow__": lambda self, o: F.pow(self, o),
    "__matmul__": lambda self, o: F.matmul(self, o),
    "__lt__": lambda self, o: F.less(self, o),
    "__le__": lambda self, o: F.less_equal(self, o),
    "__gt__": lambda self, o: F.greater(self, o),
    "__ge__": lambda self, o: F.greater_equal(self, o),
    "reshape": _reshape,
    "transpose": _transpose,
    "T": property(lambda self: _transpose(self)),
    "sum": lambda self, axis=None, keepdims=False: F.reduce_sum(self, axis, keepdims),
    "mean": lambda self, axis=None, keepdims=False: F.reduce_mean(self, axis, keepdims),
    "astype": lambda self, dtype: F.cast(self, dtype),
}

for _name, _fn in _METHODS.items():
    setattr(Tensor, _name, _fn)
