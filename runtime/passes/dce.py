"""Dead-code elimination: keep only nodes that an output or a side effect depends on."""
from __future__ import annotations

from runtime.ir.graph import Graph, toposort


def dce(graph: Graph) -> Graph:
    keep = {n.id for n in toposort(graph.nodes, graph.roots())}
    out = Graph(graph.name)
    out.nodes = [n for n in graph.nodes if n.id in keep]
    out.outputs = dict(graph.outputs)
    out.effects = list(graph.effects)
    out.meta = dict(graph.meta)
    return out
