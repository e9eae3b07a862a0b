"""PYNATIVE mode: the ``host_ops`` table, one row per eagerly dispatched op (``op`` events)."""
from __future__ import annotations

from collectors.base import Collector
from collectors.buffers import EventBuffer, Field, to_arrow

_FIELDS = [Field("op", "s"), Field("name", "s"), Field("scope", "s"), Field("start_ns", "i"), Field("end_ns", "i")]


class HostOpsCollector(Collector):
    tables = ("host_ops",)

    def __init__(self):
        self._rows = EventBuffer(_FIELDS)
        self.on_op = self._rows.append  # the hot path (one event per op): keep it, convert it at the flush

    def handlers(self):
        return {"op": self.on_op}

    def drain(self, t0, final=False):
        cols = self._rows.drain()
        return {"host_ops": to_arrow("host_ops", cols, t0)} if cols else {}
