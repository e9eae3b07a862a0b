"""Collective-communication primitives: ``all_reduce`` (a gradient bucket) and ``all_gather`` (sparse rows).

Both run on the ``comm`` stream (``runtime/passes/streams.py``), so the compute streams go on while a
bucket is on the wire; the kernels call ``runtime.communication`` (non-blocking MPI, waited for on the comm
stream's worker thread). In a process that is a group of one they are identities.

* ``all_reduce(x_1, ..., x_n, op, bucket)`` -> the flat concatenation of the inputs (1-D), summed (or
  averaged, ``op="mean"``) over the group: one message per bucket (MindSpore's AllReduce fusion). The
  bucket's gradients are sliced back out by ordinary ``slice`` + ``reshape`` nodes (single-output IR).
* ``all_gather(x, group_size)`` -> every rank's ``x`` stacked on axis 0 (rank order): a SparseGrad's
  indices and rows travel as rows, never densified.
"""
from __future__ import annotations

import numpy as np

from runtime import communication, context
from runtime.core import SparseGrad, Tensor, bind
from runtime.ops import api as F
from runtime.ops.registry import Primitive, ShapeError, register

REDUCTIONS = ("sum", "mean")


def _all_reduce_infer(shapes, dtypes, attrs):
    if not shapes:
        raise ShapeError("all_reduce: needs at least one tensor")
    op = attrs.get("op", "sum")
    if op not in REDUCTIONS:
        raise ShapeError(f"all_reduce: op must be one of {REDUCTIONS}, got {op!r}")
    d0 = np.dtype(dtypes[0])
    if d0.kind != "f":
        raise ShapeError(f"all_reduce: expects floating-point tensors, got {d0}")
    if any(np.dtype(d) != d0 for d in dtypes):
        raise ShapeError(f"all_reduce: the tensors of one bucket must share a dtype, got "
                         f"{[np.dtype(d).name for d in dtypes]} for shapes {[tuple(s) for s in shapes]}")
    total = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
    return (total,), d0


def _all_reduce_kernel(*xs, op="sum", bucket=-1):
    flat = np.concatenate([np.ravel(x) for x in xs]) if len(xs) > 1 else np.ravel(xs[0])
    return communication.all_reduce(flat, op)


def _all_reduce_grad(g, y, *xs, op="sum", bucket=-1):
    """The reduction is linear and symmetric in the ranks: the gradient is the same reduction of g, sliced."""
    r = all_reduce([g], op=op, bucket=bucket)
    return unpack(r, [tuple(x.shape) for x in xs])


def _all_reduce_cost(node):
    # flops: one add per element per incoming message (ring: about one full pass); bytes: the payload on the wire
    return int(node.size), int(node.nbytes)


register(Primitive("all_reduce", "opaque", _all_reduce_infer, _all_reduce_kernel, _all_reduce_grad,
                   cost_fn=_all_reduce_cost, attrs_doc="op: sum | mean; bucket: the fusion bucket's index",
                   extra={"gradcheck": "tests/test_data_parallel.py"}))


def _all_gather_infer(shapes, dtypes, attrs):
    s = tuple(shapes[0])
    n = attrs.get("group_size")
    if not isinstance(n, int) or n < 1:
        raise ShapeError(f"all_gather: group_size must be an int >= 1, got {n!r}")
    if not s:
        raise ShapeError("all_gather: expects a tensor with at least one dimension (rows), got a scalar")
    return (n * s[0],) + s[1:], dtypes[0]


def _all_gather_kernel(x, group_size=1, name=""):
    out = communication.all_gather(x)
    if out.shape[0] != group_size * x.shape[0]:
        raise RuntimeError(f"all_gather: the graph was built for a group of {group_size} but this process is in a "
                           f"group of {out.shape[0] // max(1, x.shape[0])}")
    return out


register(Primitive("all_gather", "opaque", _all_gather_infer, _all_gather_kernel, None,
                   cost_fn=lambda node: (0, int(node.nbytes)), attrs_doc="group_size: processes in the group"))


# -- functional API ---------------------------------------------------------------------------------------
def all_reduce(tensors, op: str = "sum", bucket: int = -1) -> Tensor:
    """The flat (1-D) concatenation of ``tensors`` reduced over the group."""
    return bind("all_reduce", [F._t(t) for t in tensors], {"op": op, "bucket": int(bucket)})


def all_gather(x, group_size: int) -> Tensor:
    return bind("all_gather", [F._t(x)], {"group_size": int(group_size)})


def unpack(flat: Tensor, shapes) -> list[Tensor]:
    """Slice a flat bucket back into tensors of ``shapes`` (in order)."""
    out, off = [], 0
    for s in shapes:
        n = int(np.prod(s, dtype=np.int64))
        piece = F.slice(flat, (off,), (off + n,))
        out.append(F.reshape(piece, s) if tuple(s) != (n,) else piece)
        off += n
    return out


def gather_sparse_gradients(grads: list, names: list[str] | None = None) -> list:
    """Every SparseGrad's indices and rows all-gathered over the group (rows averaged with ``gradients_mean``),
    before the optimizer sees them: its row-wise update then sums every rank's rows for a repeated id.
    Dense gradients pass through (the AllReduce pass buckets them). Works traced and eagerly."""
    size = communication.rank_and_size()[1]
    mean = context.get_auto_parallel_context("gradients_mean")
    out = list(grads)
    for k, g in enumerate(grads):
        if not isinstance(g, SparseGrad):
            continue
        ids, rows = all_gather(g.indices, size), all_gather(g.values, size)
        if names is not None and ids.node is not None:
            ids.node.name, rows.node.name = f"AllGather_{names[k]}_indices", f"AllGather_{names[k]}_rows"
        out[k] = SparseGrad(ids, F.mul(rows, 1.0 / size) if mean and size > 1 else rows, g.dense_shape)
    return out


def reduce_gradients_eager(grads: list) -> list:
    """PYNATIVE_MODE: AllReduce already-computed gradients (Tensors; SparseGrads are all-gathered as rows), one
    message per bucket of ``all_reduce_fusion_config``, averaged with ``gradients_mean``. Returns them in order."""
    buckets = communication.fusion_buckets(len(grads))
    op = "mean" if context.get_auto_parallel_context("gradients_mean") else "sum"
    out = gather_sparse_gradients(grads)
    for b, idx in enumerate(buckets):
        dense = [k for k in idx if not isinstance(grads[k], SparseGrad)]
        if not dense:
            continue
        r = all_reduce([grads[k] for k in dense], op=op, bucket=b)
        for k, t in zip(dense, unpack(r, [tuple(grads[k].shape) for k in dense])):
            out[k] = t
    return out
