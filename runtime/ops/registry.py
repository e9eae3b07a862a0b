"""The primitive registry.

A Primitive carries everything passes need to know about an op:
  * ``infer(shapes, dtypes, attrs) -> (shape, dtype)`` -- raises ShapeError on bad input;
  * ``kernel(*arrays, **attrs) -> ndarray``           -- numpy or Cython;
  * ``grad(g, out, *inputs, **attrs) -> [grad or None per input]`` -- written with the
    functional ops API, so the backward is itself a graph of primitives;
  * ``category`` for fusion: elementwise / broadcast / reduce / injective / opaque / source / effect;
  * ``cost(node) -> (flops, bytes)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from runtime.ir import graph as _ir

CATEGORIES = ("elementwise", "broadcast", "reduce", "injective", "opaque", "source", "effect", "copy")


class ShapeError(ValueError):
    """Raised at graph build when an op's inputs do not fit together."""


@dataclass
class Primitive:
    name: str
    category: str
    infer: Callable
    kernel: Callable
    grad: Callable | None = None
    flops_per_element: float = 1.0
    cost_fn: Callable | None = None
    differentiable_inputs: tuple | None = None  # None: all float inputs
    attrs_doc: str = ""
    extra: dict = field(default_factory=dict)

    def cost(self, node) -> tuple[int, int]:
        if self.cost_fn is not None:
            return self.cost_fn(node)
        nbytes = node.nbytes + sum(i.nbytes for i in node.inputs)
        if self.category in ("injective", "source", "effect"):
            return 0, nbytes
        if self.category == "reduce":
            return int(sum(i.size for i in node.inputs)), nbytes
        return int(self.flops_per_element * node.size), nbytes


_REGISTRY: dict[str, Primitive] = {}


def register(prim: Primitive) -> Primitive:
    if prim.category not in CATEGORIES:
        raise ValueError(f"primitive {prim.name}: unknown category {prim.category!r}")
    if prim.name in _REGISTRY:
        raise ValueError(f"primitive {prim.name} registered twice")
    _REGISTRY[prim.name] = prim
    return prim


def get_primitive(name: str) -> Primitive:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown primitive {name!r}") from None


def all_primitives() -> dict[str, Primitive]:
    return dict(_REGISTRY)


def infer_node(node) -> tuple:
    """(shape, dtype) of ``node`` re-inferred from its inputs by its primitive's rule."""
    prim = get_primitive(node.op)
    return prim.infer([i.shape for i in node.inputs], [i.dtype for i in node.inputs], node.attrs)


_ir.set_inference(infer_node)


def normalize_axes(axis, ndim: int, opname: str) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (int(axis),)
    out = []
    for a in axis:
        a = int(a)
        if not -ndim <= a < ndim:
            raise ShapeError(f"{opname}: axis {a} is out of range for a {ndim}-d tensor")
        out.append(a % ndim)
    return tuple(sorted(set(out)))


def broadcast_shapes(a: tuple, b: tuple, opname: str) -> tuple:
    try:
        return tuple(np.broadcast_shapes(tuple(a), tuple(b)))
    except ValueError:
        raise ShapeError(f"{opname}: shapes {tuple(a)} and {tuple(b)} cannot be broadcast together") from None
