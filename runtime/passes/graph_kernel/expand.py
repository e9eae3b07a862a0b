"""Expand composite primitives into fusible primitives (Graph -> Graph).

Forward and backward composites are rewritten with the functional ops API, mirroring the formulas
of the Cython kernels they replace (``runtime/_kernels.pyx``) operation by operation, so the
expanded float32 graph computes the same values up to the rounding of reductions (which the
fused kernels accumulate in double, like those kernels) and of the transcendental functions (the
kernels' exp / log / tanh are the same Cephes algorithms, evaluated with FMAs: within an ulp):

* ``gelu`` / ``gelu_grad``        -- tanh approximation as ``x * sigmoid(2u)`` with ``a = exp(-2|u|)``;
* ``layer_norm``, ``layer_norm_grad``, ``layer_norm_grad_params`` -- statistics over the last axis,
  the parameter gradients as sums over the leading axes (stacked ``(2, D)`` by a ``concat`` that
  ``simplify`` removes again once the slices that read it are folded);
* ``softmax`` / ``softmax_grad``, ``log_softmax`` / ``log_softmax_grad`` over any axis;
* ``softmax_cross_entropy`` (+``_grad``), sparse labels through a ``one_hot`` (which stays a
  separate small kernel) or dense targets;
* ``reduce_mean`` -> ``reduce_sum`` / count, ``relu_grad`` -> ``g * cast(x > 0)``;
* ``dropout_mask`` -> ``uniform`` (the same generator call) and, per training phase that uses the mask,
  ``select(u < keep_prob, 1 / keep_prob, 0)``: the forward and the backward kernels each rebuild the mask
  from ``u`` instead of one of them writing it to memory.

Elementwise primitives that already are single instructions of the kernel language (tanh, sigmoid,
relu, sqrt, ...) and the optimizers' updates (add / mul / sqrt / div + assign) are left alone.
Only float32 nodes are expanded (fusion only generates float32 kernels).

Rules: ``RULES`` maps a composite op to the function building its expansion with the ops API (the one
special case, ``dropout_mask``, needs the phases of its users and is ``expand_dropout``).

In place: ``expand`` rewires the ``inputs`` / ``deps`` of the nodes it keeps to the expansions, so the nodes
of the graph it is given change; it returns a new ``Graph`` object over them (new nodes for the expansions).
Run it on a copy when the original must survive (``graph_kernel`` clones first).
"""
from __future__ import annotations

import numpy as np

from runtime import core
from runtime.core import GraphBuilder, Tensor, building
from runtime.ir.graph import Graph, Node
from runtime.ops import api as F

C_GELU = 0.7978845608028654
K_GELU = 0.044715


def _gelu_parts(x):
    u = F.mul(C_GELU, F.add(x, F.mul(K_GELU, F.mul(F.mul(x, x), x))))
    a = F.exp(F.mul(-2.0, F.abs(u)))
    return u, a


def gelu(x):
    u, a = _gelu_parts(x)
    s = F.div(F.select(F.greater_equal(u, 0.0), 1.0, a), F.add(1.0, a))
    return F.mul(x, s)


def gelu_grad(x, g):
    u, a = _gelu_parts(x)
    inv = F.div(1.0, F.add(1.0, a))
    s = F.mul(F.select(F.greater_equal(u, 0.0), 1.0, a), inv)
    sp = F.mul(F.mul(a, inv), inv)
    du = F.add(float(np.float32(2.0 * C_GELU)), F.mul(float(np.float32(2.0 * C_GELU * 3.0 * K_GELU)), F.mul(x, x)))
    return F.mul(g, F.add(s, F.mul(F.mul(x, sp), du)))


def _ln_stats(x, eps):
    d = float(x.shape[-1])
    mean = F.div(F.reduce_sum(x, -1, True), d)
    xc = F.sub(x, mean)
    var = F.div(F.reduce_sum(F.mul(xc, xc), -1, True), d)
    rstd = F.rsqrt(F.add(var, eps))
    return xc, rstd


def layer_norm(x, gamma, beta, eps):
    xc, rstd = _ln_stats(x, eps)
    return F.add(F.mul(F.mul(xc, rstd), gamma), beta)


def layer_norm_grad(x, gamma, g, eps):
    d = float(x.shape[-1])
    xc, rstd = _ln_stats(x, eps)
    xhat = F.mul(xc, rstd)
    gg = F.mul(g, gamma)
    mg = F.div(F.reduce_sum(gg, -1, True), d)
    mgx = F.div(F.reduce_sum(F.mul(gg, xhat), -1, True), d)
    return F.mul(rstd, F.sub(F.sub(gg, mg), F.mul(xhat, mgx)))


def layer_norm_grad_params(x, g, eps):
    xc, rstd = _ln_stats(x, eps)
    xhat = F.mul(xc, rstd)
    lead = tuple(range(x.ndim - 1))
    d = x.shape[-1]
    dgamma = F.reduce_sum(F.mul(g, xhat), lead, False)
    dbeta = F.reduce_sum(g, lead, False)
    return F.concat([F.reshape(dgamma, (1, d)), F.reshape(dbeta, (1, d))], 0)


def softmax(x, axis):
    m = F.reduce_max(x, axis, True)
    e = F.exp(F.sub(x, m))
    return F.mul(e, F.reciprocal(F.reduce_sum(e, axis, True)))   # as the Cython kernel: scale by 1/sum


def softmax_grad(y, g, axis):
    return F.mul(y, F.sub(g, F.reduce_sum(F.mul(g, y), axis, True)))


def log_softmax(x, axis):
    xm = F.sub(x, F.reduce_max(x, axis, True))
    return F.sub(xm, F.log(F.reduce_sum(F.exp(xm), axis, True)))


def log_softmax_grad(y, g, axis):
    return F.sub(g, F.mul(F.exp(y), F.reduce_sum(g, axis, True)))


def _targets(logits, labels, sparse):
    return F.one_hot(labels, logits.shape[1], logits.dtype) if sparse else labels


def softmax_cross_entropy(logits, labels, sparse):
    b = logits.shape[0]
    t = _targets(logits, labels, sparse)
    xm = F.sub(logits, F.reduce_max(logits, -1, True))
    lse = F.log(F.reduce_sum(F.exp(xm), -1, True))
    picked = F.reduce_sum(F.mul(t, xm), -1, True)
    if sparse:
        loss = F.sub(lse, picked)
    else:
        loss = F.sub(F.mul(F.reduce_sum(t, -1, True), lse), picked)
    return F.reshape(loss, (b,))


def softmax_cross_entropy_grad(logits, labels, g, sparse):
    b = logits.shape[0]
    t = _targets(logits, labels, sparse)
    e = F.exp(F.sub(logits, F.reduce_max(logits, -1, True)))
    s = F.reduce_sum(e, -1, True)
    gb = F.reshape(g, (b, 1))
    if sparse:
        return F.sub(F.mul(e, F.div(gb, s)), F.mul(t, gb))
    a = F.div(F.mul(F.reduce_sum(t, -1, True), gb), s)
    return F.sub(F.mul(e, a), F.mul(t, gb))


def reduce_mean(x, axis, keepdims):
    shape = x.shape
    axes = range(len(shape)) if axis is None else [a % len(shape) for a in axis]
    count = int(np.prod([shape[a] for a in axes], dtype=np.int64)) or 1
    return F.div(F.reduce_sum(x, axis, keepdims), float(count))


def relu_grad(x, g):
    return F.mul(g, F.cast(F.greater(x, 0.0), g.dtype))      # as the primitive: g * (x > 0)


def batch_norm_moving(moving, stats, row, momentum):
    c = moving.shape[0]                                      # as the primitive: moving*m + stats[row]*(1-m)
    batch = F.reshape(F.slice(stats, (row, 0), (row + 1, c)), (c,))
    return F.add(F.mul(moving, momentum), F.mul(batch, 1.0 - momentum))


# op -> (rule(*input tensors, **attrs))
RULES = {
    "gelu": lambda x: gelu(x),
    "gelu_grad": lambda x, g: gelu_grad(x, g),
    "layer_norm": lambda x, gamma, beta, eps: layer_norm(x, gamma, beta, eps),
    "layer_norm_grad": lambda x, gamma, g, eps: layer_norm_grad(x, gamma, g, eps),
    "layer_norm_grad_params": lambda x, g, eps: layer_norm_grad_params(x, g, eps),
    "softmax": lambda x, axis: softmax(x, axis),
    "softmax_grad": lambda y, g, axis: softmax_grad(y, g, axis),
    "log_softmax": lambda x, axis: log_softmax(x, axis),
    "log_softmax_grad": lambda y, g, axis: log_softmax_grad(y, g, axis),
    "softmax_cross_entropy": lambda x, t, sparse: softmax_cross_entropy(x, t, sparse),
    "softmax_cross_entropy_grad": lambda x, t, g, sparse: softmax_cross_entropy_grad(x, t, g, sparse),
    "reduce_mean": lambda x, axis, keepdims: reduce_mean(x, axis, keepdims),
    "relu_grad": lambda x, g: relu_grad(x, g),
    # BatchNorm's moving statistics: fusible, so their assigns are computed in place like an optimizer's
    "batch_norm_moving": lambda m, s, row, momentum: batch_norm_moving(m, s, row, momentum),
}


def expandable(n: Node) -> bool:
    return n.op in RULES and n.dtype == np.float32 and n.size > 0 and \
        all(i.dtype in (np.float32, np.int64, np.int32) for i in n.inputs)


def expand_node(n: Node) -> tuple[list[Node], Node]:
    """The nodes replacing ``n`` (new constants first) and the node computing its value."""
    scratch = Graph("expand")
    b = GraphBuilder(scratch)
    with building(b), core.annotate(**n.ann):
        out = RULES[n.op](*[Tensor(node=i) for i in n.inputs], **n.attrs)
    node = out.node
    if node is None or node.shape != n.shape or node.dtype != n.dtype:
        raise AssertionError(f"expansion of {n.op} gave {getattr(node, 'shape', None)}, expected {n.shape}")
    for m in scratch.nodes:
        m.scope = n.scope
        if m.op not in ("const", "input", "param"):
            m.ann.setdefault("expanded_from", n.op)
    return scratch.nodes, node


def _dropout_users(graph: Graph) -> dict[int, list[Node]]:
    users: dict[int, list[Node]] = {}
    for n in graph.nodes:
        for i in n.inputs:
            if i.op == "dropout_mask":
                users.setdefault(i.id, []).append(n)
    return users


def expand_dropout(n: Node, users: list[Node]) -> tuple[list[Node], dict]:
    """``dropout_mask`` -> ``uniform`` + one ``select`` per phase of its users: (new nodes, phase -> mask)."""
    kp = n.attrs["keep_prob"]
    u = Node("uniform", [], {"shape": n.shape, "_rng": n.attrs["_rng"]}, n.shape, np.float32, scope=n.scope,
             ann={**n.ann, "expanded_from": "dropout_mask"})
    new, masks = [u], {}
    phases = []
    for x in users:
        ph = x.ann.get("phase")
        if ph not in phases:
            phases.append(ph)
    for ph in phases or [n.ann.get("phase")]:
        scratch = Graph("expand")
        b = GraphBuilder(scratch)
        ann = {**n.ann}
        if ph is not None:
            ann["phase"] = ph
        with building(b), core.annotate(**ann):
            m = F.select(F.less(Tensor(node=u), kp), float(np.float32(1.0 / kp)), 0.0)
        for x in scratch.nodes:
            x.scope = n.scope
            if x.op != "const":
                x.ann.setdefault("expanded_from", "dropout_mask")
        new.extend(scratch.nodes)
        masks[ph] = m.node
    return new, masks


def expand(graph: Graph) -> Graph:
    """Replace every expandable composite by primitives; the graph keeps its outputs and effects."""
    subst: dict[int, Node] = {}
    per_phase: dict[int, dict] = {}
    dropout_users = _dropout_users(graph)
    nodes: list[Node] = []
    for n in graph.nodes:
        if subst or per_phase:
            n.inputs = [(per_phase[i.id].get(n.ann.get("phase")) or next(iter(per_phase[i.id].values())))
                        if i.id in per_phase else subst.get(i.id, i) for i in n.inputs]
            n.deps = [subst.get(d.id, d) for d in n.deps]
        if n.op == "dropout_mask" and n.dtype == np.float32 and n.id not in {o.id for o in graph.outputs.values()}:
            new, masks = expand_dropout(n, dropout_users.get(n.id, []))
            nodes.extend(new)
            per_phase[n.id] = masks
            continue
        if expandable(n):
            new, value = expand_node(n)
            nodes.extend(new)
            subst[n.id] = value
            continue
        nodes.append(n)
    out = Graph(graph.name)
    out.nodes = nodes
    out.outputs = {k: subst.get(v.id, v) for k, v in graph.outputs.items()}
    out.effects = [subst.get(e.id, e) for e in graph.effects]
    out.meta = dict(graph.meta)
    return out
