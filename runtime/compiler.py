"""The one way a traced graph becomes something that runs: ``compile(graph) -> CompiledGraph``.

``passes.pipeline`` (dce, graph-kernel fusion when enabled, effect ordering, placement, streams) runs
once, then the executor compiles the result to tasks and reserves device memory. No pass runs twice:
the executor only checks that every node has a stream.
"""
from __future__ import annotations

from runtime.executor import CompiledGraph
from runtime.ir.graph import Graph
from runtime.passes import pipeline


def compile(graph: Graph, device=None) -> CompiledGraph:  # noqa: A001  (the compiler's verb)
    return CompiledGraph(pipeline(graph), device=device)
