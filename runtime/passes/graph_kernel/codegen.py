"""Generate one kernel per fused node (Graph -> Graph).

Every ``fused`` / ``fused_assign`` node gets ``attrs["_program"]``: the group's ``kernels.Program``
(iteration plan + generated C + interpreter encoding), shared by identical groups, and
``attrs["kernel"]``, the generated function's name (shown in dumps). All kernels of the graph are
compiled up front, two gcc processes at a time, or loaded from the on-disk cache.
"""
from __future__ import annotations

from runtime.ir.graph import Graph
from runtime.passes.graph_kernel.kernels import ensure_compiled, program_for


def codegen(graph: Graph) -> Graph:
    programs = []
    for n in graph.nodes:
        if n.op in ("fused", "fused_assign"):
            prog = program_for(n.attrs["_subgraph"])
            n.attrs["_program"] = prog
            n.attrs["kernel"] = prog.name
            programs.append(prog)
    ensure_compiled(programs)
    return graph
