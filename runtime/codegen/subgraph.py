"""The fused-group mini IR: ``SubGraph`` (a self-contained list of ``SOp`` primitive ops, no IR nodes), the
kernel language's op table and the fuser's whitelist (``op_supported``), and ``subgraph_of``, which cuts a
group of IR nodes out of a graph as a ``SubGraph`` plus the nodes it reads.

Op ``j`` of a SubGraph reads external inputs (``ref < 0``: input ``-1 - ref``) or earlier ops
(``ref >= 0``). A SubGraph is what the fusion pass hands to code generation (``schedule.analyze`` ->
``c_source.generate`` / ``interpreter.encode``) and what a ``fused`` node carries in ``attrs["_subgraph"]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the mini IR does not depend on the graph IR
    from runtime.ir.graph import Node

F32 = np.dtype(np.float32)
BOOL = np.dtype(np.bool_)


class NotFusible(Exception):
    """The group cannot be expressed as one kernel (reason in the message)."""


# ---------------------------------------------------------------------------------------------
# the op table: op -> (arity, C expression template, interpreter opcode)
# ---------------------------------------------------------------------------------------------
UNARY = {
    "neg": "(-{0})", "exp": "fk_exp({0})", "log": "fk_log({0})", "sqrt": "fk_sqrt({0})",
    "rsqrt": "fk_rsqrt({0})", "tanh": "fk_tanh({0})", "sigmoid": "fk_sigmoid({0})", "relu": "fk_relu({0})",
    "abs": "fk_abs({0})", "sign": "fk_sign({0})", "square": "fk_square({0})", "reciprocal": "fk_recip({0})",
    "tobool": "fk_bool({0} != 0.0f)",
}
BINARY = {
    "add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})", "div": "({0} / {1})",
    "maximum": "fk_max({0}, {1})", "minimum": "fk_min({0}, {1})",
    "equal": "fk_bool({0} == {1})", "not_equal": "fk_bool({0} != {1})", "less": "fk_bool({0} < {1})",
    "less_equal": "fk_bool({0} <= {1})", "greater": "fk_bool({0} > {1})",
    "greater_equal": "fk_bool({0} >= {1})", "relu_grad": "fk_relu_grad({0}, {1})",
    "leaky_relu": "fk_leaky({0}, {1})",
}
TERNARY = {"select": "fk_select({0}, {1}, {2})"}
# interpreter opcodes (must match runtime/_fusion.pyx)
OPCODES = {name: 10 + k for k, name in enumerate(list(UNARY) + list(BINARY) + list(TERNARY))}
K_IN, K_CONST, K_RED = 0, 1, 2

VIEW_OPS = frozenset({"reshape", "expand_dims", "squeeze", "broadcast_to"})
REDUCE_OPS = frozenset({"reduce_sum", "reduce_max"})
ELEMENTWISE_OPS = frozenset(set(UNARY) - {"tobool"} | set(BINARY) - {"leaky_relu"} | set(TERNARY)
                            | {"leaky_relu", "cast"})
FUSIBLE_OPS = ELEMENTWISE_OPS | VIEW_OPS | REDUCE_OPS
SUBGRAPH_OPS = FUSIBLE_OPS | {"const"}   # "const": a scalar literal inlined into the kernel

def op_supported(op: str, attrs: dict, in_dtypes, out_dtype) -> bool:
    """Can this primitive be a member of a fused group (the fuser's whitelist)?"""
    if op not in FUSIBLE_OPS:
        return False
    if np.dtype(out_dtype) not in (F32, BOOL):
        return False
    if any(np.dtype(d) not in (F32, BOOL) for d in in_dtypes):
        return False
    if op == "cast":
        return True
    if op in REDUCE_OPS:
        return np.dtype(out_dtype) == F32
    if op in ("select",):
        return True
    if op in BINARY and op not in ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal"):
        return all(np.dtype(d) == F32 for d in in_dtypes)
    if op in UNARY:
        return all(np.dtype(d) == F32 for d in in_dtypes)
    return True


# ---------------------------------------------------------------------------------------------
# the mini IR
# ---------------------------------------------------------------------------------------------
@dataclass
class SOp:
    op: str
    args: tuple          # refs: >= 0 op index, < 0 input (-1 - k)
    attrs: dict
    shape: tuple
    dtype: np.dtype


@dataclass
class SubGraph:
    in_shapes: list
    in_dtypes: list
    ops: list            # SOp, topological
    outputs: list        # op indices (or input refs < 0: pass-through is not allowed)
    inplace: bool = False  # output 0 is written into input 0 (fused_assign)
    names: list = field(default_factory=list)   # original op types, for names / profiling

    def ref_shape(self, r):
        return tuple(self.ops[r].shape) if r >= 0 else tuple(self.in_shapes[-1 - r])

    def ref_dtype(self, r):
        return np.dtype(self.ops[r].dtype) if r >= 0 else np.dtype(self.in_dtypes[-1 - r])

    def key(self) -> tuple:
        """Hashable description (shapes included) used to share compiled programs."""
        ops = tuple((o.op, o.args, _attr_key(o.attrs), tuple(o.shape), np.dtype(o.dtype).str) for o in self.ops)
        return (tuple(map(tuple, self.in_shapes)), tuple(np.dtype(d).str for d in self.in_dtypes), ops,
                tuple(self.outputs), self.inplace)


def _attr_key(attrs):
    out = []
    for k in sorted(attrs):
        v = attrs[k]
        if isinstance(v, np.ndarray):
            v = (v.dtype.str, v.shape, v.tobytes())
        elif isinstance(v, list):
            v = tuple(v)
        out.append((k, v))
    return tuple(out)


def scalar_const(n: Node) -> bool:
    """A scalar float32 / bool constant node: inlined into kernels as a literal."""
    return n.op == "const" and n.size == 1 and n.dtype in (np.float32, np.bool_)


def subgraph_of(members: list[Node], outputs: list[Node], inplace_var: Node | None = None,
                cut: dict[int, Node] | None = None) -> tuple[SubGraph, list[Node]]:
    """The SubGraph of IR nodes ``members`` (topological) plus the external input nodes, in order.

    ``outputs`` are the members (or cut nodes) the kernel returns; with ``inplace_var`` the kernel writes
    output 0 into that variable, which becomes input 0. ``cut`` maps member ids to nodes read instead of
    recomputing them (inputs of the kernel). Scalar float32 / bool constants are inlined as ``const`` ops.
    """
    cut = cut or {}
    ids = {m.id for m in members if m.id not in cut}
    inputs: list[Node] = []
    in_index: dict[int, int] = {}
    if inplace_var is not None:
        inputs.append(inplace_var)
        in_index[inplace_var.id] = 0
    ops: list[SOp] = []
    index: dict[int, int] = {}
    const_ops: dict[int, int] = {}

    def ref(x: Node) -> int:
        if x.id in ids:
            return index[x.id]
        if x.id in cut:
            x = cut[x.id]
        if scalar_const(x):
            if x.id not in const_ops:
                ops.append(SOp("const", (), {"value": np.asarray(x.attrs["value"]).reshape(())}, x.shape, x.dtype))
                const_ops[x.id] = len(ops) - 1
            return const_ops[x.id]
        if x.id not in in_index:
            in_index[x.id] = len(inputs)
            inputs.append(x)
        return -1 - in_index[x.id]

    for m in members:
        if m.id not in ids:
            continue
        args = tuple(ref(i) for i in m.inputs)
        attrs = {k: v for k, v in m.attrs.items() if not k.startswith("_")}
        ops.append(SOp(m.op, args, attrs, m.shape, m.dtype))
        index[m.id] = len(ops) - 1
    outs = [ref(o) for o in outputs]
    sg = SubGraph([i.shape for i in inputs], [i.dtype for i in inputs], ops, outs, inplace=inplace_var is not None,
                  names=[m.op for m in members if m.id in ids])
    return sg, inputs
