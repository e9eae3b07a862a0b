"""Simplify a graph (Graph -> Graph): constant folding, algebraic identities, CSE, then DCE.

* constant folding -- a node whose inputs are all constants (and that is not random or an effect)
  becomes a constant (up to 64K elements);
* algebra -- ``x*1``, ``1*x``, ``x+0``, ``0+x``, ``x-0``, ``x/1`` (when the constant does not
  broadcast ``x`` to a larger shape), ``neg(neg x)``, ``reshape`` to the same shape, ``reshape`` of
  ``reshape`` (expand_dims / squeeze are canonicalised to reshape first), ``broadcast_to`` / ``cast``
  to the same shape / dtype, identity and composed ``transpose``, a ``slice`` that is the whole
  tensor or exactly one input of a ``concat``, a reduction over size-1 axes only (a reshape);
* CSE -- nodes with the same op, inputs and attrs are merged, but only within one training phase
  (forward / backward / update) and one placement target: the backward of layer norm recomputes
  its statistics from ``x`` in its own fused kernel rather than forcing the forward kernel to
  write ``x_hat`` to memory. Random sources and effects are never merged;
* DCE -- drop what no output or effect needs.
"""
from __future__ import annotations

import numpy as np

from runtime.ir.graph import Graph, Node
from runtime.passes.dce import dce
from runtime.ops.registry import get_primitive

LEAVES = ("input", "param", "const")
FOLD_LIMIT = 1 << 16


def _is_const(n: Node, value=None) -> bool:
    if n.op != "const":
        return False
    if value is None:
        return True
    v = n.attrs["value"]
    return v.size > 0 and bool(np.all(v == value))


def _attr_key(attrs: dict):
    out = []
    for k in sorted(attrs):
        v = attrs[k]
        if isinstance(v, np.ndarray):
            v = ("ndarray", v.dtype.str, v.shape, v.tobytes())
        elif isinstance(v, list):
            v = tuple(v)
        try:
            hash(v)
        except TypeError:
            return None
        if k.startswith("_"):      # objects (rng, variables, programs): never merge
            return None
        out.append((k, v))
    return tuple(out)


def _cse_key(n: Node):
    if n.op == "const":
        v = n.attrs["value"]
        return ("const", v.dtype.str, v.shape, v.tobytes())
    if n.op in ("input", "param"):
        return None
    cat = get_primitive(n.op).category
    if cat in ("source", "effect", "copy"):
        return None
    ak = _attr_key(n.attrs)
    if ak is None:
        return None
    return (n.op, tuple(i.id for i in n.inputs), tuple(d.id for d in n.deps), ak,
            n.ann.get("phase"), n.ann.get("primitive_target"))


def _new(op, inputs, attrs, like: Node) -> Node:
    prim = get_primitive(op)
    shape, dtype = prim.infer([i.shape for i in inputs], [i.dtype for i in inputs], attrs)
    return Node(op, inputs, attrs, shape, dtype, scope=like.scope, ann=dict(like.ann))


def _rewrite(n: Node):
    """An algebraic rewrite of ``n``: an existing node, a new node, or None."""
    op, ins = n.op, n.inputs
    same = lambda x: x.shape == n.shape and x.dtype == n.dtype  # noqa: E731
    if op == "mul":
        for x, c in ((ins[0], ins[1]), (ins[1], ins[0])):
            if _is_const(c, 1) and same(x):
                return x
    if op == "add":
        for x, c in ((ins[0], ins[1]), (ins[1], ins[0])):
            if _is_const(c, 0) and same(x):
                return x
    if op == "sub" and _is_const(ins[1], 0) and same(ins[0]):
        return ins[0]
    if op == "div" and _is_const(ins[1], 1) and same(ins[0]):
        return ins[0]
    if op == "neg" and ins[0].op == "neg":
        return ins[0].inputs[0]
    if op in ("expand_dims", "squeeze"):
        return _new("reshape", [ins[0]], {"shape": n.shape}, n)
    if op == "reshape":
        if ins[0].shape == n.shape:
            return ins[0]
        if ins[0].op == "reshape":
            return _new("reshape", [ins[0].inputs[0]], {"shape": n.shape}, n)
    if op == "broadcast_to" and same(ins[0]):
        return ins[0]
    if op == "cast" and same(ins[0]):
        return ins[0]
    if op == "transpose":
        perm = tuple(n.attrs["perm"])
        if perm == tuple(range(len(perm))):
            return ins[0]
        if ins[0].op == "transpose":
            inner = tuple(ins[0].attrs["perm"])
            comp = tuple(inner[p] for p in perm)
            if comp == tuple(range(len(comp))):
                return ins[0].inputs[0]
            return _new("transpose", [ins[0].inputs[0]], {"perm": comp}, n)
    if op == "slice":
        begin, end = tuple(n.attrs["begin"]), tuple(n.attrs["end"])
        if all(b == 0 for b in begin) and end == ins[0].shape:
            return ins[0]
        src = ins[0]
        if src.op == "concat":
            ax = src.attrs["axis"] % len(src.shape)
            off = 0
            for x in src.inputs:
                lo, hi = off, off + x.shape[ax]
                if begin[ax] == lo and end[ax] == hi and all(
                        (b == 0 and e == s) for a, (b, e, s) in enumerate(zip(begin, end, src.shape)) if a != ax):
                    return x
                off = hi
    if op in ("reduce_sum", "reduce_max") and ins[0].size == n.size:
        return _new("reshape", [ins[0]], {"shape": n.shape}, n) if ins[0].shape != n.shape else ins[0]
    return None


def _fold(n: Node):
    if n.op in LEAVES or not n.inputs or n.size > FOLD_LIMIT:
        return None
    if not all(i.op == "const" for i in n.inputs):
        return None
    prim = get_primitive(n.op)
    if prim.category in ("source", "effect", "copy", "opaque"):
        return None
    if any(k.startswith("_") for k in n.attrs):
        return None
    try:
        with np.errstate(all="ignore"):
            v = np.asarray(prim.kernel(*[i.attrs["value"] for i in n.inputs], **n.attrs))
    except Exception:  # noqa: BLE001 - leave it to run time (and its error message)
        return None
    v = np.array(v, dtype=n.dtype, copy=True).reshape(n.shape)
    return Node("const", [], {"value": v}, n.shape, n.dtype)


def simplify(graph: Graph) -> Graph:
    for _ in range(4):
        graph, changed = _once(graph)
        if not changed:
            break
    return dce(graph)


def _once(graph: Graph):
    subst: dict[int, Node] = {}
    seen: dict = {}
    nodes: list[Node] = []
    changed = False

    def resolve(x: Node) -> Node:
        while x.id in subst:
            x = subst[x.id]
        return x

    placed: set[int] = set()
    for n in graph.nodes:
        n.inputs = [resolve(i) for i in n.inputs]
        n.deps = [resolve(d) for d in n.deps]
        repl = None
        if n.op not in LEAVES:
            repl = _fold(n) or _rewrite(n)
        if repl is not None and repl is not n:
            changed = True
            if repl.id not in placed:           # a new node: it takes n's place
                key = _cse_key(repl)
                if key is not None and key in seen:
                    repl = seen[key]
                else:
                    if key is not None:
                        seen[key] = repl
                    nodes.append(repl)
                    placed.add(repl.id)
            subst[n.id] = repl
            continue
        key = _cse_key(n)
        if key is not None:
            prev = seen.get(key)
            if prev is not None:
                subst[n.id] = prev
                changed = True
                continue
            seen[key] = n
        nodes.append(n)
        placed.add(n.id)
    out = Graph(graph.name)
    out.nodes = nodes
    out.outputs = {k: resolve(v) for k, v in graph.outputs.items()}
    out.effects = [resolve(e) for e in graph.effects]
    out.meta = dict(graph.meta)
    return out, changed
