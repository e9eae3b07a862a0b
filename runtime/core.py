"""Tensors, tracing and op dispatch.

``bind(op, inputs, attrs)`` is the single entry point every op goes through:

* while a ``GraphBuilder`` is active (GRAPH_MODE tracing, or autodiff emitting a backward)
  it infers shape/dtype and appends a Node -- no computation happens;
* otherwise (PYNATIVE_MODE) it runs the primitive's kernel at once. If a ``Tape`` is
  recording, the op is also appended to the tape's graph, so the same IR-level autodiff
  produces the backward for eager code.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from runtime import hooks
from runtime.ir.graph import Graph, Node
from runtime.ops.registry import ShapeError, get_primitive

DEFAULT_FLOAT = np.dtype(np.float32)


class Tensor:
    """A value: concrete (``data`` set) in eager mode, symbolic (only ``node``) while tracing."""

    __array_priority__ = 100
    __slots__ = ("_data", "node", "_shape", "_dtype", "__weakref__")

    def __init__(self, data=None, dtype=None, *, node: Node | None = None):
        if node is not None and data is None:
            self._data = None
            self._shape = node.shape
            self._dtype = node.dtype
        else:
            if isinstance(data, Tensor):
                data = data.asnumpy()
            arr = np.asarray(data)
            if dtype is not None:
                arr = arr.astype(dtype, copy=False)
            elif arr.dtype == np.float64 and not isinstance(data, np.ndarray):
                arr = arr.astype(DEFAULT_FLOAT)
            self._data = arr
            self._shape = arr.shape
            self._dtype = arr.dtype
        self.node = node

    # -- basic properties ---------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return tuple(self._shape)

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def ndim(self) -> int:
        return len(self._shape)

    @property
    def size(self) -> int:
        return int(np.prod(self._shape, dtype=np.int64))

    @property
    def is_symbolic(self) -> bool:
        return self._data is None

    def asnumpy(self) -> np.ndarray:
        if self._data is None:
            raise RuntimeError(
                "this Tensor is symbolic (it is being traced in GRAPH_MODE) and has no value yet; "
                "values can only be read after the graph runs")
        return self._data

    def __repr__(self):
        if self._data is None:
            return f"Tensor(symbolic, shape={self.shape}, dtype={self.dtype})"
        return f"Tensor({np.array2string(self._data, precision=4, threshold=20)}, dtype={self.dtype})"

    def __len__(self):
        return self._shape[0]

    def item(self):
        return self.asnumpy().item()

    def __float__(self):
        return float(self.asnumpy())

    # Operators (+, -, *, /, @, comparisons) and the reshape / transpose / sum / mean / astype methods are
    # attached by ``runtime.ops.methods`` (the way JAX attaches its array methods): they are ops, and ops
    # are built on this module, not the other way round.
    __hash__ = object.__hash__


class Parameter(Tensor):
    __slots__ = ("name", "requires_grad", "_named", "owner")

    def __init__(self, data, name: str | None = None, requires_grad: bool = True):
        if isinstance(data, Tensor):
            data = data.asnumpy()
        arr = np.asarray(data)
        if arr.dtype == np.float64 and not isinstance(data, np.ndarray):
            arr = arr.astype(np.float32)
        super().__init__(np.array(arr, order="C", copy=True))
        self.name = name or "Parameter"
        self._named = name is not None
        self.requires_grad = requires_grad
        self.owner: "Parameter | None" = None  # for optimizer state: the parameter it belongs to

    @property
    def data(self) -> np.ndarray:
        return self._data

    def set_data(self, value) -> None:
        """Overwrite the values in place (shape and dtype must match)."""
        value = np.asarray(value.asnumpy() if isinstance(value, Tensor) else value)
        if value.shape != self._data.shape:
            raise ValueError(f"Parameter {self.name!r}: cannot load a value of shape {value.shape} into "
                             f"shape {self._data.shape}")
        np.copyto(self._data, value.astype(self._data.dtype, copy=False))

    def __repr__(self):
        return f"Parameter(name={self.name!r}, shape={self.shape}, dtype={self.dtype}, " \
               f"requires_grad={self.requires_grad})"


@dataclass
class SparseGrad:
    """Gradient of a (rows, ...) table as rows ``values[k]`` at ``indices[k]`` (duplicates allowed)."""
    indices: Tensor   # (n,) int
    values: Tensor    # (n, ...) rows
    dense_shape: tuple

    def to_dense(self) -> Tensor:
        return bind("gather_grad", [self.indices, self.values], {"num_rows": int(self.dense_shape[0])})


# ----------------------------------------------------------------------------------------
# Scopes: Cell.__call__ pushes its path, so nodes and errors name the Cell.
# ----------------------------------------------------------------------------------------
_scope: list[tuple[str, object]] = []


@contextmanager
def cell_scope(name: str, cell):
    _scope.append((name, cell))
    try:
        yield
    finally:
        _scope.pop()


_forced_scope: list[str] = []


@contextmanager
def scope_override(path: str):
    """Nodes created inside get ``path`` as their scope (autodiff: ``Gradients/<forward scope>``)."""
    _forced_scope.append(path)
    try:
        yield
    finally:
        _forced_scope.pop()


def current_scope() -> str:
    if _forced_scope:
        return _forced_scope[-1]
    return "/".join(n for n, _ in _scope if n)


def current_cell():
    return _scope[-1][1] if _scope else None


def describe_scope() -> str:
    if not _scope:
        return ""
    name, cell = _scope[-1]
    path = current_scope() or type(cell).__name__
    return f"in {cell!r} at '{path}'"


# ----------------------------------------------------------------------------------------
# Builders: where symbolic nodes go.
# ----------------------------------------------------------------------------------------
class GraphBuilder:
    """Collects nodes into ``graph``; maps Parameters (and eager tensors) to leaf nodes."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self._leaf: dict[int, Node] = {}
        self._keep: list = []  # keeps objects alive so their id() stays unique

    def leaf_for(self, t: Tensor) -> Node:
        key = id(t)
        node = self._leaf.get(key)
        if node is not None:
            return node
        if isinstance(t, Parameter):
            node = Node("param", [], {"name": t.name, "_var": t}, t.shape, t.dtype)
        else:
            arr = t.asnumpy()
            node = Node("const", [], {"value": arr}, arr.shape, arr.dtype)
        self.graph.add(node)
        self._leaf[key] = node
        self._keep.append(t)
        return node

    def const(self, arr: np.ndarray) -> Node:
        return self.graph.add(Node("const", [], {"value": arr}, arr.shape, arr.dtype))

    def input(self, name: str, shape, dtype) -> Tensor:
        node = self.graph.add(Node("input", [], {"name": name}, shape, dtype))
        return Tensor(node=node)


_annotations: list[dict] = []


@contextmanager
def annotate(**ann):
    """Annotate every node created inside (e.g. ``phase="backward"``, ``primitive_target="CPU"``)."""
    _annotations.append(ann)
    try:
        yield
    finally:
        _annotations.pop()


def current_annotations() -> dict:
    out: dict = {}
    for a in _annotations:
        out.update(a)
    cell = current_cell()
    if cell is not None and "primitive_target" in getattr(cell, "_attrs", {}):
        out.setdefault("primitive_target", cell._attrs["primitive_target"])
    return out


_builders: list[GraphBuilder] = []


@contextmanager
def building(builder: GraphBuilder):
    _builders.append(builder)
    try:
        yield builder
    finally:
        _builders.pop()


def current_builder() -> GraphBuilder | None:
    return _builders[-1] if _builders else None


class Tape:
    """Records eager ops into a graph so PYNATIVE code can be differentiated by the IR autodiff."""

    def __init__(self):
        self.graph = Graph("pynative_tape")
        self.builder = GraphBuilder(self.graph)
        self.values: dict[int, np.ndarray] = {}

    def leaf(self, t: Tensor) -> Node:
        if t.node is not None and t.node.id in self.values:
            return t.node
        node = self.builder.leaf_for(t)
        self.values[node.id] = t.asnumpy()
        return node


_tapes: list[Tape] = []


@contextmanager
def recording(tape: Tape):
    _tapes.append(tape)
    try:
        yield tape
    finally:
        _tapes.pop()


# ----------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------
def _fail(opname: str, err: Exception, inputs):
    where = describe_scope()
    shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
    msg = f"{err}" if not where else f"{where}: {err}"
    if shapes and "shape" not in str(err):
        msg += f" (input shapes: {shapes})"
    raise ShapeError(msg) from None


def infer(opname: str, inputs: list[Tensor], attrs: dict):
    prim = get_primitive(opname)
    try:
        shape, dtype = prim.infer([t.shape for t in inputs], [t.dtype for t in inputs], attrs)
    except ShapeError as e:
        _fail(opname, e, inputs)
    return prim, tuple(shape), np.dtype(dtype)


def bind(opname: str, inputs: list[Tensor], attrs: dict | None = None, ann: dict | None = None) -> Tensor:
    attrs = attrs or {}
    prim, shape, dtype = infer(opname, inputs, attrs)
    builder = current_builder()
    if builder is not None:
        nodes = [t.node if (t.node is not None and t.is_symbolic) else builder.leaf_for(t) for t in inputs]
        a = current_annotations()
        if ann:
            a.update(ann)
        node = builder.graph.add(Node(opname, nodes, attrs, shape, dtype, scope=current_scope(), ann=a))
        if prim.category == "effect":
            builder.graph.effects.append(node)
        return Tensor(node=node)
    arrays = [t.asnumpy() for t in inputs]
    if hooks.listening:
        t0 = time.perf_counter_ns()
        out = prim.kernel(*arrays, **attrs)
        t1 = time.perf_counter_ns()
        hooks.emit("op", {"op": opname, "name": f"{opname}", "scope": current_scope(),
                          "start_ns": t0, "end_ns": t1, "mode": "pynative"})
    else:
        out = prim.kernel(*arrays, **attrs)
    out = np.asarray(out)
    if out.shape != shape or out.dtype != dtype:
        raise AssertionError(f"kernel {opname} returned {out.shape} {out.dtype}, inferred {shape} {dtype}")
    result = Tensor(out)
    if _tapes:
        tape = _tapes[-1]
        nodes = [tape.leaf(t) for t in inputs]
        node = tape.graph.add(Node(opname, nodes, attrs, shape, dtype, scope=current_scope()))
        tape.values[node.id] = out
        result.node = node
    return result


def as_tensor(x, like: Tensor | None = None) -> Tensor:
    """Python scalars and arrays become Tensors; scalars take ``like``'s dtype (weak typing)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, (bool, np.bool_)):
        return Tensor(np.asarray(x, dtype=np.bool_))
    if isinstance(x, (int, float, np.integer, np.floating)) and like is not None:
        dt = like.dtype if like.dtype != np.bool_ else DEFAULT_FLOAT
        if isinstance(x, float) and dt.kind in "iu":
            dt = DEFAULT_FLOAT
        return Tensor(np.asarray(x, dtype=dt))
    if isinstance(x, (float, np.floating)):
        return Tensor(np.asarray(x, dtype=DEFAULT_FLOAT))
    if isinstance(x, (int, np.integer)):
        return Tensor(np.asarray(x, dtype=np.int64))
    return Tensor(np.asarray(x))
