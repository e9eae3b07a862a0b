"""Sparse (graph) primitives for GNNs: SpMM, SDDMM, per-edge gather / scatter-add, edge softmax.

A sparse matrix A (M x N, E stored entries) enters the graph IR as five integer tensors -- its CSR
``indptr`` (M+1,) int64 and ``indices`` (E,) int32, and the transposed walk ``t_indptr`` (N+1,) int64,
``t_indices`` (E,) int32, ``t_perm`` (E,) int64 (the entry id of each transposed position) -- built once
by ``CSRStructure`` and bound as graph constants, so shapes stay static. Its values are an ordinary
float tensor (E,) or (E, H) (H heads) and get gradients like any other input.

Row ``i`` of A is a destination node, its entries are the incoming edges from ``indices[p]``:

* ``spmm(A, vals, x)``              out[i] = sum_p vals[p] * x[indices[p]]        (M, [H,] D)
  ``spmm(A, vals, x, transpose=True)`` the same with A^T                            (N, [H,] D)
* ``sddmm(A, a, b)``                out[p] = <a[i], b[indices[p]]>                (E, [H])
* ``edge_gather(A, a, side)``       out[p] = a[i] (side="dst") or a[indices[p]] ("src")
* ``edge_reduce(A, g, side)``       its adjoint: per-node sums of the edge values (scatter-add)
* ``edge_softmax(A, s)``            softmax of s over each destination's incoming edges, per head

Every op's backward is built from the others, so autodiff needs no atomics: a transposed product walks
the transposed structure. Kernels: ``runtime/_kernels_sparse.pyx`` (float32 / float16 storage with
float32 accumulation, float64 for gradient checks; OpenMP over rows, GIL released).
"""
from __future__ import annotations

import numpy as np

from runtime.core import Tensor, bind
from runtime.ops.registry import Primitive, ShapeError, register

try:
    from runtime import _kernels_sparse as KS
except ImportError as e:  # pragma: no cover - a build problem, reported clearly
    raise ImportError(
        "runtime._kernels_sparse (the sparse GNN kernels) is not built. Run `pip install -e .` or "
        "`INSIGHT_BUILD_ONLY=runtime._kernels_sparse python setup.py build_ext --inplace`.") from e

_STRUCT = 5  # indptr, indices, t_indptr, t_indices, t_perm
_STRUCT_DTYPES = (np.dtype(np.int64), np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.int32),
                  np.dtype(np.int64))
_STRUCT_NAMES = ("indptr", "indices", "t_indptr", "t_indices", "t_perm")
_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


class CSRStructure:
    """The index arrays of an M x N sparse matrix and of its transpose, as constant Tensors.

    ``indptr``/``indices`` are the CSR of A (row = destination, column = source); entries of a row
    must be unique. Build it once and reuse it: tracing maps each Tensor to one graph constant.
    """

    def __init__(self, indptr, indices, shape):
        indptr = np.ascontiguousarray(indptr, dtype=np.int64)
        indices = np.ascontiguousarray(indices, dtype=np.int32)
        m, n = int(shape[0]), int(shape[1])
        if indptr.shape != (m + 1,) or indptr[0] != 0 or indptr[-1] != indices.shape[0] \
                or np.any(np.diff(indptr) < 0):
            raise ValueError(f"CSRStructure: indptr of shape {indptr.shape} does not describe {m} rows of "
                             f"{indices.shape[0]} entries")
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise ValueError(f"CSRStructure: column index {int(indices.max())} is outside {n} columns")
        rows = np.repeat(np.arange(m, dtype=np.int32), np.diff(indptr))
        perm = np.lexsort((rows, indices)).astype(np.int64)  # by column, then row
        t_indptr = np.zeros(n + 1, np.int64)
        np.cumsum(np.bincount(indices, minlength=n), out=t_indptr[1:])
        self.shape = (m, n)
        self.nnz = int(indices.shape[0])
        self.rows = rows
        self.tensors = tuple(Tensor(a) for a in (indptr, indices, t_indptr,
                                                 np.ascontiguousarray(rows[perm]), perm))

    @classmethod
    def from_csr(cls, csr) -> "CSRStructure":
        return cls(csr.indptr, csr.indices, csr.shape)

    def __repr__(self):
        return f"CSRStructure(shape={self.shape}, nnz={self.nnz})"


def _struct(st) -> list:
    ts = st.tensors if isinstance(st, CSRStructure) else tuple(st)
    if len(ts) != _STRUCT:
        raise TypeError(f"expected a CSRStructure (or its 5 index tensors), got {type(st).__name__}")
    return list(ts)


def _t(x) -> Tensor:
    return x if isinstance(x, Tensor) else Tensor(np.asarray(x))


# -- functional API -----------------------------------------------------------------------------
def spmm(st, vals, x, transpose: bool = False) -> Tensor:
    """A @ x (or A^T @ x) with A's values ``vals``: (E,) with x (N, D), or (E, H) with x (N, H, D)."""
    return bind("spmm", _struct(st) + [_t(vals), _t(x)], {"transpose": bool(transpose)})


def sddmm(st, a, b) -> Tensor:
    """Per-entry dot products <a[row], b[col]>: a (M, [H,] D), b (N, [H,] D) -> (E, [H])."""
    return bind("sddmm", _struct(st) + [_t(a), _t(b)])


def edge_gather(st, a, side: str = "dst") -> Tensor:
    """Each entry's destination-row (side="dst") or source-column ("src") value: (E, *a.shape[1:])."""
    return bind("edge_gather", _struct(st) + [_t(a)], {"side": _side(side)})


def edge_reduce(st, g, side: str = "dst") -> Tensor:
    """Scatter-add of per-entry values onto destination rows ("dst") or source columns ("src")."""
    return bind("edge_reduce", _struct(st) + [_t(g)], {"side": _side(side)})


def edge_softmax(st, s) -> Tensor:
    """Softmax of per-entry scores (E,) or (E, H) over each row's entries (incoming edges)."""
    return bind("edge_softmax", _struct(st) + [_t(s)])


def edge_softmax_grad(st, y, g) -> Tensor:
    return bind("edge_softmax_grad", _struct(st) + [_t(y), _t(g)])


def _side(side) -> str:
    if side not in ("dst", "src"):
        raise ValueError(f"side must be 'dst' or 'src', got {side!r}")
    return side


# -- inference ----------------------------------------------------------------------------------
def _check_struct(name, shapes, dtypes):
    for k in range(_STRUCT):
        if np.dtype(dtypes[k]) != _STRUCT_DTYPES[k] or len(shapes[k]) != 1:
            raise ShapeError(f"{name}: structure input {_STRUCT_NAMES[k]} must be a 1-d {_STRUCT_DTYPES[k]} "
                             f"tensor, got {tuple(shapes[k])} {np.dtype(dtypes[k])}")
    m, e, n = shapes[0][0] - 1, shapes[1][0], shapes[2][0] - 1
    if shapes[3][0] != e or shapes[4][0] != e:
        raise ShapeError(f"{name}: the transposed structure has {shapes[3][0]} entries, the CSR {e}")
    return m, n, e


def _float(name, what, dt):
    if np.dtype(dt) not in _FLOATS:
        raise ShapeError(f"{name}: {what} must be float16/32/64, got {np.dtype(dt)}")


def _spmm_infer(shapes, dtypes, attrs):
    m, n, e = _check_struct("spmm", shapes, dtypes)
    if attrs["transpose"]:
        m, n = n, m
    vs, xs = tuple(shapes[5]), tuple(shapes[6])
    _float("spmm", "values", dtypes[5])
    if np.dtype(dtypes[5]) != np.dtype(dtypes[6]):
        raise ShapeError(f"spmm: values {np.dtype(dtypes[5])} and x {np.dtype(dtypes[6])} dtypes differ")
    ok = (len(vs) == 1 and vs == (e,) and len(xs) == 2 and xs[0] == n) or \
         (len(vs) == 2 and vs[0] == e and len(xs) == 3 and xs[:2] == (n, vs[1]))
    if not ok:
        raise ShapeError(f"spmm: a {m}x{n} sparse matrix with {e} entries needs values ({e},) and x ({n}, D), "
                         f"or values ({e}, H) and x ({n}, H, D); got values {vs} and x {xs}")
    return (m,) + xs[1:], dtypes[6]


def _sddmm_infer(shapes, dtypes, attrs):
    m, n, e = _check_struct("sddmm", shapes, dtypes)
    as_, bs = tuple(shapes[5]), tuple(shapes[6])
    _float("sddmm", "a", dtypes[5])
    if np.dtype(dtypes[5]) != np.dtype(dtypes[6]):
        raise ShapeError(f"sddmm: a {np.dtype(dtypes[5])} and b {np.dtype(dtypes[6])} dtypes differ")
    if len(as_) not in (2, 3) or len(bs) != len(as_) or as_[0] != m or bs[0] != n or as_[1:] != bs[1:]:
        raise ShapeError(f"sddmm: a {m}x{n} sparse matrix needs a ({m}, [H,] D) and b ({n}, [H,] D); "
                         f"got a {as_} and b {bs}")
    return (e,) + as_[1:-1], dtypes[5]


def _edge_infer(name, node_to_edge):
    """edge_gather (node values -> (E, ...)) and edge_reduce ((E, ...) -> node values) on a side."""
    def infer(shapes, dtypes, attrs):
        m, n, e = _check_struct(name, shapes, dtypes)
        nodes = m if attrs["side"] == "dst" else n
        src_rows, what = (nodes, "node") if node_to_edge else (e, "edge")
        a = tuple(shapes[5])
        _float(name, f"the {what} values", dtypes[5])
        if len(a) < 1 or a[0] != src_rows:
            raise ShapeError(f"{name}: side={attrs['side']!r} needs {what} values with {src_rows} rows, got {a}")
        return ((e if node_to_edge else nodes),) + a[1:], dtypes[5]
    return infer


def _softmax_infer(name, n_in):
    def infer(shapes, dtypes, attrs):
        m, n, e = _check_struct(name, shapes, dtypes)
        s = tuple(shapes[5])
        _float(name, "the scores", dtypes[5])
        if len(s) not in (1, 2) or s[0] != e:
            raise ShapeError(f"{name}: scores must be ({e},) or ({e}, H), got {s}")
        for k in range(6, 5 + n_in):
            if tuple(shapes[k]) != s or np.dtype(dtypes[k]) != np.dtype(dtypes[5]):
                raise ShapeError(f"{name}: inputs {s} {np.dtype(dtypes[5])} and {tuple(shapes[k])} "
                                 f"{np.dtype(dtypes[k])} differ")
        return s, dtypes[5]
    return infer


# -- kernels ------------------------------------------------------------------------------------
def _store(a: np.ndarray) -> np.ndarray:
    """The array the Cython kernels take: float16 travels as its uint16 bit pattern."""
    a = np.ascontiguousarray(a)
    return a.view(np.uint16) if a.dtype == np.float16 else a


def _empty(shape, dtype):
    out = np.empty(shape, dtype)
    return out, _store(out)


def _via_float32(kernel):
    """float16 storage, float32 compute for the products with an inner D loop (SpMM, SDDMM): numpy's
    vectorised float16<->float32 conversion plus the float32 kernel beat converting element by element
    inside the loop (the Cython float16 path stays for the per-edge ops). Same accumulation (float32),
    same rounding of the result (to nearest even)."""
    def run(*arrays, **attrs):
        if arrays[5].dtype != np.float16:
            return kernel(*arrays, **attrs)
        up = [a.astype(np.float32) if a.dtype == np.float16 else a for a in arrays]
        return kernel(*up, **attrs).astype(np.float16)
    return run


def _spmm_kernel(indptr, indices, t_indptr, t_indices, t_perm, vals, x, transpose):
    e = indices.shape[0]
    h = 1 if vals.ndim == 1 else vals.shape[1]
    x3 = x.reshape(x.shape[0], h, -1)
    rows = (t_indptr.shape[0] if transpose else indptr.shape[0]) - 1
    out, o = _empty((rows, h, x3.shape[2]), x.dtype)
    if transpose:
        KS.spmm(t_indptr, t_indices, t_perm, True, _store(vals.reshape(e, h)), _store(x3), o)
    else:
        KS.spmm(indptr, indices, t_perm, False, _store(vals.reshape(e, h)), _store(x3), o)
    return out.reshape((rows,) + x.shape[1:])


def _sddmm_kernel(indptr, indices, t_indptr, t_indices, t_perm, a, b):
    lead = a.shape[1:-1]
    h = int(np.prod(lead)) if lead else 1
    out, o = _empty((indices.shape[0], h), a.dtype)
    KS.sddmm(indptr, indices, _store(a.reshape(a.shape[0], h, -1)), _store(b.reshape(b.shape[0], h, -1)), o)
    return out.reshape((indices.shape[0],) + lead)


def _gather_kernel(indptr, indices, t_indptr, t_indices, t_perm, a, side):
    a2 = a.reshape(a.shape[0], -1)
    out, o = _empty((indices.shape[0], a2.shape[1]), a.dtype)
    if side == "dst":
        KS.edge_gather_dst(indptr, _store(a2), o)
    else:
        KS.edge_gather_src(indices, _store(a2), o)
    return out.reshape((indices.shape[0],) + a.shape[1:])


def _reduce_kernel(indptr, indices, t_indptr, t_indices, t_perm, g, side):
    g2 = g.reshape(g.shape[0], -1)
    ptr = indptr if side == "dst" else t_indptr
    out, o = _empty((ptr.shape[0] - 1, g2.shape[1]), g.dtype)
    KS.edge_reduce(ptr, t_perm, side == "src", _store(g2), o)
    return out.reshape((ptr.shape[0] - 1,) + g.shape[1:])


def _softmax_kernel(indptr, indices, t_indptr, t_indices, t_perm, s):
    s2 = s.reshape(s.shape[0], -1)
    out, o = _empty(s2.shape, s.dtype)
    KS.edge_softmax(indptr, _store(s2), o)
    return out.reshape(s.shape)


def _softmax_grad_kernel(indptr, indices, t_indptr, t_indices, t_perm, y, g):
    y2, g2 = y.reshape(y.shape[0], -1), g.reshape(g.shape[0], -1)
    out, o = _empty(y2.shape, y.dtype)
    KS.edge_softmax_bwd(indptr, _store(y2), _store(g2), o)
    return out.reshape(y.shape)


# -- backward rules -----------------------------------------------------------------------------
_NONE = [None] * _STRUCT
_CHECKED = {"gradcheck": "tests/test_gnn.py"}  # where the float64 finite-difference checks live


def _spmm_grad(g, y, *ins, transpose):
    st, vals, x = ins[:_STRUCT], ins[5], ins[6]
    dvals = sddmm(st, x, g) if transpose else sddmm(st, g, x)
    return _NONE + [dvals, spmm(st, vals, g, not transpose)]


def _sddmm_grad(g, y, *ins):
    st, a, b = ins[:_STRUCT], ins[5], ins[6]
    return _NONE + [spmm(st, g, b, False), spmm(st, g, a, True)]


def _gather_grad(g, y, *ins, side):
    return _NONE + [edge_reduce(ins[:_STRUCT], g, side)]


def _reduce_grad(g, y, *ins, side):
    return _NONE + [edge_gather(ins[:_STRUCT], g, side)]


def _softmax_grad(g, y, *ins):
    return _NONE + [edge_softmax_grad(ins[:_STRUCT], y, g)]


# -- costs (estimates) --------------------------------------------------------------------------
def _index_bytes(node) -> int:
    return node.inputs[1].nbytes + node.inputs[0].nbytes


def _spmm_cost(node):
    vals, x = node.inputs[5], node.inputs[6]
    e = node.inputs[1].shape[0]
    row = x.size // x.shape[0] if x.shape[0] else 0  # H * D per gathered row
    return 2 * e * row, node.nbytes + vals.nbytes + e * row * x.dtype.itemsize + _index_bytes(node)


def _sddmm_cost(node):
    a, b = node.inputs[5], node.inputs[6]
    e = node.inputs[1].shape[0]
    row = a.size // a.shape[0] if a.shape[0] else 0
    return 2 * e * row, node.nbytes + a.nbytes + e * row * b.dtype.itemsize + _index_bytes(node)


def _edge_cost(flops_per_entry):
    def cost(node):
        big = max(node.size, node.inputs[5].size)
        return int(flops_per_entry * big), node.nbytes + sum(i.nbytes for i in node.inputs[5:]) + \
            _index_bytes(node)
    return cost


register(Primitive("spmm", "opaque", _spmm_infer, _via_float32(_spmm_kernel), _spmm_grad, cost_fn=_spmm_cost,
                   attrs_doc="transpose: multiply by A^T (walks the transposed structure)", extra=_CHECKED))
register(Primitive("sddmm", "opaque", _sddmm_infer, _via_float32(_sddmm_kernel), _sddmm_grad, cost_fn=_sddmm_cost,
                   extra=_CHECKED))
register(Primitive("edge_gather", "opaque", _edge_infer("edge_gather", True), _gather_kernel, _gather_grad,
                   cost_fn=_edge_cost(0), attrs_doc="side: 'dst' (row) or 'src' (column) node", extra=_CHECKED))
register(Primitive("edge_reduce", "opaque", _edge_infer("edge_reduce", False), _reduce_kernel, _reduce_grad,
                   cost_fn=_edge_cost(1), attrs_doc="side: 'dst' (row) or 'src' (column) node", extra=_CHECKED))
register(Primitive("edge_softmax", "opaque", _softmax_infer("edge_softmax", 1), _softmax_kernel, _softmax_grad,
                   cost_fn=_edge_cost(5), extra=_CHECKED))
register(Primitive("edge_softmax_grad", "opaque", _softmax_infer("edge_softmax_grad", 2), _softmax_grad_kernel,
                   cost_fn=_edge_cost(4)))
