"""The one IR of the runtime: a Graph of single-output Nodes in topological order.

A Node is (op, inputs, attrs, shape, dtype). Inputs are other Nodes of the same Graph.
`deps` are extra ordering edges (control dependencies) used for side effects: an
`assign` that overwrites a parameter must run after every node that reads it.

Leaf ops:
  * ``input``  -- a value fed per call (a batch of data, labels); attrs["name"].
  * ``param``  -- a persistent variable (a Parameter or optimizer state); attrs["name"],
                  the executor binds it to the variable's storage by name.
  * ``const``  -- a literal; attrs["value"] is a numpy array.

``attrs`` parameterise the kernel (they are passed to it as keyword arguments); ``ann`` holds
annotations for passes and the executor: the training ``phase`` (forward / backward / update),
``primitive_target`` ("CPU" pins an op to the host), and what the placement and stream passes decide.

Every pass is a function Graph -> Graph.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import numpy as np

_ids = itertools.count(1)
_SHOWN_ANN = ("placement", "stream", "fused_ops")


# How verify() re-infers a node's shape and dtype: ``node -> (shape, dtype)``. The primitives live
# above the IR (``runtime.ops`` imports ``runtime.ir``), so the registry installs its rule here.
_infer: Callable[["Node"], tuple] | None = None


def set_inference(fn: Callable[["Node"], tuple]) -> None:
    """Install the shape/dtype rule Graph.verify() checks every node against."""
    global _infer
    _infer = fn


class IRError(Exception):
    """A malformed graph: dangling input, shape or dtype mismatch, cycle."""


class Node:
    __slots__ = ("id", "op", "inputs", "attrs", "shape", "dtype", "deps", "scope", "name", "ann")

    def __init__(self, op: str, inputs: Iterable["Node"], attrs: dict | None, shape, dtype,
                 scope: str = "", deps: Iterable["Node"] = (), ann: dict | None = None):
        self.id = next(_ids)
        self.op = op
        self.inputs = list(inputs)
        self.attrs = dict(attrs or {})
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.deps = list(deps)
        self.scope = scope
        self.name = f"{op}_{self.id}"
        # annotations that passes read and write (phase, primitive_target, placement, stream, ...);
        # unlike attrs they are never passed to the kernel
        self.ann = dict(ann or {})

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __repr__(self):
        return f"<Node %{self.id} {self.op} {self.shape} {self.dtype}>"


def _fmt_attr(v: Any) -> str:
    if isinstance(v, np.ndarray):
        if v.size <= 4:
            return "array(" + np.array2string(v.ravel(), precision=6, separator=",") + ")"
        return f"array<{v.dtype}{list(v.shape)}>"
    if isinstance(v, float):
        return repr(float(np.float32(v))) if abs(v) < 1e30 else repr(v)
    if callable(v) and not isinstance(v, type):
        return "<fn>"
    return repr(v)


class Graph:
    """An ordered list of nodes plus the graph's outputs.

    ``outputs`` maps a name (e.g. "loss") to a node. Side-effect nodes (assign,
    scatter updates) are listed in ``effects`` so dead-code removal keeps them.
    """

    def __init__(self, name: str = "graph"):
        self.name = name
        self.nodes: list[Node] = []
        self.outputs: dict[str, Node] = {}
        self.effects: list[Node] = []
        self.meta: dict[str, Any] = {}

    # -- construction -------------------------------------------------------------
    def add(self, node: Node) -> Node:
        self.nodes.append(node)
        return node

    @property
    def inputs(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "input"]

    @property
    def params(self) -> list[Node]:
        return [n for n in self.nodes if n.op == "param"]

    def users(self) -> dict[int, list[Node]]:
        out: dict[int, list[Node]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out.setdefault(i.id, []).append(n)
        return out

    def roots(self) -> list[Node]:
        return list(self.outputs.values()) + list(self.effects)

    # -- checks ---------------------------------------------------------------------
    def verify(self) -> "Graph":
        """Raise IRError on dangling inputs, cycles (order violations) or bad shapes."""
        if _infer is None:
            raise IRError("Graph.verify: no inference rules are registered (import runtime.ops first)")
        pos = {}
        for idx, n in enumerate(self.nodes):
            if n.id in pos:
                raise IRError(f"{self.name}: node %{n.id} ({n.op}) appears twice")
            pos[n.id] = idx
        for idx, n in enumerate(self.nodes):
            for kind, edges in (("input", n.inputs), ("dependency", n.deps)):
                for i in edges:
                    if i.id not in pos:
                        raise IRError(f"{self.name}: %{n.id} ({n.op}) has a dangling {kind} %{i.id} "
                                      f"({i.op}) that is not in the graph")
                    if pos[i.id] >= idx:
                        raise IRError(f"{self.name}: cycle or order violation: %{n.id} ({n.op}) uses "
                                      f"%{i.id} ({i.op}) which does not come before it")
            if n.op in ("input", "param", "const"):
                if n.op == "const":
                    v = n.attrs.get("value")
                    if not isinstance(v, np.ndarray) or v.shape != n.shape or v.dtype != n.dtype:
                        raise IRError(f"{self.name}: const %{n.id} value does not match {n.shape} {n.dtype}")
                continue
            shape, dtype = _infer(n)
            if tuple(shape) != n.shape or np.dtype(dtype) != n.dtype:
                raise IRError(f"{self.name}: %{n.id} ({n.op}) is recorded as {n.shape} {n.dtype} but its "
                              f"inputs give {tuple(shape)} {np.dtype(dtype)}")
        for name, n in list(self.outputs.items()):
            if n.id not in pos:
                raise IRError(f"{self.name}: output {name!r} is %{n.id}, not in the graph")
        for n in self.effects:
            if n.id not in pos:
                raise IRError(f"{self.name}: effect %{n.id} is not in the graph")
        return self

    # -- text -------------------------------------------------------------------------
    def dump(self) -> str:
        """A stable, diffable text form. Node ids are renumbered from 0 in order."""
        num = {n.id: k for k, n in enumerate(self.nodes)}
        lines = [f"graph {self.name} ({len(self.nodes)} nodes)"]
        for n in self.nodes:
            args = ", ".join(f"%{num[i.id]}" for i in n.inputs)
            attrs = {k: v for k, v in n.attrs.items() if not k.startswith("_")}
            if n.op == "const":
                attrs = {"value": n.attrs["value"]}
            a = ""
            if attrs:
                a = " {" + ", ".join(f"{k}={_fmt_attr(v)}" for k, v in sorted(attrs.items())) + "}"
            d = ""
            if n.deps:
                d = " after(" + ", ".join(f"%{num[i.id]}" for i in n.deps) + ")"
            shape = "x".join(str(s) for s in n.shape) or "scalar"
            shown = {k: n.ann[k] for k in _SHOWN_ANN if k in n.ann}
            if shown:
                d += " [" + ", ".join(f"{k}={v}" for k, v in shown.items()) + "]"
            scope = f"  # {n.scope}" if n.scope else ""
            lines.append(f"  %{num[n.id]} = {n.op}({args}){a}{d} : {n.dtype}[{shape}]{scope}")
        for name, n in self.outputs.items():
            lines.append(f"  output {name} = %{num[n.id]}")
        if self.effects:
            lines.append("  effects " + ", ".join(f"%{num[n.id]}" for n in self.effects))
        return "\n".join(lines)

    def __str__(self):
        return self.dump()

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts


def toposort(nodes: list[Node], roots: Iterable[Node] | None = None) -> list[Node]:
    """Stable topological order of `nodes` (keeps the given order where it is valid)."""
    order: list[Node] = []
    state: dict[int, int] = {}
    for root in (roots if roots is not None else nodes):
        stack = [(root, False)]
        while stack:
            n, done = stack.pop()
            if done:
                if state.get(n.id) != 2:
                    state[n.id] = 2
                    order.append(n)
                continue
            st = state.get(n.id)
            if st == 2:
                continue
            if st == 1:
                raise IRError(f"cycle through %{n.id} ({n.op})")
            state[n.id] = 1
            stack.append((n, True))
            for i in reversed(n.inputs + n.deps):
                if state.get(i.id) != 2:
                    if state.get(i.id) == 1:
                        raise IRError(f"cycle through %{i.id} ({i.op})")
                    stack.append((i, False))
    return order
