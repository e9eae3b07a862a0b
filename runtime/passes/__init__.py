"""Compiler passes: each is a Graph -> Graph function in its own module.

``pipeline(graph)`` is what Model runs on a traced training step before execution:
  dce            -- drop nodes no output or effect needs (first, so dead readers add no ordering);
  insert_allreduce -- data_parallel: one AllReduce per gradient bucket, launched as its gradients are ready;
  graph_kernel   -- with enable_graph_kernel=True: expand composites, simplify, fuse, generate kernels;
  order_effects  -- control dependencies so in-place updates run after every reader;
  place          -- host/device placement, copies inserted at the boundaries;
  assign_streams -- AI Core / AI CPU / host streams for the task compiler;
  verify         -- the IR verifier, after every pass when save_graphs/debug is on.
Later passes (graph-kernel fusion, fake-quant insertion, host/device placement, stream
assignment) slot in here behind their context switches.
"""
from __future__ import annotations

from runtime import context
from runtime.ir.graph import Graph
from runtime.passes.allreduce import insert_allreduce
from runtime.passes.dce import dce
from runtime.passes.effects import order_effects
from runtime.passes.graph_kernel import graph_kernel
from runtime.passes.placement import place
from runtime.passes.streams import assign_streams


def device_passes(graph: Graph) -> Graph:
    """The passes that prepare a graph for the device: placement, then streams."""
    return assign_streams(place(graph))


def pipeline(graph: Graph) -> Graph:
    graph.verify()
    passes = [dce, insert_allreduce] + ([graph_kernel] if context.get_context("enable_graph_kernel") else []) + \
        [order_effects, place, assign_streams]
    for p in passes:
        graph = p(graph)
        if context.get_context("save_graphs"):
            graph.verify()
    return graph
