"""Reverse-mode autodiff as a transformation of the IR.

``grad(loss, wrt)`` walks the graph that produced ``loss`` backwards and, for each node on a
path from a ``wrt`` leaf to the loss, calls its primitive's backward rule. The rules are
written with the functional ops API, so the backward is appended to the same graph as plain
primitives: forward, backward and the optimizer update form ONE graph that passes see whole.

In PYNATIVE_MODE the forward was recorded on a Tape while it ran; the same rules extend the
tape's graph and the new nodes are then executed eagerly.
"""
from __future__ import annotations

import numpy as np

from runtime import core
from runtime.core import SparseGrad, Tensor
from runtime.executor import evaluate
from runtime.ir.graph import Node
from runtime.ops import api as F
from runtime.ops.registry import get_primitive

_LEAVES = ("input", "param", "const")


def _backward(nodes: list[Node], loss: Node, wrt: list[Node]) -> dict[int, Tensor]:
    wanted = {n.id for n in wrt}
    needs: dict[int, bool] = {}
    for n in nodes:
        needs[n.id] = n.dtype.kind == "f" and (
            n.id in wanted or any(needs.get(i.id, False) for i in n.inputs))
    if not needs.get(loss.id):
        return {}
    if loss.size != 1:
        raise ValueError(f"grad: the loss must be a scalar, got shape {loss.shape}")
    grads: dict[int, Tensor] = {loss.id: Tensor(np.ones(loss.shape, dtype=loss.dtype))}
    pos = {n.id: k for k, n in enumerate(nodes)}
    for n in reversed(nodes[: pos[loss.id] + 1]):
        g = grads.get(n.id)
        if g is None or n.op in _LEAVES or not needs[n.id]:
            continue
        prim = get_primitive(n.op)
        if prim.grad is None:
            raise NotImplementedError(f"grad: primitive {n.op!r} has no backward rule (node in '{n.scope}')")
        attrs = n.attrs
        with core.scope_override(f"Gradients/{n.scope}" if n.scope else "Gradients"):
            in_grads = prim.grad(g, Tensor(node=n), *[Tensor(node=i) for i in n.inputs], **attrs)
        if len(in_grads) != len(n.inputs):
            raise AssertionError(f"grad rule of {n.op} returned {len(in_grads)} grads for {len(n.inputs)} inputs")
        for inp, ig in zip(n.inputs, in_grads):
            if ig is None or not needs[inp.id]:
                continue
            if tuple(ig.shape) != inp.shape:
                raise AssertionError(f"grad rule of {n.op} gave {ig.shape} for an input of shape {inp.shape}")
            prev = grads.get(inp.id)
            grads[inp.id] = ig if prev is None else F.add(prev, ig)
    return grads


def _as_sparse(g: Tensor, n: Node):
    """A gradient that is exactly gather_grad(ids, rows) becomes SparseGrad(ids, rows)."""
    gn = g.node
    if gn is not None and gn.op == "gather_grad" and len(n.shape) == 2:
        ids, rows = gn.inputs
        return SparseGrad(Tensor(node=ids), Tensor(node=rows), n.shape)
    return None


def grad(loss: Tensor, wrt: list[Tensor], sparse: bool = False) -> list:
    """Gradients of a scalar ``loss`` with respect to each of ``wrt`` (zeros where unused).

    With ``sparse=True`` a table whose gradient is one gather's scatter-add comes back as a
    ``SparseGrad(indices, rows)`` instead of a dense (rows, dim) tensor.
    """
    builder = core.current_builder()
    if builder is None:
        raise RuntimeError("grad() outside a trace: in PYNATIVE_MODE use grad_eager(tape, loss, wrt)")
    if loss.node is None:
        raise ValueError("grad: the loss was not computed inside this trace")
    wrt_nodes = [w.node if (w.is_symbolic and w.node is not None) else builder.leaf_for(w) for w in wrt]
    grads = _backward(builder.graph.nodes, loss.node, wrt_nodes)
    out = []
    for n in wrt_nodes:
        g = grads.get(n.id)
        if g is None:
            out.append(Tensor(np.zeros(n.shape, n.dtype)))
            continue
        sg = _as_sparse(g, n) if sparse else None
        out.append(sg if sg is not None else g)
    return out


def grad_eager(tape: core.Tape, loss: Tensor, wrt: list[Tensor], sparse: bool = False) -> list:
    """PYNATIVE autodiff: extend the tape's graph with the backward and execute it now."""
    if loss.node is None or loss.node.id not in tape.values:
        raise ValueError("grad_eager: the loss was not computed while this tape was recording")
    wrt_nodes = [tape.leaf(w) for w in wrt]
    start = len(tape.graph.nodes)
    with core.building(tape.builder):
        grads = _backward(tape.graph.nodes[:start], loss.node, wrt_nodes)
        parts = {n.id: (_as_sparse(grads[n.id], n) if sparse and n.id in grads else None) for n in wrt_nodes}
    targets = []
    for n in wrt_nodes:
        g, sg = grads.get(n.id), parts.get(n.id)
        if sg is not None:
            targets += [sg.indices.node, sg.values.node]
        elif g is not None and g.node is not None:
            targets.append(g.node)
    values = evaluate(tape.graph.nodes[start:], tape.values, targets)
    out = []
    for n in wrt_nodes:
        g, sg = grads.get(n.id), parts.get(n.id)
        if g is None:
            out.append(Tensor(np.zeros(n.shape, n.dtype)))
        elif sg is not None:
            out.append(SparseGrad(Tensor(values[sg.indices.node.id]), Tensor(values[sg.values.node.id]), n.shape))
        elif g.node is not None:
            out.append(Tensor(values[g.node.id]))
        else:  # a constant gradient (e.g. d loss / d loss)
            out.append(Tensor(g.asnumpy()))
    return out
