"""Primitives of the sparse embedding path (EmbeddingLookup and the fused sparse optimizers).

The number of distinct ids of a batch is known only when it runs. Shapes in the IR are static, so the
nodes below declare a capacity (min(number of ids, table rows)) and their kernels return only the
``count`` rows in use: ``uid`` (count,), ``rows`` and their gradient (count, dim). The memory plan reserves the
capacity; what is computed and copied host<->device is the distinct rows only.

* ``emb_unique(ids)``          -- the distinct ids of a batch, first-occurrence order. No gradient.
  Graph mode only (its result is shorter than its declared capacity); eager code computes the
  distinct ids directly (``EmbeddingLookup`` does).
* ``emb_inverse(ids)``         -- for every id, its position in ``emb_unique(ids)`` (int32).
* ``emb_lookup(table, ids, uid)`` -- rows[k] = table[uid[k]] (on the table's side); gradient: the
  distinct-row gradient scattered into the table, which autodiff hands to sparse optimizers as
  ``SparseGrad(uid, rows)``.
* ``emb_expand(rows, inv)``    -- rows[inv]: every id's row (on the device); its gradient sums the
  gradient per distinct id (``emb_rows_grad``), so only those rows cross device->host.
* ``sparse_ftrl(var, accum, linear, uid, grad, lr)`` and
  ``sparse_lazy_adam(var, m, v, uid, grad, lr_t)`` -- MindSpore's FusedSparseFtrl /
  FusedSparseLazyAdam: in-place updates of the rows ``uid`` only (Cython, OpenMP over rows).

A host table can carry an engine (attr ``_engine``, ``runtime.nn.embedding.HostTableEngine``): its
optimizer update is then deferred and finished on a host thread while the device computes the next
step, and the next lookup is prefetched; every value is the one serial execution produces.
"""
from __future__ import annotations

import numpy as np

from runtime import _kernels as K
from runtime import _kernels_embedding as KE
from runtime.core import bind
from runtime.ops import api as F
from runtime.ops.registry import Primitive, ShapeError, register


def _ids_infer(name, out_dtype, distinct=False):
    def infer(shapes, dtypes, attrs):
        if len(shapes[0]) != 1 or np.dtype(dtypes[0]).kind not in "iu":
            raise ShapeError(f"{name}: expects 1-d integer ids, got {tuple(shapes[0])} {np.dtype(dtypes[0])}")
        n = int(shapes[0][0])
        if distinct:  # capacity: no more distinct ids than ids, nor than table rows
            n = min(n, int(attrs["num_rows"]))
        return (n,), np.dtype(out_dtype)
    return infer


def _unique_kernel(ids, num_rows, _engine=None):
    if _engine is not None:
        return _engine.unique(ids, num_rows)[0]
    uid, _, count = KE.unique_inverse(ids, num_rows)
    return uid[:count]


def _inverse_kernel(ids, num_rows, _engine=None):
    if _engine is not None:
        return _engine.unique(ids, num_rows)[1]
    return KE.unique_inverse(ids, num_rows)[1]


def _hash_cost(n):
    return 8 * n.size, 3 * n.nbytes


register(Primitive("emb_unique", "opaque", _ids_infer("emb_unique", np.int64, distinct=True), _unique_kernel,
                   cost_fn=_hash_cost))
register(Primitive("emb_inverse", "opaque", _ids_infer("emb_inverse", np.int32), _inverse_kernel,
                   cost_fn=_hash_cost))


def _lookup_infer(shapes, dtypes, attrs):
    table, ids, uid = (tuple(s) for s in shapes)
    if len(table) != 2 or len(ids) != 1 or len(uid) != 1 or uid[0] > ids[0]:
        raise ShapeError(f"emb_lookup: expects a (rows, dim) table, 1-d ids and their distinct ids; got table "
                         f"{table}, ids {ids}, distinct ids {uid}")
    return (uid[0], table[1]), dtypes[0]


def _lookup_kernel(table, ids, uid, _engine=None):
    """rows[k] = table[uid[k]]: the distinct rows a batch reads."""
    if _engine is not None:
        return _engine.lookup(table, ids, uid)
    return K.embedding_gather(table, uid)


def _lookup_grad(g, y, table, ids, uid, **attrs):
    return [F.gather_grad(uid, g, table.shape[0]), None, None]


# with an engine (host table) the rows may come from a prefetch made while the device computed the
# previous step (exactly the values a serial gather reads, see runtime.nn.embedding)
register(Primitive("emb_lookup", "opaque", _lookup_infer, _lookup_kernel, _lookup_grad,
                   cost_fn=lambda n: (0, 2 * n.nbytes + n.inputs[2].nbytes),
                   extra={"gradcheck": "tests/test_wide_deep.py"}))


def _expand_infer(shapes, dtypes, attrs):
    rows, inv = tuple(shapes[0]), tuple(shapes[1])
    if len(rows) != 2 or len(inv) != 1 or np.dtype(dtypes[1]).kind not in "iu":
        raise ShapeError(f"emb_expand: expects (rows, dim) distinct rows and 1-d integer positions, got {rows} "
                         f"and {inv} {np.dtype(dtypes[1])}")
    return (inv[0], rows[1]), dtypes[0]


def _expand_kernel(rows, inv):
    return K.embedding_gather(np.ascontiguousarray(rows), inv)


def _expand_grad(g, y, rows, inv):
    return [bind("emb_rows_grad", [inv, g, rows]), None]


register(Primitive("emb_expand", "opaque", _expand_infer, _expand_kernel, _expand_grad,
                   cost_fn=lambda n: (0, 2 * n.nbytes + n.inputs[1].nbytes),
                   extra={"gradcheck": "tests/test_wide_deep.py"}))


def _rows_grad_infer(shapes, dtypes, attrs):
    inv, g, rows = (tuple(s) for s in shapes)
    if g != (inv[0], rows[1]):
        raise ShapeError(f"emb_rows_grad: gradient {g} does not match positions {inv} and rows {rows}")
    return rows, dtypes[1]


def _rows_grad_kernel(inv, g, rows):
    """The gradient of each distinct row: the sum over the ids that read it (as many rows as ``rows``)."""
    return K.embedding_scatter_add(inv, np.ascontiguousarray(g), rows.shape[0])


register(Primitive("emb_rows_grad", "opaque", _rows_grad_infer, _rows_grad_kernel,
                   cost_fn=lambda n: (n.inputs[1].size, n.nbytes + n.inputs[1].nbytes)))


def _sparse_infer(name, nslots):
    def infer(shapes, dtypes, attrs):
        var = tuple(shapes[0])
        for k in range(1, 1 + nslots):
            if tuple(shapes[k]) != var:
                raise ShapeError(f"{name}: slot {k} {tuple(shapes[k])} does not match the table {var}")
        uid, grad = tuple(shapes[1 + nslots]), tuple(shapes[2 + nslots])
        if len(var) != 2 or len(uid) != 1 or grad != uid + var[1:]:
            raise ShapeError(f"{name}: expects a (rows, dim) table, 1-d ids and (len(ids), dim) gradient rows; "
                             f"got table {var}, ids {uid}, rows {grad}")
        if np.dtype(dtypes[0]) != np.float32:
            raise ShapeError(f"{name}: the table must be float32, got {np.dtype(dtypes[0])}")
        return var, dtypes[0]
    return infer


def _ftrl_kernel(var, accum, linear, uid, grad, lr, l1, l2, weight_decay, _engine=None):
    count = KE.unique_count(uid)
    args = (float(lr), l1, l2, weight_decay)
    if _engine is not None:
        _engine.defer(KE.sparse_ftrl, var, (accum, linear), uid, grad, count, args)
    else:
        KE.sparse_ftrl(var, accum, linear, uid, grad, count, *args)
    return var


def _lazy_adam_kernel(var, m, v, uid, grad, lr_t, beta1, beta2, eps, weight_decay, _engine=None):
    count = KE.unique_count(uid)
    args = (float(lr_t), beta1, beta2, eps, weight_decay)
    if _engine is not None:
        _engine.defer(KE.sparse_lazy_adam, var, (m, v), uid, grad, count, args)
    else:
        KE.sparse_lazy_adam(var, m, v, uid, grad, count, *args)
    return var


def _sparse_cost(per_elem):
    def cost(n):
        rows = n.inputs[-2]  # the gradient rows
        return per_elem * rows.size, 4 * rows.nbytes
    return cost


register(Primitive("sparse_ftrl", "effect", _sparse_infer("sparse_ftrl", 2), _ftrl_kernel,
                   cost_fn=_sparse_cost(14)))
register(Primitive("sparse_lazy_adam", "effect", _sparse_infer("sparse_lazy_adam", 2), _lazy_adam_kernel,
                   cost_fn=_sparse_cost(12)))


def _bitcast_infer(shapes, dtypes, attrs):
    if np.dtype(dtypes[0]) not in (np.dtype(np.int32), np.dtype(np.float32)):
        raise ShapeError(f"bitcast_f32: expects int32 or float32 input, got {np.dtype(dtypes[0])}")
    return tuple(shapes[0]), np.dtype(np.float32)


def _bitcast_kernel(x):
    return np.ascontiguousarray(x).view(np.float32)


# float32 values carried bit for bit inside an int32 batch (Wide&Deep packs ids and weights in one input)
register(Primitive("bitcast_f32", "injective", _bitcast_infer, _bitcast_kernel,
                   cost_fn=lambda n: (0, 2 * n.nbytes)))
