"""The step trace: the ``steps`` table, one row per recorded step from the runtime's ``step`` events.

A step is written only when both its ``begin`` and its ``end`` were seen while recording (a step already
running when profiling started has no traced tasks, so it is left out). Missing markers (PYNATIVE mode)
are -1; ``sink`` is true when the step started with a GetNext task (data sink mode).
"""
from __future__ import annotations

import math

from collectors.base import Collector, as_int, as_str
from collectors.buffers import ColumnBuffer, to_arrow


class StepsCollector(Collector):
    tables = ("steps",)

    def __init__(self):
        self._rows = ColumnBuffer("steps", capacity=256)
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
        g = ev.get
        sink = g("sink")
        if sink is None:
            sink = self._sink_step is not None and self._sink_step == step
        loss = g("loss")
        self._rows.append((
            as_int(step), as_int(g("epoch")), as_int(begin), as_int(g("get_next_start_ns")),
            as_int(g("get_next_end_ns")), as_int(g("fp_start_ns")), as_int(g("bp_end_ns")),
            as_int(g("end_ns", g("t_ns"))), as_str(g("fp_start_op")), as_str(g("bp_end_op")),
            math.nan if loss is None else float(loss), bool(sink)))

    def on_task(self, ev: dict) -> None:
        if ev.get("kind") == "get_next":
            self._sink_step = ev.get("step")

    def handlers(self):
        return {"task": self.on_task}

    def drain(self, t0, final=False):
        cols = self._rows.drain()
        return {"steps": to_arrow("steps", cols, t0)} if cols else {}
