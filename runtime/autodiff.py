"""Reverse-mode autodiff as a transformation of the IR.

``grad(loss, wrt)`` walks the graph that produced ``loss`` backwards and, for each node on a
path from a ``wrt`` leaf to the loss, calls its primitive's backward rule. The rules are
written with the functional ops API, so the backward is appended to the same graph as plain
primitives: forward, backward and the optimizer update form ONE graph that passes see whole.

In PYNATIVE_MODE the forward was recorded on a Tape while it ran; the same rules extend the
tape's graph and the new nodes are then executed eagerly.
"""
from __future__ import annotations

import time
import weakref
from collections import OrderedDict

import numpy as np

from runtime import core, hooks
from runtime.core import SparseGrad, Tensor
from runtime.ir.graph import Graph, Node
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


def _readonly(v) -> np.ndarray:
    """A private read-only copy: a replay must not be able to change what the next one reads."""
    v = np.array(v, copy=True)
    v.flags.writeable = False
    return v


class _FlatProgram:
    """Traced nodes as a flat list of kernel calls over slots (one slot per node position).

    Each step is ``(kernel, input slots, attrs, output slot, slots to free, (op, scope))``: a slot is released
    right after its last reader unless it is in ``keep``; constants are baked (read-only), parameters read
    live at every run (held weakly); ``reads`` are the slots outside ``nodes`` that the steps need (filled by the caller)."""

    def __init__(self, nodes: list[Node], slot: dict[int, int], n_slots: int, keep: set):
        self.n_slots = n_slots
        self.consts: list[tuple[int, np.ndarray]] = []
        self.params: list[tuple[int, object]] = []
        steps = []
        own = {slot[n.id] for n in nodes}
        for n in nodes:
            if n.op == "const":
                self.consts.append((slot[n.id], _readonly(n.attrs["value"])))
            elif n.op == "param":  # weakly: a cached program must not keep a discarded model alive
                self.params.append((slot[n.id], weakref.ref(n.attrs["_var"])))
            elif n.op != "input":
                steps.append((get_primitive(n.op).kernel, tuple(slot[i.id] for i in n.inputs), n.attrs,
                              slot[n.id], (n.op, n.scope)))  # not the node: it references its inputs
        self.reads = sorted({i for st in steps for i in st[1] if i not in own} | (keep - own))
        last: dict[int, int] = {}
        for k, st in enumerate(steps):
            for i in st[1]:
                last[i] = k
        frees: dict[int, list[int]] = {}
        for i, k in last.items():
            if i not in keep:
                frees.setdefault(k, []).append(i)
        self.steps = [(kern, ins, attrs, out, tuple(frees.get(k, ())), n)
                      for k, (kern, ins, attrs, out, n) in enumerate(steps)]

    def run(self, env: list, eager: bool = False) -> list:
        """``eager``: as eager dispatch (core.bind) does, outputs as arrays and one ``op`` event per kernel."""
        for i, v in self.consts:
            env[i] = v
        for i, ref in self.params:
            env[i] = ref().data
        if eager:
            listening = hooks.listening
            for kern, ins, attrs, out, frees, (op, scope) in self.steps:
                t0 = time.perf_counter_ns() if listening else 0
                env[out] = np.asarray(kern(*[env[i] for i in ins], **attrs))
                if listening:
                    hooks.emit("op", {"op": op, "name": op, "scope": scope, "start_ns": t0,
                                      "end_ns": time.perf_counter_ns(), "mode": "pynative"})
                for i in frees:
                    env[i] = None
            return env
        for kern, ins, attrs, out, frees, _ in self.steps:
            env[out] = kern(*[env[i] for i in ins], **attrs)
            for i in frees:
                env[i] = None
        return env


class _BackwardProgram:
    """The backward of one tape signature: slots 0..F-1 are the tape's forward nodes (only those the
    backward reads are filled), F.. the backward nodes; forward values are released after their last use
    too, so the backward's peak holds only what is still to be read."""

    def __init__(self, tape: core.Tape, start: int, grads: dict, parts: dict, wrt_nodes: list[Node]):
        nodes = tape.graph.nodes
        slot = {n.id: k for k, n in enumerate(nodes)}
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
                outs.append(("const", _readonly(g.asnumpy())))
        self.outs = outs
        need = {t.id for t in targets}
        bwd = nodes[start:]
        for n in reversed(bwd):
            if n.id in need:
                need.update(i.id for i in n.inputs)
        keep = {o[1] for o in outs if o[0] == "dense"} | {j for o in outs if o[0] == "sparse" for j in o[1:3]}
        self.flat = _FlatProgram([n for n in bwd if n.id in need], slot, len(nodes), keep)

    def run(self, tape: core.Tape) -> list:
        nodes = tape.graph.nodes
        vals = tape.values
        env: list = [None] * self.flat.n_slots
        for i in self.flat.reads:
            env[i] = vals[nodes[i].id]
        self.flat.run(env)
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


# ----------------------------------------------------------------------------------------------
# PYNATIVE: an optimizer's update, traced once per gradient signature and replayed
# ----------------------------------------------------------------------------------------------
_updates: "OrderedDict[tuple, tuple]" = OrderedDict()


def _flatten_grads(grads: list) -> tuple[list, tuple]:
    arrays, spec = [], []
    for g in grads:
        if isinstance(g, SparseGrad):
            i, v = g.indices.asnumpy(), g.values.asnumpy()
            arrays += [i, v]
            spec.append(("sparse", i.shape, i.dtype.str, v.shape, v.dtype.str, tuple(g.dense_shape)))
        else:
            a = g.asnumpy()
            arrays.append(a)
            spec.append(("dense", a.shape, a.dtype.str))
    return arrays, tuple(spec)


def apply_update_eager(optimizer, grads: list) -> None:
    """PYNATIVE: ``optimizer(grads)``, the update traced once per gradient signature (shapes, dtypes,
    sparse or dense) into a graph -- as GRAPH_MODE traces it into the step -- and replayed as a flat list
    of kernel calls: the same kernels in the same order as running it op by op, each one reported as an
    ``op`` event like eager dispatch. Optimizers keep every value that changes between steps (learning
    rate, step counts) in Parameters, which GRAPH_MODE already relies on."""
    arrays, spec = _flatten_grads(grads)
    key = (id(optimizer), spec)
    hit = _updates.get(key)
    if hit is None or hit[0]() is not optimizer:  # (an id reused by a new optimizer is a miss)
        graph = Graph("pynative_update")
        builder = core.GraphBuilder(graph)
        with core.building(builder):
            ins = [builder.input(f"g{k}", a.shape, a.dtype) for k, a in enumerate(arrays)]
            traced, k = [], 0
            for sp in spec:
                if sp[0] == "sparse":
                    traced.append(SparseGrad(ins[k], ins[k + 1], sp[5]))
                    k += 2
                else:
                    traced.append(ins[k])
                    k += 1
            optimizer(traced)
        slot = {n.id: k for k, n in enumerate(graph.nodes)}
        inputs = [slot[t.node.id] for t in ins]
        hit = (weakref.ref(optimizer), _FlatProgram(graph.nodes, slot, len(graph.nodes), set()), inputs)
        _updates[key] = hit
        if len(_updates) > _CACHE_SIZE:
            _updates.popitem(last=False)
    else:
        _updates.move_to_end(key)
    _, prog, inputs = hit
    env: list = [None] * prog.n_slots
    for i, a in zip(inputs, arrays):
        env[i] = a
    prog.run(env, eager=True)
