"""Stream assignment: which stream runs each node.

* host-placed nodes and host<->device copies: the ``host`` stream;
* device ops the AI Core does not run (gather and scatter, unique, one-hot, argmax, float64 math):
  the ``aicpu`` stream;
* everything else: the compute stream ``aicore0``. With ``compute_streams=2`` the work of the
  backward pass that only feeds parameter updates (weight gradients, bias gradients and the
  optimizer's math -- every node whose result reaches the update of exactly one variable) moves to
  ``aicore1``, so it overlaps with the chain of input gradients that the
  next layer down is waiting for.

Sets ``node.ann["stream"]``. Cross-stream edges become event record/wait tasks in the task compiler.
"""
from __future__ import annotations

from runtime import context
from runtime.ir.graph import Graph

AICPU_OPS = frozenset({"gather", "gather_grad", "unique_ids", "unique_rows_sum", "unique_mask", "one_hot",
                       "argmax",
                       # EmbeddingLookup's sparse path and its fused sparse optimizers (MindSpore runs
                       # EmbeddingLookup, FusedSparseFtrl and FusedSparseLazyAdam as AI CPU kernels)
                       "emb_unique", "emb_inverse", "emb_lookup", "emb_expand", "emb_rows_grad", "sparse_ftrl",
                       "sparse_lazy_adam"})
COMM_OPS = frozenset({"all_reduce", "all_gather"})  # collectives: the comm stream, whatever their dtype
STREAMS = ("aicore0", "aicore1", "aicpu", "comm", "host")
MANY = object()


def assign_streams(graph: Graph) -> Graph:
    two = int(context.get_context("compute_streams")) >= 2
    users: dict[int, list] = {}
    for n in graph.nodes:
        for i in n.inputs:
            users.setdefault(i.id, []).append(n)
    # which variable's update each node feeds: one variable id, or MANY (the shared gradient chain)
    feeds: dict[int, object] = {}
    if two:
        for n in reversed(graph.nodes):
            if n.op in ("input", "param", "const"):
                continue
            if n.op in ("assign", "scatter_add_rows", "fused_assign"):
                var = n.inputs[0].attrs.get("_var")
                owner = getattr(var, "owner", None)
                feeds[n.id] = id(owner if owner is not None else var)  # a state variable counts as its parameter's
                continue
            targets = {feeds.get(u.id) for u in users.get(n.id, [])}
            targets.discard(None)
            feeds[n.id] = targets.pop() if len(targets) == 1 and MANY not in targets else (MANY if targets else None)
    for n in graph.nodes:
        if n.op in ("input", "param", "const"):
            continue
        if n.op in COMM_OPS:
            s = "comm"
        elif n.ann.get("placement") == "host":
            s = "host"
        elif n.op in AICPU_OPS or n.dtype.name == "float64" and n.op != "assign":
            s = "aicpu"
        elif two and n.ann.get("phase") in ("backward", "update") and feeds.get(n.id) not in (None, MANY):
            s = "aicore1"
        else:
            s = "aicore0"
        n.ann["stream"] = s
    return graph
