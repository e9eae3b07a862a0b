"""Reverse-mode autodiff as a transformation of the IR.

``grad(loss, wrt)`` walks the graph that produced ``loss`` backwards and, for each node on a
path from a ``wrt`` leaf to the loss, calls its primitive's backward rule. The rules are
written with the functional ops API, so the backward is appended to the same graph as plain
primitives: forward, backward and the optimizer update form ONE graph that passes see whole.

In PYNATIVE_MODE the forward was recorded on a Tape while it ran; the same rules extend the
tape's graph and the new nodes are then executed eagerly.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from runtime import core
from runtime.core import SparseGrad, Tensor
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


# ----------------------------------------------------------------------------------------------
# PYNATIVE: the backward, traced once per call signature and replayed
# ----------------------------------------------------------------------------------------------
_CACHE_SIZE = 32


def _attr_key(v):
    """A hashable stand-in for an attribute value (objects such as a dropout generator by identity)."""
    if isinstance(v, (tuple, list)):
        return tuple(_attr_key(x) for x in v)
    try:
        hash(v)
    except TypeError:
        return ("id", id(v))
    return v


def _tape_signature(nodes: list[Node]) -> tuple:
    """Everything the traced backward depends on: per tape node its op, input positions, attributes,
    shape and dtype -- a parameter by identity, a constant by shape and dtype only (its value is read
    from the tape at every replay, never baked in)."""
    pos: dict[int, int] = {}
    parts = []
    for k, n in enumerate(nodes):
        pos[n.id] = k
        if n.op == "param":
            a = id(n.attrs["_var"])
        elif n.op == "const":
            a = None
        else:
            a = tuple((name, _attr_key(v)) for name, v in n.attrs.items())
        parts.append((n.op, tuple(pos[i.id] for i in n.inputs), a, n.shape, n.dtype.str))
    return tuple(parts)


class _BackwardProgram:
    """The backward of one tape signature as a flat list of kernel calls over slots.

    Slots 0..F-1 are the tape's forward nodes (only those the backward reads are filled), F.. are the
    backward nodes. Each step is ``(kernel, input slots, attrs, output slot, slots to free)``: a slot is
    released right after its last reader, forward values included, so the backward's peak holds only
    what is still to be read."""

    def __init__(self, tape: core.Tape, start: int, grads: dict, parts: dict, wrt_nodes: list[Node]):
        nodes = tape.graph.nodes
        slot = {n.id: k for k, n in enumerate(nodes)}
        self.n_slots = len(nodes)
        outs = []   # per wrt: ("zeros", shape, dtype) | ("dense", slot) | ("sparse", i, v, shape) | ("const", arr)
        targets = []
        for n in wrt_nodes:
            g, sg = grads.get(n.id), parts.get(n.id)
            if g is None:
                outs.append(("zeros", n.shape, n.dtype))
            elif sg is not None:
                outs.append(("sparse", slot[sg.indices.node.id], slot[sg.values.node.id], n.shape))
                targets += [sg.indices.node, sg.values.node]
            elif g.node is not None:
                outs.append(("dense", slot[g.node.id]))
                targets.append(g.node)
            else:  # a constant gradient (e.g. d loss / d loss)
                v = np.array(g.asnumpy(), copy=True)
                v.flags.writeable = False
                outs.append(("const", v))
        self.outs = outs
        need = {t.id for t in targets}
        bwd = nodes[start:]
        for n in reversed(bwd):
            if n.id in need:
                need.update(i.id for i in n.inputs)
        self.consts: list[tuple[int, object]] = []      # baked backward constants
        self.params: list[tuple[int, object]] = []      # parameters read live
        steps = []
        for n in bwd:
            if n.id not in need:
                continue
            if n.op == "const":  # read-only: a replay must not be able to change what the next one reads
                v = np.array(n.attrs["value"], copy=True)
                v.flags.writeable = False
                self.consts.append((slot[n.id], v))
            elif n.op == "param":
                self.params.append((slot[n.id], n.attrs["_var"]))
            else:
                steps.append([get_primitive(n.op).kernel, tuple(slot[i.id] for i in n.inputs), n.attrs,
                              slot[n.id], ()])
        # forward slots the backward reads (filled from the tape at every replay)
        self.reads = sorted({i for st in steps for i in st[1] if i < start} |
                            {o[1] for o in outs if o[0] == "dense" and o[1] < start} |
                            {j for o in outs if o[0] == "sparse" for j in o[1:3] if j < start})
        keep = {o[1] for o in outs if o[0] == "dense"} | {j for o in outs if o[0] == "sparse" for j in o[1:3]}
        last: dict[int, int] = {}
        for k, st in enumerate(steps):
            for i in st[1]:
                last[i] = k
        frees: dict[int, list[int]] = {}
        for i, k in last.items():
            if i not in keep:
                frees.setdefault(k, []).append(i)
        self.steps = [(kern, ins, attrs, out, tuple(frees.get(k, ()))) for k, (kern, ins, attrs, out, _)
                      in enumerate(steps)]
        self.fwd_nodes = start

    def run(self, tape: core.Tape) -> list:
        nodes = tape.graph.nodes
        vals = tape.values
        env: list = [None] * self.n_slots
        for i in self.reads:
            env[i] = vals[nodes[i].id]
        for i, v in self.consts:
            env[i] = v
        for i, var in self.params:
            env[i] = var.data
        for kern, ins, attrs, out, frees in self.steps:
            env[out] = kern(*[env[i] for i in ins], **attrs)
            for i in frees:
                env[i] = None
        result = []
        for o in self.outs:
            kind = o[0]
            if kind == "dense":
                result.append(Tensor(env[o[1]]))
            elif kind == "sparse":
                result.append(SparseGrad(Tensor(env[o[1]]), Tensor(env[o[2]]), o[3]))
            elif kind == "zeros":
                result.append(Tensor(np.zeros(o[1], o[2])))
            else:
                result.append(Tensor(o[1]))
        return result


_programs: "OrderedDict[tuple, _BackwardProgram]" = OrderedDict()


def grad_eager(tape: core.Tape, loss: Tensor, wrt: list[Tensor], sparse: bool = False,
               retain_values: bool = False) -> list:
    """PYNATIVE autodiff: the gradients of ``loss`` w.r.t. ``wrt``, computed now.

    The backward is traced (IR autodiff on the tape's graph) once per tape signature -- the ops,
    attributes, shapes and dtypes the forward recorded, the parameters by identity -- and then
    replayed as a flat list of kernel calls; it runs the kernels the traced backward would, in its
    order, so results are identical. Unless ``retain_values``, the tape gives its forward values up
    to the backward, which releases each one after its last use (a second ``grad_eager`` on the same
    tape then needs ``retain_values=True`` on the first)."""
    if tape.values is None:
        raise ValueError("grad_eager: this tape's values were released by an earlier grad_eager; "
                         "pass retain_values=True to that call to differentiate the same tape twice")
    if loss.node is None or loss.node.id not in tape.values:
        raise ValueError("grad_eager: the loss was not computed while this tape was recording")
    wrt_nodes = [tape.leaf(w) for w in wrt]
    start = len(tape.graph.nodes)
    sig = _tape_signature(tape.graph.nodes)
    pos = {n.id: k for k, n in enumerate(tape.graph.nodes)}
    key = (sig, pos[loss.node.id], tuple(pos[n.id] for n in wrt_nodes), bool(sparse))
    prog = _programs.get(key)
    if prog is None:
        with core.building(tape.builder):
            grads = _backward(tape.graph.nodes[:start], loss.node, wrt_nodes)
            parts = {n.id: (_as_sparse(grads[n.id], n) if sparse and n.id in grads else None) for n in wrt_nodes}
        prog = _BackwardProgram(tape, start, grads, parts, wrt_nodes)
        del tape.graph.nodes[start:]  # the traced backward lives on in the program only
        _programs[key] = prog
        if len(_programs) > _CACHE_SIZE:
            _programs.popitem(last=False)
    else:
        _programs.move_to_end(key)
    out = prog.run(tape)
    if not retain_values:
        tape.values = None
    return out
