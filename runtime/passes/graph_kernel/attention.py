"""Attention fusion (Graph -> Graph): scaled-dot-product attention and its autodiff backward become one
``fused_attention_fwd`` and one ``fused_attention_grad`` node (flash-style tiled kernels, ``runtime.ops.attention``).

Runs first in ``graph_kernel`` (before ``expand``, while ``softmax`` / ``softmax_grad`` / ``dropout_mask`` are
still whole). The forward it matches, exactly as the Cells and autodiff write it::

    s  = batch_matmul(q, k, transpose_b=True)          # (..., Sq, Sk)
    s  = mul(s, c)                                     # optional, c a scalar constant (the scale)
    s  = add(s, mask)                                  # optional additive key mask (..., 1, Sk), either side
    p  = softmax(s, axis=-1)
    p  = mul(p, dropout_mask(...))                     # optional dropout on the probabilities, either side
    o  = batch_matmul(p, v)

and, when the step differentiates it, the backward autodiff emits for it::

    dp  = batch_matmul(do, v, transpose_b=True)        # [mul(dp, the same dropout mask)]
    dv  = batch_matmul(p, do, transpose_a=True)        # optional (v needs a gradient)
    ds  = softmax_grad(p, dp, axis=-1)                 # [reduce_sum(ds, axes incl. the query axis): dmask]
    ds  = mul(ds, c)                                   # when scaled
    dq  = batch_matmul(ds, k); dk = batch_matmul(ds, q, transpose_a=True)   # each optional

The match is exact: every intermediate (scores, probabilities, their gradients, the dropout mask) must be
read by the pattern only -- a graph output, a tap, a second softmax reader, a mask varying over the queries,
another transpose form or a reduction over other axes leaves the subgraph as it is (and ``fuse`` handles
it as before). On a match:

* ``fused_attention_fwd(q, k, v[, mask][, u])`` replaces the forward and ``fused_get`` unpacks O and the
  row log-sum-exp -- or, when there is a backward and at most ``STORE_P_MAX_KEYS`` keys, the probabilities
  (``store_p``); ``u = uniform(shape, rng)`` replaces ``dropout_mask`` (the same generator call, so the
  same draw: the kernel keeps ``u < keep_prob`` scaled by 1/keep_prob, the mask's own values);
* ``fused_attention_grad(q, k, v[, mask][, u], O, lse or P, dO)`` replaces the backward; its ``fused_get``
  outputs take the places of dq, dk, dv, and the mask gradient's reduction reads the query-summed score
  gradient instead of the (Sq x Sk) one.

``INSIGHT_ATTENTION_FUSION=0`` switches the rewrite off (``benchmarks/bench_fusion.py`` measures the step
with and without it). The new nodes are named ``Fused_Attention_<id>`` / ``Fused_AttentionGrad_<id>`` with ``ann["fused_ops"]``
listing the member op types (the profiler shows them) and keep the phase annotations of the nodes they
replace. In place like the other stages: the surviving nodes are rewired; the result is a new Graph.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from runtime.ir.graph import Graph, Node

FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# keys up to this many: the forward keeps the probabilities P (..., Sq, Sk) for the backward (``store_p``), which
# then skips recomputing the scores (a q kᵀ GEMM, the key transposes and the exp per score: measured ~20% of the
# backward at BERT-small's 128 x 128 x 64 heads) at the price of writing and re-reading the score-sized P that the
# unfused graph keeps anyway. Longer sequences keep the flash-style recomputation (memory linear in Sk).
STORE_P_MAX_KEYS = 256


@dataclass
class _Match:
    scores: Node
    q: Node
    k: Node
    v: Node
    out: Node                       # o = batch_matmul(p, v)
    scale_node: Node | None = None
    scale: float = 1.0
    mask_add: Node | None = None
    mask: Node | None = None
    softmax: Node | None = None
    drop_mask: Node | None = None
    drop_mul: Node | None = None
    # backward
    grad: Node | None = None        # softmax_grad
    dout: Node | None = None
    dp: Node | None = None
    dp_mul: Node | None = None
    dv: Node | None = None
    ds_scale: Node | None = None
    dq: Node | None = None
    dk: Node | None = None
    dmask_sum: Node | None = None
    forward: list = field(default_factory=list)
    backward: list = field(default_factory=list)


def _bmm(n: Node, ta: bool, tb: bool) -> bool:
    return n.op == "batch_matmul" and bool(n.attrs["transpose_a"]) == ta and bool(n.attrs["transpose_b"]) == tb


def _scalar(n: Node) -> float | None:
    if n.op == "const" and n.size == 1 and n.dtype.kind == "f":
        return float(np.asarray(n.attrs["value"]).reshape(-1)[0])
    return None


def _other(n: Node, x: Node) -> Node | None:
    """The input of binary ``n`` that is not ``x`` (None when both are, or x is not an input)."""
    a, b = n.inputs
    if a is x and b is not x:
        return b
    if b is x and a is not x:
        return a
    return None


class _Readers:
    def __init__(self, graph: Graph):
        self.users = graph.users()
        self.outputs = {n.id for n in graph.outputs.values()} | {n.id for n in graph.effects}

    def of(self, n: Node) -> list[Node]:
        return list({u.id: u for u in self.users.get(n.id, [])}.values())

    def only(self, n: Node, *allowed: Node) -> bool:
        """n is read by exactly the ``allowed`` nodes (each at least once) and is no graph output."""
        return n.id not in self.outputs and {u.id for u in self.of(n)} == {a.id for a in allowed}


def _key_mask(mask: Node, scores: Node) -> bool:
    if mask.dtype != scores.dtype or len(mask.shape) > len(scores.shape):
        return False
    try:
        full = np.broadcast_shapes(mask.shape, scores.shape)
    except ValueError:
        return False
    return full == scores.shape and (len(mask.shape) < 2 or mask.shape[-2] == 1)


def _match_forward(p: Node, r: _Readers) -> _Match | None:
    nd = len(p.shape)
    if p.dtype not in FLOATS or nd < 3 or int(p.attrs["axis"]) % nd != nd - 1:
        return None
    x = p.inputs[0]
    mask_add = mask = None
    if x.op == "add" and r.only(x, p):
        a, b = x.inputs
        if a.shape == x.shape and a.op in ("mul", "batch_matmul") and _key_mask(b, x) and b is not a:
            x, mask = a, b
        elif b.shape == x.shape and b.op in ("mul", "batch_matmul") and _key_mask(a, x) and a is not b:
            x, mask = b, a
        else:
            return None
        mask_add = p.inputs[0]
    nxt = mask_add or p
    if not r.only(x, nxt):
        return None
    scale_node, scale = None, 1.0
    if x.op == "mul":
        a, b = x.inputs
        if _scalar(b) is not None and a.shape == x.shape:
            scale_node, scale, x = x, _scalar(b), a
        elif _scalar(a) is not None and b.shape == x.shape:
            scale_node, scale, x = x, _scalar(a), b
        else:
            return None
        if not r.only(x, scale_node):
            return None
    if not _bmm(x, False, True) or x.dtype != p.dtype:
        return None
    q, k = x.inputs
    # the probabilities: [dropout] then o = p @ v
    readers = r.of(p)
    drop_mul = drop_mask = None
    grads = [u for u in readers if u.op == "softmax_grad" and u.inputs[0] is p and u.inputs[1] is not p]
    # the forward reader: the dropout's mul, or o = p @ v (dv = pᵀ dO may read p too: checked with the backward)
    fwd = [u for u in readers if (u.op == "mul" and _other(u, p) is not None and _other(u, p).op == "dropout_mask")
           or (_bmm(u, False, False) and u.inputs[0] is p and u.inputs[1] is not p)]
    if len(grads) > 1 or len(fwd) != 1 or p.id in r.outputs:
        return None
    (use,) = fwd
    pd = p
    if use.op == "mul":
        m = _other(use, p)
        if m is None or m.op != "dropout_mask" or m.shape != p.shape or m.dtype != p.dtype:
            return None
        drop_mul, drop_mask, pd = use, m, use
        outs = [u for u in r.of(pd) if _bmm(u, False, False) and u.inputs[0] is pd and u.inputs[1] is not pd]
        if len(outs) != 1:
            return None
        out = outs[0]
    elif _bmm(use, False, False) and use.inputs[0] is p and use.inputs[1] is not p:
        out = use
    else:
        return None
    v = out.inputs[1]
    if len(q.shape) != nd or k.shape[:-2] != q.shape[:-2] or v.shape[:-2] != q.shape[:-2]:
        return None
    m = _Match(scores=x, q=q, k=k, v=v, out=out, scale_node=scale_node, scale=scale, mask_add=mask_add,
               mask=mask, softmax=p, drop_mask=drop_mask, drop_mul=drop_mul, grad=grads[0] if grads else None)
    m.forward = [n for n in (x, scale_node, mask_add, p, drop_mask, drop_mul, out) if n is not None]
    return m


def _match_backward(m: _Match, r: _Readers) -> bool:
    """Fill in the backward of ``m`` (or confirm there is none); False when the graph differs from the pattern."""
    p, pd = m.softmax, m.drop_mul or m.softmax
    if m.grad is None:        # no backward: p, pd read by the forward only
        return (r.only(pd, m.out) and (m.drop_mul is None or (r.only(p, m.drop_mul)
                                                               and r.only(m.drop_mask, m.drop_mul))))
    g = m.grad
    if g.id in r.outputs:      # the score gradient itself is wanted (e.g. it is a full-shape mask's gradient)
        return False
    dp = g.inputs[1]
    if m.drop_mul is not None:
        dp_mul = dp
        dp = _other(dp_mul, m.drop_mask) if dp_mul.op == "mul" else None
        if dp is None or not r.only(dp_mul, g) or not r.only(m.drop_mask, m.drop_mul, dp_mul):
            return False
        m.dp_mul = dp_mul
        if not r.only(p, m.drop_mul, g):
            return False
        consumer = dp_mul
    else:
        consumer = g
    if not (_bmm(dp, False, True) and dp.inputs[1] is m.v and r.only(dp, consumer)):
        return False
    m.dp, m.dout = dp, dp.inputs[0]
    if m.dout is m.v or m.dout.shape != m.out.shape:
        return False
    # readers of the probabilities fed to p @ v: the forward GEMM and (optionally) dv = pdᵀ dO
    dvs = [u for u in r.of(pd) if u is not m.out and u is not g]
    if dvs:
        if len(dvs) != 1 or not (_bmm(dvs[0], True, False) and dvs[0].inputs[0] is pd
                                 and dvs[0].inputs[1] is m.dout):
            return False
        m.dv = dvs[0]
    if m.drop_mul is None and not r.only(p, *([m.out, g] + ([m.dv] if m.dv else []))):
        return False
    if m.drop_mul is not None and not r.only(pd, *([m.out] + ([m.dv] if m.dv else []))):
        return False
    # the score gradient: [mask reduction], [scale], dq / dk
    ds = g
    nd = len(g.shape)
    mask_sums = [u for u in r.of(g) if u.op == "reduce_sum"]
    if mask_sums:
        s = mask_sums[0]
        axes = s.attrs["axis"]
        axes = tuple(range(nd)) if axes is None else tuple(a % nd for a in axes)
        if m.mask is None or len(mask_sums) != 1 or s.attrs.get("keepdims") or nd - 2 not in axes \
                or nd - 1 in axes:
            return False
        m.dmask_sum = s
    rest = [u for u in r.of(g) if u is not m.dmask_sum]
    if m.scale_node is not None:
        if len(rest) != 1 or rest[0].op != "mul" or _scalar(_other(rest[0], g) or g) != m.scale:
            return False
        m.ds_scale = ds = rest[0]
        if ds.id in r.outputs:
            return False
        rest = r.of(ds)
    for u in rest:
        if _bmm(u, False, False) and u.inputs[0] is ds and u.inputs[1] is m.k and m.dq is None:
            m.dq = u
        elif _bmm(u, True, False) and u.inputs[0] is ds and u.inputs[1] is m.q and m.dk is None:
            m.dk = u
        else:
            return False
    m.backward = [n for n in (m.dp, m.dv, m.dp_mul, g, m.dmask_sum, m.ds_scale, m.dq, m.dk) if n is not None]
    return True


def _name(node: Node, kind: str) -> str:
    return f"Fused_{kind}_{node.id}"


MERGE_HEADS = (0, 2, 1, 3)


def _head_merges(n: Node | None, r: _Readers) -> list[Node]:
    """The ``transpose(n, (0, 2, 1, 3))`` nodes when they are all that reads the 4-d ``n`` (the heads merged back
    before the output projection, or a head-split input's gradient on its way back to the dense layer): the
    kernel then writes n in that layout and they become free. Empty otherwise."""
    if n is None or len(n.shape) != 4 or n.id in r.outputs:
        return []
    users = r.of(n)
    if users and all(u.op == "transpose" and tuple(u.attrs["perm"]) == MERGE_HEADS and u.inputs == [n]
                     for u in users):
        return users
    return []


def _rewrite(m: _Match, at: dict[int, list[Node]], replace: dict[int, Node], removed: set[int], pos: dict[int, int],
             r: _Readers):
    """New nodes for match ``m``: ``at[id]`` lists what to emit in place of node ``id``."""
    has_mask, has_drop = m.mask is not None, m.drop_mask is not None
    store_p = m.grad is not None and m.k.shape[-2] <= STORE_P_MAX_KEYS
    attrs = {"scale": float(m.scale), "keep_prob": float(m.drop_mask.attrs["keep_prob"]) if has_drop else 1.0,
             "has_mask": has_mask, "has_dropout": has_drop, "store_p": store_p}
    ins = [m.q, m.k, m.v] + ([m.mask] if has_mask else [])
    if has_drop:
        d = m.drop_mask
        u = Node("uniform", [], {"shape": tuple(d.shape), "_rng": d.attrs["_rng"]}, d.shape, np.float32,
                 scope=d.scope, ann=dict(d.ann))
        at.setdefault(d.id, []).append(u)
        ins.append(u)
    dt = m.out.dtype
    ann = dict(m.out.ann, fused_ops=[n.op for n in m.forward])
    o_merges = _head_merges(m.out, r)
    fwd = Node("fused_attention_fwd", ins, dict(attrs, out_bshd=bool(o_merges)), (3 if store_p else 2,), object,
               scope=m.out.scope, ann=ann)
    fwd.name = _name(fwd, "Attention")

    def get(src, index, shape, like, dtype=dt):
        n = Node("fused_get", [src], {"index": index, "shape": tuple(shape), "dtype": np.dtype(dtype).name}, shape,
                 np.dtype(dtype),
                 scope=like.scope, ann={k: v for k, v in like.ann.items() if k != "fused_ops"})
        n.name = f"{src.name}_get{index}"
        return n
    o = get(fwd, 0, o_merges[0].shape if o_merges else m.out.shape, m.out)
    for t in o_merges:              # O comes out with its heads merged: the transposes are the get itself
        replace[t.id] = o
        removed.add(t.id)
    # what the backward reads besides O: the row log-sum-exp, or the probabilities themselves
    saved = get(fwd, 2, m.softmax.shape, m.out) if store_p else get(fwd, 1, m.out.shape[:-1], m.out, np.float64)
    at.setdefault(m.out.id, []).extend([fwd, o, saved])
    replace[m.out.id] = o
    removed.update(n.id for n in m.forward)
    if m.grad is None:
        return
    first = m.dp if m.dv is None else min(m.dp, m.dv, key=lambda n: pos[n.id])
    merges = [_head_merges(g, r) for g in (m.dq, m.dk, m.dv)]
    gattrs = dict(attrs, want_dmask=m.dmask_sum is not None, o_bshd=bool(o_merges),
                  grads_bshd=tuple(bool(t) for t in merges))
    gann = dict(m.grad.ann, fused_ops=[n.op for n in m.backward])
    bwd = Node("fused_attention_grad", ins + [o, saved, m.dout], gattrs, (4,), object, scope=m.grad.scope,
               ann=gann)
    bwd.name = _name(bwd, "AttentionGrad")
    new = [bwd]
    for index, old in enumerate((m.dq, m.dk, m.dv)):
        if old is not None:
            new.append(get(bwd, index, merges[index][0].shape if merges[index] else old.shape, old))
            replace[old.id] = new[-1]
            for t in merges[index]:
                replace[t.id] = new[-1]
                removed.add(t.id)
    if m.dmask_sum is not None:
        s = m.dmask_sum
        nd = len(m.grad.shape)
        dmq = get(bwd, 3, m.k.shape[:-1], s)
        new.append(dmq)
        axes = s.attrs["axis"]
        axes = tuple(range(nd)) if axes is None else tuple(a % nd for a in axes)
        kept = tuple(a for a in axes if a != nd - 2)          # the query axis is summed in the kernel
        if kept:
            red = Node("reduce_sum", [dmq], {"axis": kept, "keepdims": False}, s.shape, s.dtype, scope=s.scope,
                       ann=dict(s.ann))
            new.append(red)
            replace[s.id] = red
        else:
            replace[s.id] = dmq
    at.setdefault(first.id, []).extend(new)
    removed.update(n.id for n in m.backward)


def enabled() -> bool:
    """On unless ``INSIGHT_ATTENTION_FUSION=0`` (for A/B measurements: the step fused with and without it)."""
    return os.environ.get("INSIGHT_ATTENTION_FUSION", "1") != "0"


def fuse_attention(graph: Graph) -> Graph:
    """Rewrite every exactly matching attention (forward + backward) into the fused attention primitives."""
    if not enabled():
        return graph
    r = _Readers(graph)
    matches, claimed = [], set()
    for n in graph.nodes:
        if n.op != "softmax":
            continue
        m = _match_forward(n, r)
        if m is None or not _match_backward(m, r):
            continue
        ids = {x.id for x in m.forward + m.backward}
        if ids & claimed:
            continue
        claimed |= ids
        matches.append(m)
    if not matches:
        return graph
    at: dict[int, list[Node]] = {}
    replace: dict[int, Node] = {}
    removed: set[int] = set()
    pos = {n.id: k for k, n in enumerate(graph.nodes)}
    for m in matches:
        _rewrite(m, at, replace, removed, pos, r)
    out = Graph(graph.name)
    out.meta = dict(graph.meta)
    for n in graph.nodes:
        for new in at.get(n.id, ()):
            new.inputs = [replace.get(i.id, i) for i in new.inputs]
            out.nodes.append(new)
        if n.id in removed:
            continue
        n.inputs = [replace.get(i.id, i) for i in n.inputs]
        n.deps = [replace.get(d.id, d) for d in n.deps]
        out.nodes.append(n)
    out.outputs = {k: replace.get(v.id, v) for k, v in graph.outputs.items()}
    out.effects = [replace.get(e.id, e) for e in graph.effects]
    return out
