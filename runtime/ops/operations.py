"""Primitive objects, MindSpore's ``ops.operations`` style: ``P.Gather().add_prim_attr("primitive_target", "CPU")``.

Each object wraps a functional op; attributes added with ``add_prim_attr`` become annotations of the
nodes it creates (e.g. ``primitive_target="CPU"`` pins them to the host for the placement pass).
"""
from __future__ import annotations

from runtime import core
from runtime.ops import api as F


class PrimitiveOp:
    def __init__(self, name: str, fn):
        self.name = name
        self._fn = fn
        self.prim_attrs: dict = {}

    def add_prim_attr(self, key: str, value) -> "PrimitiveOp":
        if key == "primitive_target" and value not in ("CPU", "Ascend", "Device"):
            raise ValueError(f"{self.name}: primitive_target must be 'CPU' or 'Ascend', got {value!r}")
        self.prim_attrs[key] = value
        return self

    def __call__(self, *args, **kwargs):
        with core.annotate(**self.prim_attrs):
            return self._fn(*args, **kwargs)

    def __repr__(self):
        return f"{self.name}({self.prim_attrs or ''})"


_OPS = {
    "Add": F.add, "Sub": F.sub, "Mul": F.mul, "RealDiv": F.div, "Neg": F.neg, "Exp": F.exp, "Log": F.log,
    "Sqrt": F.sqrt, "Rsqrt": F.rsqrt, "Tanh": F.tanh, "Sigmoid": F.sigmoid, "ReLU": F.relu, "GeLU": F.gelu,
    "Maximum": F.maximum, "Minimum": F.minimum, "Cast": F.cast, "Select": F.select, "ReduceSum": F.reduce_sum,
    "ReduceMean": F.reduce_mean, "ReduceMax": F.reduce_max, "Reshape": F.reshape, "Transpose": F.transpose,
    "ExpandDims": F.expand_dims, "Concat": F.concat, "MatMul": F.matmul, "BatchMatMul": F.batch_matmul,
    "Conv2D": F.conv2d, "Softmax": F.softmax, "LogSoftmax": F.log_softmax, "OneHot": F.one_hot,
    "Gather": F.gather, "GatherV2": F.gather, "EmbeddingLookup": F.gather, "Argmax": F.argmax,
}


def __getattr__(name):
    if name in _OPS:
        fn = _OPS[name]
        return lambda: PrimitiveOp(name, fn)
    raise AttributeError(f"runtime.ops.operations has no primitive {name!r}; available: {sorted(_OPS)}")
