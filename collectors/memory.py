"""Device memory: the ``memory`` table.

A step's activations are described statically by the graph's task table (each task's planned output
buffer: ``out_size``, ``out_offset``, ``free_task_id``) and timed by the step's ``step_tasks`` arrays:
a buffer is allocated at its producing task's start and freed at the end of task ``free_task_id``
(``-1``: at the end of the step). Rows are sorted by time within each step (a free before an alloc at
the same instant), with ``in_use`` = the graph's parameter bytes + the live activations -- so every
step returns to the parameter baseline. These rows have ``source = "planned"``: planned liveness at
measured times, MindSpore's graph-mode model. The device's MemoryPool reports its real allocations and
frees (parameters, each step's activation reserve, data-queue batches, the fused kernels' buffers) as
``memory`` events; they are appended as they come with ``source = "pool"`` and the pool's own ``in_use``.

When every step runs the graph's tasks in the same order (one stream: always), the sequence of
allocations and frees is the same in every step, so it is built once per graph (a template: which
task's start or end times each row, its buffer, its ``in_use``) and each flush only gathers the times
-- after checking that they are indeed in order in every step; otherwise rows are sorted per step.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from collectors.base import Collector
from collectors.buffers import EventBuffer, Field, concat, dict_column, to_arrow
from collectors.tasks import StepGroup, StepStore

_ACTIONS = pa.array(["free", "alloc"], pa.string())  # index = order: 0 free, 1 alloc
_STRINGS = ("tensor", "op", "scope", "shape", "dtype")
_SOURCE = {"tensor": "name", "op": "op", "scope": "scope", "shape": "shape", "dtype": "dtype"}
# a ``memory`` event (the pool's real allocations and frees) -> one row
_POOL_FIELDS = [Field("t_ns", "i"), Field("action", "s"), Field("device", "s", "device"), Field("kind", "s"),
                Field("tensor", "s"), Field("op", "s"), Field("scope", "s"), Field("size", "i", 0),
                Field("offset", "i"), Field("in_use", "i"), Field("capacity", "i"), Field("step", "i"),
                Field("shape", "s"), Field("dtype", "s"), Field("source", "s", "pool")]


def _event_time_order(evk: np.ndarray, t: np.ndarray, order: np.ndarray, n_ev: int) -> np.ndarray:
    """The permutation sorting rows by (event, time, free-before-alloc). One stable sort of a composite
    int64 key (nearly sorted input: the allocations already are, so timsort mostly merges runs);
    falls back to a 3-key lexsort if the key would not fit in 63 bits."""
    if not len(t):
        return np.zeros(0, np.int64)
    t_rel = t - t.min()
    tb = int(t_rel.max()).bit_length() + 1
    if tb + max(1, int(n_ev).bit_length()) <= 62:
        return np.argsort((evk << tb) | (t_rel << 1) | order, kind="stable")
    return np.lexsort((order, t, evk))


class MemoryCollector(Collector):
    tables = ("memory",)

    def __init__(self, store: StepStore):
        self.store = store
        store.register("memory")
        self._dynamic = EventBuffer(_POOL_FIELDS)
        self.on_memory = self._dynamic.append  # the hot path: keep the event, convert it at the flush

    def handlers(self):
        return {"memory": self.on_memory}  # step_tasks are kept by the shared StepStore

    # -- the uniform case: one template per graph -------------------------------------------------------------
    @staticmethod
    def _template(g: StepGroup) -> dict | None:
        gt = g.gt
        tpl = gt._cache.get("memory_template")
        if tpl is not None:
            return tpl
        ids = gt.template_ids
        n = len(ids)
        pos0 = gt.pos[ids]
        inv = np.full(gt.n, -1, np.int64)
        inv[pos0] = np.arange(n)
        a_k = np.nonzero(gt.i("out_size")[pos0] > 0)[0]  # positions (in the step) of tasks with a buffer
        fp = gt.free_pos[pos0[a_k]]
        f_k = np.where(fp >= 0, inv[np.maximum(fp, 0)], -1)  # position of the freeing task, -1: step end
        # the order of the rows, from the first step of the batch (checked against every step later)
        s0, e0 = g.starts[:n], g.ends[:n]
        a_t = s0[a_k]
        f_t = np.maximum(np.where(f_k >= 0, e0[np.maximum(f_k, 0)], e0.max() if n else 0), a_t)
        t = np.concatenate((a_t, f_t))
        order = np.concatenate((np.ones(len(a_k), np.int64), np.zeros(len(a_k), np.int64)))
        perm = _event_time_order(np.zeros(len(t), np.int64), t, order, 1)
        rows = np.concatenate((pos0[a_k], pos0[a_k]))[perm]
        order = order[perm]
        size = gt.i("out_size")[rows]
        tpl = {"a_k": a_k, "f_k": f_k, "perm": perm, "rows": rows.astype(np.int32), "order": order.astype(np.int32),
               "size": size, "offset": gt.i("out_offset")[rows],
               "in_use": gt.parameter_bytes + np.cumsum(np.where(order == 1, size, -size))}
        gt._cache["memory_template"] = tpl
        return tpl

    def _expand_uniform(self, g: StepGroup, t0: int):
        tpl = self._template(g)
        n_ev, n = len(g.lens), len(g.gt.template_ids)
        if not len(tpl["a_k"]):
            return None
        S, E = g.starts.reshape(n_ev, n), g.ends.reshape(n_ev, n)
        a_t = S[:, tpl["a_k"]]
        f_k = tpl["f_k"]
        f_t = np.maximum(np.where(f_k >= 0, E[:, np.maximum(f_k, 0)], E.max(axis=1)[:, None]), a_t)
        T = np.concatenate((a_t, f_t), axis=1)[:, tpl["perm"]]
        if T.shape[1] > 1 and not (np.diff(T, axis=1) >= 0).all():
            return None  # this batch ran in another order: sort it step by step
        gt, m = g.gt, T.shape[1]
        rows = np.tile(tpl["rows"], n_ev)
        cols = {c: gt.column(_SOURCE[c], rows) for c in _STRINGS}
        cols.update({"t_ns": T.ravel(), "action": dict_column(np.tile(tpl["order"], n_ev), _ACTIONS),
                     "device": "device", "kind": "activation", "size": np.tile(tpl["size"], n_ev),
                     "offset": np.tile(tpl["offset"], n_ev), "in_use": np.tile(tpl["in_use"], n_ev),
                     "capacity": gt.capacity, "step": np.repeat(g.steps, m),
                     "source": "planned"})
        return to_arrow("memory", cols, t0)

    # -- the general case ----------------------------------------------------------------------------------
    def _expand_general(self, g: StepGroup, t0: int):
        gt = g.gt
        n_ev, n_tasks = len(g.lens), max(gt.n, 1)
        pos = gt.pos[g.ids]
        ev_idx = np.repeat(np.arange(n_ev, dtype=np.int64), g.lens)
        step_end = np.full(n_ev, -1, np.int64)
        nonempty = g.lens > 0
        if nonempty.any():
            offsets = np.concatenate(([0], np.cumsum(g.lens)[:-1]))
            step_end[nonempty] = np.maximum.reduceat(g.ends, offsets[nonempty])
        end_of = np.full(n_ev * n_tasks, -1, np.int64)  # (event, task row) -> end time in that step
        end_of[ev_idx * n_tasks + pos] = g.ends
        size = gt.i("out_size")[pos]
        m = size > 0
        if not m.any():
            return None
        a_pos, a_ev, a_t, a_size = pos[m], ev_idx[m], g.starts[m], size[m]
        fpos = gt.free_pos[a_pos]
        f_t = np.where(fpos >= 0, end_of[a_ev * n_tasks + np.maximum(fpos, 0)], -1)
        f_t = np.maximum(np.where(f_t < 0, step_end[a_ev], f_t), a_t)  # never freed before it is written
        t = np.concatenate((a_t, f_t))
        order = np.concatenate((np.ones(len(a_t), np.int64), np.zeros(len(a_t), np.int64)))  # 0 free, 1 alloc
        evk = np.concatenate((a_ev, a_ev))
        idx = _event_time_order(evk, t, order, n_ev)  # by event, then time, frees first at a tie
        t, order, evk = t[idx], order[idx], evk[idx]
        rows = np.concatenate((a_pos, a_pos))[idx].astype(np.int32)
        sz = np.concatenate((a_size, a_size))[idx]
        in_use = gt.parameter_bytes + np.cumsum(np.where(order == 1, sz, -sz))  # each step sums to 0
        cols = {c: gt.column(_SOURCE[c], rows) for c in _STRINGS}
        cols.update({"t_ns": t, "action": dict_column(order, _ACTIONS), "device": "device", "kind": "activation",
                     "size": sz, "offset": gt.i("out_offset")[rows], "in_use": in_use, "capacity": gt.capacity,
                     "step": g.steps[evk], "source": "planned"})
        return to_arrow("memory", cols, t0)

    def drain(self, t0, final=False):
        tables = []
        for g in self.store.take("memory"):
            t = self._expand_uniform(g, t0) if g.uniform else None
            tables.append(t if t is not None else self._expand_general(g, t0))
        cols = self._dynamic.drain()
        if cols:
            tables.append(to_arrow("memory", cols, t0))
        t = concat(tables)
        return {"memory": t} if t is not None else {}
