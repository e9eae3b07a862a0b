"""Attach one kernel to every fused node (Graph -> Graph; annotates the graph it is given in place).

Every ``fused`` / ``fused_assign`` node gets ``attrs["_program"]``: the group's ``runtime.codegen.Program``
(schedule + generated C + interpreter encoding), shared by identical groups, and ``attrs["kernel"]``, the
generated function's name (shown in dumps). All kernels of the graph are compiled up front, two gcc
processes at a time, or loaded from the on-disk cache. The nodes are the ones ``fuse`` just created, so no
other graph sees the change; the returned graph is the same object.
"""
from __future__ import annotations

from runtime.codegen import prepare, program_for
from runtime.ir.graph import Graph


def build_kernels(graph: Graph) -> Graph:
    programs = []
    for n in graph.nodes:
        if n.op in ("fused", "fused_assign"):
            prog = program_for(n.attrs["_subgraph"])
            n.attrs["_program"] = prog
            n.attrs["kernel"] = prog.name
            programs.append(prog)
    prepare(programs)
    return graph
