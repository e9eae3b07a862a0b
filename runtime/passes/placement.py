"""Host/device placement: decide where each node runs and insert the copies between them.

* a node annotated ``primitive_target="CPU"`` (by ``add_prim_attr``, a Cell's ``set_attr`` or an
  optimizer's ``target``) runs on the host; every other compute node on the device;
* a parameter lives on the host when every node touching it is on the host (an embedding table
  read by a host gather and updated by a host optimizer), otherwise on the device;
* an in-place update runs where its variable lives;
* graph inputs (batches) arrive on the device; constants are available on both sides;
* every edge from one side to the other gets one ``copy_h2d`` / ``copy_d2h`` node (shared by all
  consumers on the other side).

Sets ``node.ann["placement"]`` to "host" or "device" on every node.
"""
from __future__ import annotations

from runtime.ir.graph import Graph, Node
from runtime.ops.registry import get_primitive

HOST, DEVICE = "host", "device"


def _is_effect(n: Node) -> bool:
    return n.op not in ("input", "param", "const") and get_primitive(n.op).category == "effect"


def place(graph: Graph) -> Graph:
    users: dict[int, list[Node]] = {}
    for n in graph.nodes:
        for i in n.inputs:
            users.setdefault(i.id, []).append(n)

    def pinned(n: Node) -> str:
        return HOST if n.ann.get("primitive_target") == "CPU" else DEVICE

    for n in graph.nodes:
        if n.op == "input":
            n.ann["placement"] = DEVICE
        elif n.op == "const":
            n.ann["placement"] = "any"
        elif n.op != "param":
            n.ann["placement"] = pinned(n)
    for n in graph.nodes:
        if n.op == "param":
            us = users.get(n.id, [])
            on_host = bool(us) and all(u.ann["placement"] == HOST for u in us)
            n.ann["placement"] = HOST if on_host else DEVICE
    for n in graph.nodes:  # an update runs where its variable lives
        if _is_effect(n):
            n.ann["placement"] = n.inputs[0].ann["placement"]

    if not any(n.ann["placement"] == HOST for n in graph.nodes):
        return graph

    copies: dict[tuple[int, str], Node] = {}
    new_nodes: list[Node] = []
    for n in graph.nodes:
        side = n.ann["placement"]
        if side in (HOST, DEVICE):
            for k, src in enumerate(n.inputs):
                src_side = src.ann["placement"]
                if src_side in ("any", side):
                    continue
                if _is_effect(n) and k == 0:
                    continue  # the variable itself, updated in place where it lives
                key = (src.id, side)
                cp = copies.get(key)
                if cp is None:
                    op = "copy_h2d" if side == DEVICE else "copy_d2h"
                    cp = Node(op, [src], {}, src.shape, src.dtype, scope=n.scope,
                              ann={"placement": HOST, "phase": n.ann.get("phase"), "copy": True})
                    copies[key] = cp
                    new_nodes.append(cp)
                n.inputs[k] = cp
        new_nodes.append(n)
    graph.nodes = new_nodes
    return graph
