"""PYNATIVE mode: the ``host_ops`` table, one row per eagerly dispatched op (``op`` events)."""
from __future__ import annotations

from collectors.base import Collector, as_int, as_str
from collectors.buffers import ColumnBuffer, to_arrow


class HostOpsCollector(Collector):
    tables = ("host_ops",)

    def __init__(self):
        self._rows = ColumnBuffer("host_ops", capacity=4096)

    def handlers(self):
        return {"op": self.on_op}

    def on_op(self, ev: dict) -> None:
        g = ev.get
        self._rows.append((as_str(g("op")), as_str(g("name")), as_str(g("scope")), as_int(g("start_ns")),
                           as_int(g("end_ns"))))

    def drain(self, t0, final=False):
        cols = self._rows.drain()
        return {"host_ops": to_arrow("host_ops", cols, t0)} if cols else {}
