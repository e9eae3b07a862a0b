"""The step trace: the ``steps`` table, one row per recorded step from the runtime's ``step`` events.

A step is written only when both its ``begin`` and its ``end`` were seen while recording (a step already
running when profiling started has no traced tasks, so it is left out). Missing markers (PYNATIVE mode)
are -1; ``sink`` is true when the step started with a GetNext task (data sink mode). The hot path keeps
the begin time and the end event as delivered; the row is built when the writer drains.
"""
from __future__ import annotations

from collectors.base import Collector, take_all
from collectors.buffers import Field, event_columns, int_column, to_arrow

_FIELDS = [Field("step", "i"), Field("epoch", "i"), Field("get_next_start_ns", "i"), Field("get_next_end_ns", "i"),
           Field("fp_start_ns", "i"), Field("bp_end_ns", "i"), Field("fp_start_op", "s"), Field("bp_end_op", "s"),
           Field("loss", "f")]


class StepsCollector(Collector):
    tables = ("steps",)

    def __init__(self):
        self._ends: list[tuple] = []  # (end event, begin_ns, sink) per recorded step, converted at the flush
        self._begin: dict = {}
        self._sink_step = None
        self.last_end_step = None

    # the Profiler calls these for the step events it records (it also uses them to count steps)
    def on_begin(self, ev: dict) -> None:
        self._begin[ev.get("step")] = ev.get("t_ns")

    def on_end(self, ev: dict) -> None:
        step = ev.get("step")
        self.last_end_step = step
        begin = self._begin.pop(step, None)
        if begin is None:
            return
        sink = ev.get("sink")
        if sink is None:
            sink = self._sink_step is not None and self._sink_step == step
        self._ends.append((ev, begin, sink))

    def on_task(self, ev: dict) -> None:
        if ev.get("kind") == "get_next":
            self._sink_step = ev.get("step")

    def handlers(self):
        return {"task": self.on_task}

    def drain(self, t0, final=False):
        rows = take_all(self._ends)
        if not rows:
            return {}
        evs = [r[0] for r in rows]
        cols = event_columns(evs, _FIELDS)
        cols["begin_ns"] = int_column([r[1] for r in rows])
        cols["end_ns"] = int_column([e.get("end_ns", e.get("t_ns")) for e in evs])
        cols["sink"] = [bool(r[2]) for r in rows]
        return {"steps": to_arrow("steps", cols, t0)}
