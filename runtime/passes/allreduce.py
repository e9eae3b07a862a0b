"""Data parallelism: AllReduce the gradients of a training step, bucket by bucket (a Graph -> Graph pass).

Runs right after autodiff (first in ``passes.pipeline``) when ``context.set_auto_parallel_context(
parallel_mode="data_parallel")``. ``Model.build_train_graph`` records the step's gradients in
``graph.meta["gradients"]`` as (Parameter, gradient) pairs in the optimizer's parameter order.

* Buckets: ``all_reduce_fusion_config`` holds split indices into that list (MindSpore's semantics):
  ``[2, 6]`` -> gradients 0-1, 2-5 and 6-end, one ``all_reduce`` node each; ``[]`` -> one per gradient.
* Each bucket's ``all_reduce`` is placed right after the last of its gradients in the node order, so the
  ``comm`` stream starts it as soon as they are ready and the rest of the backward runs meanwhile; the
  gradients are sliced back out (``slice`` + ``reshape``) just before the optimizer's first use of
  them, so the compute stream waits (an event) only where the update needs the reduced values.
* ``gradients_mean=True`` averages (``op="mean"``), otherwise sums.
* The step's loss rides in the first bucket to be launched (4 more bytes), so every rank reports the
  loss of the global batch, the same number on every rank.
* A sparse gradient (``SparseGrad`` from an embedding gather) is not densified and not bucketed:
  ``Model`` all-gathers its indices and rows (``ops.comm.gather_sparse_gradients``) before building the
  optimizer -- the optimizer's shapes depend on the number of rows -- and its duplicate-row summation adds
  the ranks' rows up.

Only the optimizer's uses (nodes of phase ``update``) are rewired; the backward keeps the local values.
"""
from __future__ import annotations

import numpy as np

from runtime import communication, context, core
from runtime.core import GraphBuilder, SparseGrad, Tensor
from runtime.ir.graph import Graph, Node
from runtime.ops import api as F
from runtime.ops import comm as C

LEAVES = ("input", "param", "const")


def _symbolic(t) -> Node | None:
    return t.node if isinstance(t, Tensor) and t.is_symbolic and t.node is not None and t.node.op not in LEAVES \
        else None


def insert_allreduce(graph: Graph) -> Graph:
    pairs = graph.meta.get("gradients")
    if not pairs or not communication.data_parallel() or graph.meta.get("allreduce_inserted"):
        return graph
    graph.meta["allreduce_inserted"] = True
    size = communication.rank_and_size()[1]
    op = "mean" if context.get_auto_parallel_context("gradients_mean") else "sum"
    buckets = communication.fusion_buckets(len(pairs))
    pos = {n.id: k for k, n in enumerate(graph.nodes)}
    builder = GraphBuilder(graph)
    after: dict[int, list[Node]] = {}     # node id -> new nodes that go right after it
    unpacks: list[tuple[list[int], list[Node]]] = []  # (original node ids, new nodes to put before their first use)
    remap: dict[int, Node] = {}           # original gradient node id -> its reduced value
    tail: list[Node] = []                 # new nodes that go last (the loss)

    def build(fn):
        start = len(graph.nodes)
        fn()
        new = graph.nodes[start:]
        del graph.nodes[start:]
        return new

    with core.building(builder), core.annotate(phase="update"), core.scope_override("AllReduce"):
        # dense gradients: one all_reduce per bucket
        loss = graph.outputs.get("loss")
        loss_done = loss is None or loss.size != 1 or loss.op in LEAVES
        order = []
        for b, idx in enumerate(buckets):
            members = []
            for k in idx:
                node = _symbolic(pairs[k][1]) if not isinstance(pairs[k][1], SparseGrad) else None
                if node is not None:
                    members.append(node)
            if members:
                order.append((max(pos[m.id] for m in members), b, members))
        for _, b, members in sorted(order, key=lambda o: o[0]):  # first ready first: that bucket carries the loss
            carry = not loss_done and loss.dtype == members[0].dtype
            ins = members + ([loss] if carry else [])
            box = {}
            new = build(lambda: box.setdefault("t", C.all_reduce([Tensor(node=m) for m in ins], op=op, bucket=b)))
            new[-1].name = f"AllReduce_bucket{b}"
            after.setdefault(max(ins, key=lambda m: pos[m.id]).id, []).extend(new)
            reduced = box["t"]
            pieces: list = []
            new = build(lambda: pieces.extend(C.unpack(reduced, [m.shape for m in ins])))
            unpacks.append(([m.id for m in members], new))
            for m, t in zip(members, pieces):
                remap.setdefault(m.id, t.node)
            if carry:
                loss_done = True
                lt = pieces[-1]
                new = build(lambda: box.__setitem__("loss", F.mul(lt, 1.0 / size) if op == "sum" and size > 1
                                                    else lt))
                graph.outputs["loss"] = box["loss"].node
                tail.extend(new)
    # rewire the optimizer's reads, then lay the new nodes out
    first_use: dict[int, int] = {}
    for n in graph.nodes:
        if n.ann.get("phase") != "update" or n.op in LEAVES:
            continue
        for k, i in enumerate(n.inputs):
            r = remap.get(i.id)
            if r is not None:
                n.inputs[k] = r
                first_use.setdefault(i.id, n.id)
    before: dict[int, list[Node]] = {}
    for ids, new in unpacks:
        uses = [first_use[i] for i in ids if i in first_use]
        if uses:
            before.setdefault(min(uses, key=pos.__getitem__), []).extend(new)
        else:
            tail[:0] = new  # ahead of the loss's scaling, which may read one of these slices
    nodes: list[Node] = []
    for n in graph.nodes:
        nodes.extend(before.get(n.id, ()))
        nodes.append(n)
        nodes.extend(after.get(n.id, ()))
    graph.nodes = nodes + tail
    return graph


__all__ = ["insert_allreduce"]
