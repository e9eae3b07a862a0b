"""The timeline: the ``tasks`` table.

Hot path: a ``step_tasks`` event (one per step, numpy arrays of task ids and times, and the step's input copy
as a task description and its two times) is kept as-is in a ``StepStore`` shared with the memory collector;
single ``task`` events (GetNext, the sink feeder's TransferData) are appended to columnar buffers. The writer
expands the kept step arrays against the graph's task table with numpy: one fancy index per numeric column,
and the string columns as dictionary arrays over the task table's strings (indices only -- no per-task
Python loop, no copy of any string).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from collectors.base import Collector, as_int, take_all
from collectors.buffers import EventBuffer, Field, concat, event_columns, to_arrow
from collectors.graphs import GraphRegistry, GraphTable

# a single ``task`` event -> one row (stream_id: see _stream_ids)
_SINGLE = [Field("step", "i"), Field("graph", "s"), Field("task_id", "i"), Field("name", "s"), Field("op", "s"),
           Field("kind", "s"), Field("stream", "s"), Field("scope", "s"),
           Field("phase", "s"), Field("start_ns", "i"), Field("end_ns", "i"), Field("flops", "i", 0),
           Field("bytes", "i", 0), Field("shape", "s"), Field("dtype", "s"), Field("fused_ops", "s")]
_STREAM_IDS = {"aicore0": 0, "aicore1": 1, "aicpu": 2, "comm": 3, "host": 4}


def _stream_ids(events: list[dict], streams: list[str]) -> np.ndarray:
    """The event's ``stream_id``, or when it has none the id of its stream's name (-1: unknown)."""
    return np.fromiter((_STREAM_IDS.get(s, -1) if e.get("stream_id") is None else int(e["stream_id"])
                        for e, s in zip(events, streams)), np.int64, len(events))
_STATIC_STRINGS = ("name", "op", "kind", "stream", "scope", "phase", "shape", "dtype", "fused_ops")


@dataclass
class StepGroup:
    """The kept ``step_tasks`` events of one graph since the last flush, concatenated."""
    gt: GraphTable
    lens: np.ndarray     # tasks per event
    steps: np.ndarray    # step per event (int32, -1: none)
    ids: np.ndarray      # task ids, all events back to back (int64)
    starts: np.ndarray
    ends: np.ndarray
    uniform: bool        # every event ran the graph's template task order (the usual case)


class StepBatch(list):
    """One flush's ``StepGroup``s, and ``inputs``: the input-copy task rows (``task`` event dicts) the
    ``step_tasks`` events carried (``input_task`` + ``input_ns``), written with the single tasks."""

    def __init__(self, groups=(), inputs: list[dict] | None = None):
        super().__init__(groups)
        self.inputs = inputs if inputs is not None else []


def _input_rows(events: list[dict]) -> list[dict]:
    rows = []
    for ev in events:
        task = ev.get("input_task")
        if task is not None:
            row = dict(task)
            row["start_ns"], row["end_ns"] = ev["input_ns"]
            row["step"], row["graph"] = ev.get("step"), ev.get("graph")
            rows.append(row)
    return rows


def _group(events: list[dict], registry: GraphRegistry) -> tuple[StepBatch, int]:
    by_graph: dict = {}
    for ev in events:
        by_graph.setdefault(ev.get("graph_id"), []).append(ev)
    out, unknown = StepBatch(inputs=_input_rows(events)), 0
    for gid, evs in by_graph.items():
        gt = registry.get(gid)
        if gt is None:
            unknown += len(evs)
            continue
        lens = np.fromiter((len(e["task_id"]) for e in evs), np.int64, len(evs))
        steps = np.fromiter((as_int(e.get("step")) for e in evs), np.int32, len(evs))
        ids = np.concatenate([e["task_id"] for e in evs]).astype(np.int64, copy=False)
        starts = np.concatenate([e["start_ns"] for e in evs]).astype(np.int64, copy=False)
        ends = np.concatenate([e["end_ns"] for e in evs]).astype(np.int64, copy=False)
        if gt.template_ids is None and len(ids):
            gt.template_ids = ids[:lens[0]].copy()
        tmpl = gt.template_ids
        uniform = (tmpl is not None and len(tmpl) > 0 and bool((lens == len(tmpl)).all())
                   and bool((ids.reshape(len(evs), len(tmpl)) == tmpl).all()))
        out.append(StepGroup(gt, lens, steps, ids, starts, ends, uniform))
    return out, unknown


class StepStore:
    """The ``step_tasks`` events kept on the hot path, handed to each consumer (tasks, memory) once per
    flush as the same grouped batch (grouped and concatenated only once)."""

    def __init__(self, registry: GraphRegistry):
        self.registry = registry
        self.events: list[dict] = []
        self.append = self.events.append  # the hot path
        self._lock = threading.Lock()
        self._seq = 0
        self._batch = StepBatch()
        self._served: dict[str, int] = {}
        self.unknown_graph_events = 0

    def register(self, consumer: str) -> None:
        with self._lock:
            self._served[consumer] = self._seq

    def take(self, consumer: str) -> StepBatch:
        """Every consumer is drained once per flush: the first one to ask cuts a new batch, the others
        get the same one."""
        with self._lock:
            if self._served[consumer] == self._seq:
                self._seq += 1
                self._batch, unknown = _group(take_all(self.events), self.registry)
                self.unknown_graph_events += unknown
            self._served[consumer] = self._seq
            return self._batch


class TasksCollector(Collector):
    tables = ("tasks",)

    def __init__(self, store: StepStore):
        self.store = store
        store.register("tasks")
        self._single = EventBuffer(_SINGLE)
        self.on_task = self._single.append  # the hot path: keep the event, convert it at the flush
        self.streams: dict[int, str] = {}
        self._seen_graphs: set = set()

    def handlers(self):
        return {"step_tasks": self.store.append, "task": self.on_task}

    def expand(self, groups: list[StepGroup], t0: int):
        tables = []
        for g in groups:
            gt = g.gt
            if g.uniform:  # the same task order every step: tile the template
                pos0 = gt.pos[gt.template_ids]
                idx = np.tile(pos0.astype(np.int32), len(g.lens))
            else:
                idx = gt.pos[g.ids].astype(np.int32)
            sid = gt.i("stream_id")
            if gt.graph_id not in self._seen_graphs:
                self._seen_graphs.add(gt.graph_id)
                self.streams.update(gt.streams())
            cols = {c: gt.column(c, idx) for c in _STATIC_STRINGS}
            cols.update({
                "step": np.repeat(g.steps, g.lens), "graph": gt.name, "task_id": g.ids.astype(np.int32),
                "stream_id": sid[idx], "start_ns": g.starts, "end_ns": g.ends, "dur_ns": g.ends - g.starts,
                "flops": gt.i("flops")[idx], "bytes": gt.i("bytes")[idx]})
            tables.append(to_arrow("tasks", cols, t0))
        return tables

    def drain(self, t0, final=False):
        batch = self.store.take("tasks")
        tables = self.expand(batch, t0)
        events = self._single.take() + batch.inputs
        if events:
            cols = event_columns(events, _SINGLE)
            cols["stream_id"] = _stream_ids(events, cols["stream"])
            cols["dur_ns"] = cols["end_ns"] - cols["start_ns"]
            for sid, name in zip(cols["stream_id"].tolist(), cols["stream"]):
                if sid >= 0 and sid not in self.streams:
                    self.streams[sid] = name
            tables.append(to_arrow("tasks", cols, t0))
        t = concat(tables)
        return {"tasks": t} if t is not None else {}
