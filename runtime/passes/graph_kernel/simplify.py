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

Rules: ``RULES`` maps an op to its algebraic rewrite (a function of the node returning an existing node, a
new node or None); folding and CSE apply to every op.

In place: each round rewires the ``inputs`` / ``deps`` of the nodes it keeps to their replacements, so the
nodes of the graph it is given change; it returns a new ``Graph`` object (replacements are new nodes). Run
it on a copy when the original must survive (``graph_kernel`` clones first).
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


def _same(x: Node, n: Node) -> bool:
    """Can ``x`` stand for ``n`` (same shape and dtype: the identity did not broadcast or cast)?"""
    return x.shape == n.shape and x.dtype == n.dtype


def _neutral_either_side(value):
    """``x op c`` or ``c op x`` with the constant ``c`` all ``value`` -> x."""
    def rule(n: Node):
        for x, c in ((n.inputs[0], n.inputs[1]), (n.inputs[1], n.inputs[0])):
            if _is_const(c, value) and _same(x, n):
                return x
        return None
    return rule


def _neutral_right(value):
    """``x op c`` with the constant ``c`` all ``value`` -> x."""
    def rule(n: Node):
        x, c = n.inputs
        return x if _is_const(c, value) and _same(x, n) else None
    return rule


def _neg(n: Node):
    x = n.inputs[0]
    return x.inputs[0] if x.op == "neg" else None


def _as_reshape(n: Node):
    return _new("reshape", [n.inputs[0]], {"shape": n.shape}, n)


def _reshape(n: Node):
    x = n.inputs[0]
    if x.shape == n.shape:
        return x
    if x.op == "reshape":
        return _new("reshape", [x.inputs[0]], {"shape": n.shape}, n)
    return None


def _identity_if_same(n: Node):
    return n.inputs[0] if _same(n.inputs[0], n) else None


def _transpose(n: Node):
    x = n.inputs[0]
    perm = tuple(n.attrs["perm"])
    if perm == tuple(range(len(perm))):
        return x
    if x.op == "transpose":
        comp = tuple(tuple(x.attrs["perm"])[p] for p in perm)
        if comp == tuple(range(len(comp))):
            return x.inputs[0]
        return _new("transpose", [x.inputs[0]], {"perm": comp}, n)
    return None


def _slice(n: Node):
    """The whole tensor, or exactly one input of a ``concat``."""
    src = n.inputs[0]
    begin, end = tuple(n.attrs["begin"]), tuple(n.attrs["end"])
    if all(b == 0 for b in begin) and end == src.shape:
        return src
    if src.op != "concat":
        return None
    ax = src.attrs["axis"] % len(src.shape)
    off = 0
    for x in src.inputs:
        lo, hi = off, off + x.shape[ax]
        if begin[ax] == lo and end[ax] == hi and all(
                (b == 0 and e == s) for a, (b, e, s) in enumerate(zip(begin, end, src.shape)) if a != ax):
            return x
        off = hi
    return None


def _reduce_size1(n: Node):
    """A reduction over size-1 axes only: a reshape (or nothing)."""
    x = n.inputs[0]
    if x.size != n.size:
        return None
    return _new("reshape", [x], {"shape": n.shape}, n) if x.shape != n.shape else x


# op -> rule(node) returning an existing node, a new node, or None (no rewrite)
RULES = {
    "mul": _neutral_either_side(1),
    "add": _neutral_either_side(0),
    "sub": _neutral_right(0),
    "div": _neutral_right(1),
    "neg": _neg,
    "expand_dims": _as_reshape,      # canonical form: reshape
    "squeeze": _as_reshape,
    "reshape": _reshape,
    "broadcast_to": _identity_if_same,
    "cast": _identity_if_same,
    "transpose": _transpose,
    "slice": _slice,
    "reduce_sum": _reduce_size1,
    "reduce_max": _reduce_size1,
}


def _rewrite(n: Node):
    """An algebraic rewrite of ``n``: an existing node, a new node, or None."""
    rule = RULES.get(n.op)
    return rule(n) if rule is not None else None


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
