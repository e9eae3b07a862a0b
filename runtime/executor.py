"""Runs a Graph: the interpreter behind graph mode.

``CompiledGraph`` removes dead code, fixes the node order, precomputes each node's kernel,
input slots and the slots that die after it (so intermediate buffers are released as soon
as their last user ran), and then runs the list per call. With a hook subscriber it times
every kernel and emits one ``"op"`` event per node.
"""
from __future__ import annotations

import time

import numpy as np

from runtime import hooks
from runtime.ir.graph import Graph, Node, toposort
from runtime.ops.registry import get_primitive


class FeedError(ValueError):
    """A value fed to a graph input does not match what the graph was built for."""


def live_nodes(graph: Graph) -> list[Node]:
    """Nodes the outputs and effects depend on, in a valid order (dead code dropped)."""
    keep = {n.id for n in toposort(graph.nodes, graph.roots())}
    return [n for n in graph.nodes if n.id in keep]


class CompiledGraph:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes = live_nodes(graph)
        slot = {n.id: k for k, n in enumerate(self.nodes)}
        last_use: dict[int, int] = {}
        for k, n in enumerate(self.nodes):
            for i in n.inputs:
                last_use[i.id] = k
        keep = {n.id for n in graph.roots()}
        frees: list[list[int]] = [[] for _ in self.nodes]
        for nid, k in last_use.items():
            if nid not in keep and self.nodes[slot[nid]].op not in ("param", "const"):
                frees[k].append(slot[nid])
        self.inputs: dict[str, Node] = {n.attrs["name"]: n for n in self.nodes if n.op == "input"}
        self.steps = []
        for k, n in enumerate(self.nodes):
            if n.op in ("input", "param", "const"):
                continue
            prim = get_primitive(n.op)
            attrs = n.attrs
            flops, nbytes = prim.cost(n)
            self.steps.append((k, prim.kernel, [slot[i.id] for i in n.inputs], attrs, tuple(frees[k]), n,
                               flops, nbytes))
        self.leaves = [(slot[n.id], n) for n in self.nodes if n.op in ("param", "const")]
        self.input_slots = [(slot[n.id], n) for n in self.inputs.values()]
        self.out_slots = {name: slot[n.id] for name, n in graph.outputs.items()}

    def __call__(self, feeds: dict[str, np.ndarray], step: int | None = None) -> dict[str, np.ndarray]:
        env: list = [None] * len(self.nodes)
        for k, n in self.leaves:
            env[k] = n.attrs["_var"].data if n.op == "param" else n.attrs["value"]
        for k, n in self.input_slots:
            name = n.attrs["name"]
            if name not in feeds:
                raise FeedError(f"{self.graph.name}: no value fed for input {name!r}")
            v = feeds[name]
            if v.shape != n.shape or v.dtype != n.dtype:
                raise FeedError(f"{self.graph.name}: input {name!r} expects {n.shape} {n.dtype}, "
                                f"got {v.shape} {v.dtype}")
            env[k] = v
        if hooks.listening:
            self._run_traced(env, step)
        else:
            for k, kernel, ins, attrs, frees, _n, _f, _b in self.steps:
                env[k] = kernel(*[env[i] for i in ins], **attrs)
                for f in frees:
                    env[f] = None
        return {name: env[k] for name, k in self.out_slots.items()}

    def _run_traced(self, env, step):
        clock = time.perf_counter_ns
        emit = hooks.emit
        for k, kernel, ins, attrs, frees, n, flops, nbytes in self.steps:
            t0 = clock()
            env[k] = kernel(*[env[i] for i in ins], **attrs)
            t1 = clock()
            emit("op", {"name": n.name, "op": n.op, "scope": n.scope, "start_ns": t0, "end_ns": t1,
                        "shape": n.shape, "dtype": n.dtype.name, "flops": flops, "bytes": nbytes,
                        "step": step, "graph": self.graph.name})
            for f in frees:
                env[f] = None


def evaluate(nodes: list[Node], values: dict[int, np.ndarray], targets: list[Node]) -> dict[int, np.ndarray]:
    """Eagerly run ``nodes`` (in order) needed for ``targets``, reading leaves from ``values``."""
    need = {t.id for t in targets}
    for n in reversed(nodes):
        if n.id in need:
            need.update(i.id for i in n.inputs)
    out = dict(values)
    for n in nodes:
        if n.id not in need or n.id in out:
            continue
        if n.op == "const":
            out[n.id] = n.attrs["value"]
        elif n.op == "param":
            out[n.id] = n.attrs["_var"].data
        else:
            out[n.id] = get_primitive(n.op).kernel(*[out[i.id] for i in n.inputs], **n.attrs)
    return out
