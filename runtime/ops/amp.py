"""Primitives of mixed-precision training (used by ``runtime/train/amp.py``).

* ``scale_gradient(x, scale)`` -- the identity forward; its backward multiplies the incoming gradient by
  ``scale``. Applied to the loss, every gradient in the step comes out scaled by the loss scale while the
  reported loss stays unscaled (MindSpore's loss scaling: ``loss * scale`` seen only by the backward).
* ``all_finite(*xs)`` -- a bool scalar: no input holds an inf or NaN (MindSpore's overflow check,
  NPUGetFloatStatus / NPUClearFloatStatus on Ascend, reduced to one flag).
"""
from __future__ import annotations

import numpy as np

from runtime.core import Tensor, bind
from runtime.ops.registry import Primitive, ShapeError, register


def scale_gradient(x, scale) -> Tensor:
    return bind("scale_gradient", [x, scale])


def all_finite(tensors) -> Tensor:
    tensors = list(tensors)
    if not tensors:
        raise ValueError("all_finite: needs at least one tensor")
    return bind("all_finite", tensors)


def _scale_infer(shapes, dtypes, attrs):
    if np.dtype(dtypes[0]).kind != "f" or np.dtype(dtypes[1]).kind != "f":
        raise ShapeError(f"scale_gradient: expects float inputs, got {np.dtype(dtypes[0])} and {np.dtype(dtypes[1])}")
    if tuple(shapes[1]) != ():
        raise ShapeError(f"scale_gradient: the scale must be a scalar, got shape {tuple(shapes[1])}")
    return shapes[0], dtypes[0]


def _scale_grad(g, y, x, scale):
    s = scale if scale.dtype == g.dtype else bind("cast", [scale], {"dtype": g.dtype.name})
    return [bind("mul", [g, s]), None]


def _finite_infer(shapes, dtypes, attrs):
    for s, d in zip(shapes, dtypes):
        if np.dtype(d).kind != "f":
            raise ShapeError(f"all_finite: expects float tensors, got {np.dtype(d)} of shape {tuple(s)}")
    return (), np.dtype(np.bool_)


def _finite_kernel(*arrays):
    return np.asarray(all(bool(np.isfinite(a).all()) for a in arrays))


register(Primitive("scale_gradient", "opaque", _scale_infer, lambda x, scale: x.copy(), _scale_grad,
                   cost_fn=lambda n: (0, 2 * n.nbytes),
                   extra={"gradcheck": "tests/test_gnn.py"}))
register(Primitive("all_finite", "opaque", _finite_infer, _finite_kernel,
                   cost_fn=lambda n: (sum(i.size for i in n.inputs), sum(i.nbytes for i in n.inputs) + 1)))
