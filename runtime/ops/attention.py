"""Fused scaled-dot-product attention primitives (flash-attention style kernels in
``runtime/_kernels_attention.pyx``).

Over the last two axes of q (..., Sq, D), k (..., Sk, D), v (..., Sk, Dv) with equal leading axes:

    O = dropout(softmax(scale * q kᵀ + mask)) v

``mask`` (optional) is an additive key mask that broadcasts to the scores and is constant over the queries
(shape (..., 1, Sk) up to broadcasting: padding masks); ``u`` (optional) is the float32 uniform draw of a
dropout on the probabilities: kept where ``u < keep_prob``, scaled by float(1/keep_prob) -- the values
``dropout_mask`` makes from the same draw. The (Sq x Sk) scores never exist in memory: the kernels work on
64 x 64 tiles with an online softmax.

* ``fused_attention(q, k, v[, mask][, u])`` -> O. attrs: ``scale``, ``keep_prob`` (1.0: no dropout),
  ``has_mask``, ``has_dropout``. Differentiable (q, k, v, mask); its backward recomputes the row statistics
  with ``fused_attention_fwd`` and runs ``fused_attention_grad``.
* ``fused_attention_fwd(...)`` -> (O, lse) as a tuple (a 1-d object array carrier, unpacked by ``fused_get``
  like a multi-output ``fused`` kernel; it works eagerly too): the output and the row log-sum-exp of the scores
  (float64 whatever the inputs: the backward's exp(s - lse) stays exact when a key mask makes |lse| large), saved
  for the backward. The
  graph-kernel attention pass (``runtime/passes/graph_kernel/attention.py``) emits this one. With ``store_p``
  (short key sequences, all keys in one tile) the tuple is (O, lse, P): P (..., Sq, Sk) the probabilities
  before dropout, so that the backward does not recompute them (one GEMM and the exp fewer).
* ``fused_attention_grad(q, k, v[, mask][, u], O, lse, dO)`` -> (dq, dk, dv, dmask_q): dmask_q (..., Sk)
  is the score gradient summed over the queries (the key mask's gradient before its sum over the other
  broadcast axes); with ``want_dmask`` False it is not computed (zeros of that shape are not returned
  either: the tuple holds None there). Scores are recomputed per tile from q, k and lse; with ``store_p``
  the lse input is P instead (read, not recomputed).
* layouts (4-d inputs, set by the pass when the only readers are ``transpose(x, (0, 2, 1, 3))``, the heads merged
  back): ``out_bshd`` -- O comes out as (B, Sq, H, Dv); ``o_bshd`` -- the grad's O input is in that layout;
  ``grads_bshd`` -- per dq, dk, dv, written as (B, S, H, D). The transposes (and the copies their readers made
  of the strided views) disappear.
"""
from __future__ import annotations

import numpy as np

from runtime import _kernels_attention as KA
from runtime.codegen import aligned_empty
from runtime.core import bind
from runtime.ops import api as F
from runtime.ops.registry import Primitive, ShapeError, register
from runtime.threads import blas

ATTRS_DOC = "scale, keep_prob, has_mask, has_dropout, store_p (fwd / grad), out_bshd (fwd), o_bshd, grads_bshd (grad)"


def _split(arrays, has_mask, has_dropout):
    """(q, k, v, mask or None, u or None, rest) from a primitive's positional inputs."""
    q, k, v = arrays[:3]
    j = 3
    mask = u = None
    if has_mask:
        mask, j = arrays[j], j + 1
    if has_dropout:
        u, j = arrays[j], j + 1
    return q, k, v, mask, u, list(arrays[j:])


def _check(name, shapes, dtypes, attrs, extra):
    """Validate the attention inputs; returns (q, k, v, mask, u) shapes."""
    n = 3 + bool(attrs["has_mask"]) + bool(attrs["has_dropout"]) + extra
    if len(shapes) != n:
        raise ShapeError(f"{name}: expects {n} inputs (q, k, v{', mask' if attrs['has_mask'] else ''}"
                         f"{', u' if attrs['has_dropout'] else ''}...), got {len(shapes)}")
    q, k, v, mask, u, _ = _split([tuple(s) for s in shapes], attrs["has_mask"], attrs["has_dropout"])
    dq, dk, dv = (np.dtype(d) for d in dtypes[:3])
    if dq not in (np.float32, np.float64) or dk != dq or dv != dq:
        raise ShapeError(f"{name}: q, k, v must share a float32 / float64 dtype, got {dq}, {dk}, {dv}")
    if len(q) < 3 or len(k) != len(q) or len(v) != len(q) or q[:-2] != k[:-2] or k[:-2] != v[:-2] \
            or q[-1] != k[-1] or k[-2] != v[-2]:
        raise ShapeError(f"{name}: q {q}, k {k}, v {v} do not fit (..., Sq, D), (..., Sk, D), (..., Sk, Dv) "
                         "with equal leading axes")
    scores = q[:-1] + (k[-2],)
    if mask is not None:
        try:
            full = np.broadcast_shapes(mask, scores)
        except ValueError:
            full = None
        if full != scores or (len(mask) >= 2 and mask[-2] != 1):
            raise ShapeError(f"{name}: the mask {mask} must broadcast to the scores {scores} and be constant over "
                             "the queries (a key mask (..., 1, Sk))")
        if np.dtype(dtypes[3]) != dq:
            raise ShapeError(f"{name}: the mask is {np.dtype(dtypes[3])}, q is {dq}")
    if u is not None:
        ui = 3 + bool(attrs["has_mask"])
        if u != scores or np.dtype(dtypes[ui]) != np.float32:
            raise ShapeError(f"{name}: the dropout draw must be float32 {scores}, got {np.dtype(dtypes[ui])} {u}")
        if not 0.0 < float(attrs["keep_prob"]) <= 1.0:
            raise ShapeError(f"{name}: keep_prob must be in (0, 1], got {attrs['keep_prob']}")
    return q, k, v, mask, u


def _infer(shapes, dtypes, attrs):
    q, _, v, _, _ = _check("fused_attention", shapes, dtypes, attrs, 0)
    return q[:-1] + (v[-1],), np.dtype(dtypes[0])


def _fwd_infer(shapes, dtypes, attrs):
    q, _, _, _, _ = _check("fused_attention_fwd", shapes, dtypes, attrs, 0)
    if attrs.get("out_bshd") and len(q) != 4:
        raise ShapeError(f"fused_attention_fwd: out_bshd needs 4-d (B, H, S, D) inputs, got q {q}")
    return (3 if attrs.get("store_p") else 2,), np.dtype(object)   # a tuple carrier; fused_get unpacks (O, lse[, P])


def _grad_infer(shapes, dtypes, attrs):
    q, k, v, _, _ = _check("fused_attention_grad", shapes[:-3], dtypes[:-3], attrs, 0)
    o, lse, do = (tuple(s) for s in shapes[-3:])
    want_o = q[:-1] + (v[-1],)
    if (attrs.get("o_bshd") or any(attrs.get("grads_bshd", ()))) and len(q) != 4:
        raise ShapeError(f"fused_attention_grad: o_bshd / grads_bshd need 4-d (B, H, S, D) inputs, got q {q}")
    if attrs.get("o_bshd"):          # O came from the forward with its heads merged: (B, S, H, Dv)
        o = (o[0], o[2], o[1], o[3]) if len(o) == 4 else o
    want_lse, what = (q[:-1] + (k[-2],), "P") if attrs.get("store_p") else (q[:-1], "lse")
    if o != want_o or do != want_o or lse != want_lse:
        raise ShapeError(f"fused_attention_grad: O {o}, dO {do} must be {want_o} and {what} {lse} must be {want_lse}")
    return (4,), np.dtype(object)


POOLED_BYTES = 1 << 20   # outputs this large come from the kernel runtime's recycled buffers (no page faults)


def _alloc(shape, dtype):
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return aligned_empty(shape, dtype, nbytes) if nbytes >= POOLED_BYTES else np.empty(shape, dtype)


def _threads(q, k, gemms):
    """The runtime's GEMM thread policy (``runtime.threads``) for the kernel's tile GEMMs: every thread on an idle
    machine, one while other processes keep the cores busy (an OpenMP team waiting for a descheduled thread
    stalls like a multi-threaded BLAS call does)."""
    return blas.want(2.0 * gemms * q.size * k.shape[-2])


def _run_fwd(arrays, scale, keep_prob, has_mask, has_dropout, store_p=False, out_bshd=False):
    q, k, v, mask, u, _ = _split(arrays, has_mask, has_dropout)
    return KA.attention_fwd(q, k, v, mask, u, float(scale), float(keep_prob), _alloc, bool(store_p), bool(out_bshd),
                            _threads(q, k, 2))


def _pack(*values):
    """The tuple carrier: a 1-d object array (so eager execution holds it like any value)."""
    out = np.empty(len(values), dtype=object)
    for i, x in enumerate(values):
        out[i] = x
    return out


def _kernel(*arrays, scale, keep_prob, has_mask, has_dropout):
    return _run_fwd(arrays, scale, keep_prob, has_mask, has_dropout)[0]


def _fwd_kernel(*arrays, scale, keep_prob, has_mask, has_dropout, store_p=False, out_bshd=False):
    return _pack(*_run_fwd(arrays, scale, keep_prob, has_mask, has_dropout, store_p, out_bshd))


def _grad_kernel(*arrays, scale, keep_prob, has_mask, has_dropout, want_dmask=False, store_p=False, o_bshd=False,
                 grads_bshd=(False, False, False)):
    q, k, v, mask, u, (o, lse, do) = _split(arrays, has_mask, has_dropout)
    if o_bshd:
        o = o.transpose(0, 2, 1, 3)          # a view: the kernel reads rows by their stride
    p = None
    if store_p:          # the lse slot holds the forward's probabilities
        lse, p = None, lse
    return _pack(*KA.attention_bwd(q, k, v, mask, u, o, lse, do, float(scale), float(keep_prob), bool(want_dmask),
                                   _alloc, p, tuple(grads_bshd), _threads(q, k, 4 if store_p else 5)))


def _get(t, index, shape, dtype):
    return bind("fused_get", [t], {"index": int(index), "shape": tuple(int(s) for s in shape),
                                   "dtype": np.dtype(dtype).name})


def attention_outputs(packed, q, v):
    """(O, lse) Tensors unpacked from a ``fused_attention_fwd`` result."""
    return (_get(packed, 0, q.shape[:-1] + (v.shape[-1],), q.dtype), _get(packed, 1, q.shape[:-1], np.float64))


def attention_grads(packed, q, k, v, want_dmask):
    """(dq, dk, dv, dmask_q or None) Tensors unpacked from a ``fused_attention_grad`` result."""
    dm = _get(packed, 3, k.shape[:-1], q.dtype) if want_dmask else None
    return (_get(packed, 0, q.shape, q.dtype), _get(packed, 1, k.shape, k.dtype), _get(packed, 2, v.shape, v.dtype),
            dm)


def _grad(g, out, *inputs, scale, keep_prob, has_mask, has_dropout):
    q, k, v, mask, u, _ = _split(inputs, has_mask, has_dropout)
    attrs = {"scale": scale, "keep_prob": keep_prob, "has_mask": has_mask, "has_dropout": has_dropout}
    ins = list(inputs)
    _, lse = attention_outputs(bind("fused_attention_fwd", ins, attrs), q, v)   # the row statistics again
    packed = bind("fused_attention_grad", ins + [out, lse, g], dict(attrs, want_dmask=bool(has_mask)))
    dq, dk, dv, dmq = attention_grads(packed, q, k, v, bool(has_mask))
    grads = [dq, dk, dv]
    if has_mask:
        # dmask_q (..., Sk) is summed over the queries already; sum over the mask's other broadcast axes
        grads.append(F.sum_to(F.expand_dims(dmq, -2), mask.shape))
    if has_dropout:
        grads.append(None)
    return grads


def _cost(node, backward=False):
    """Estimates: 4 Sq Sk D flops forward (two tile GEMMs) and 10 backward (five, scores recomputed; 8 with
    ``store_p``), plus the exp per score; bytes are the inputs and outputs (the stored P when ``store_p``)."""
    q, k = node.inputs[0], node.inputs[1]
    store_p = bool(node.attrs.get("store_p"))
    batch = int(np.prod(q.shape[:-2], dtype=np.int64))
    sq, d, sk = q.shape[-2], q.shape[-1], k.shape[-2]
    flops = batch * sq * sk * (((8 if store_p else 10) if backward else 4) * d + 8)
    nbytes = sum(i.nbytes for i in node.inputs)
    nbytes += (3 if backward else 1) * q.nbytes + (batch * sq * q.dtype.itemsize if not backward else 0)
    if store_p and not backward:
        nbytes += batch * sq * sk * q.dtype.itemsize
    return int(flops), int(nbytes)


register(Primitive("fused_attention", "opaque", _infer, _kernel, _grad, cost_fn=_cost, attrs_doc=ATTRS_DOC,
                   extra={"gradcheck": "tests/test_attention_fusion.py"}))
register(Primitive("fused_attention_fwd", "opaque", _fwd_infer, _fwd_kernel, cost_fn=_cost, attrs_doc=ATTRS_DOC))
register(Primitive("fused_attention_grad", "opaque", _grad_infer, _grad_kernel,
                   cost_fn=lambda n: _cost(n, backward=True), attrs_doc=ATTRS_DOC + ", want_dmask"))


def fused_attention(q, k, v, mask=None, scale=1.0, u=None, keep_prob=1.0):
    """dropout(softmax(scale q kᵀ + mask)) v in one tiled kernel (see the module docstring)."""
    ins = [F._t(q), F._t(k), F._t(v)]
    if mask is not None:
        ins.append(F._t(mask))
    if u is not None:
        ins.append(F._t(u))
    return bind("fused_attention", ins, {"scale": float(scale), "keep_prob": float(keep_prob) if u is not None
                                         else 1.0, "has_mask": mask is not None, "has_dropout": u is not None})
