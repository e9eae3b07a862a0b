"""Order side effects: an in-place update of a variable must run after every node that reads it.

For each effect node (assign, scatter_add_rows) on variable V, add a control dependency on
every earlier reader of V (and make every later reader wait for it), looking through view-producing ops (reshape, transpose, ...) whose
outputs may alias V's storage, and on the previous effect on V. Passes that reorder nodes
(stream assignment, fusion) then keep the program's meaning.
"""
from __future__ import annotations

from runtime.ir.graph import Graph, Node
from runtime.ops.registry import get_primitive

_VIEW_OPS = {"reshape", "transpose", "expand_dims", "squeeze", "broadcast_to", "slice"}


def order_effects(graph: Graph) -> Graph:
    users: dict[int, list[Node]] = {}
    for n in graph.nodes:
        for i in n.inputs:
            users.setdefault(i.id, []).append(n)
    last_effect: dict[int, Node] = {}
    pos = {n.id: k for k, n in enumerate(graph.nodes)}
    for n in graph.nodes:
        if n.op in ("input", "param", "const") or get_primitive(n.op).category != "effect":
            continue
        var = n.inputs[0]
        readers, stack, seen = [], [var], set()
        while stack:
            v = stack.pop()
            for u in users.get(v.id, []):
                if u.id in seen or u is n:
                    continue
                seen.add(u.id)
                if pos[u.id] < pos[n.id]:
                    readers.append(u)
                elif n not in u.deps:  # a later reader sees the updated value
                    u.deps.append(n)
                if u.op in _VIEW_OPS:
                    stack.append(u)
        deps = {d.id: d for d in n.deps}
        for r in readers:
            deps.setdefault(r.id, r)
        if var.id in last_effect:
            deps.setdefault(last_effect[var.id].id, last_effect[var.id])
        n.deps = sorted(deps.values(), key=lambda d: pos[d.id])
        last_effect[var.id] = n
    return graph
