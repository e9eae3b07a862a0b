"""MindData: the dataset pipeline's structure and statistics, and the sink mode's device queue.

Tables ``dataset_pipeline`` (one row per op, from the ``dataset_pipeline`` event at iterator start),
``dataset_ops`` (the per-op report of each ``dataset_op`` event), ``dataset_queues`` (``queue_sample``
events, about every 10 ms) and ``device_queue`` (every push / pop of the host->device queue).
"""
from __future__ import annotations

from collectors.base import Collector, as_int, as_str
from collectors.buffers import ColumnBuffer, EventBuffer, Field, to_arrow

_QUEUE_FIELDS = [Field("pipeline_id", "i"), Field("op_id", "i"), Field("t_ns", "i"), Field("depth", "i"),
                 Field("capacity", "i")]
_DEVICE_QUEUE_FIELDS = [Field("t_ns", "i"), Field("action", "s"), Field("depth", "i"), Field("capacity", "i"),
                        Field("wait_ns", "i", 0), Field("step", "i")]


class MindDataCollector(Collector):
    tables = ("dataset_pipeline", "dataset_ops", "dataset_queues", "device_queue")

    def __init__(self):
        self._buf = {"dataset_pipeline": ColumnBuffer("dataset_pipeline", capacity=64),
                     "dataset_ops": ColumnBuffer("dataset_ops", capacity=64),
                     "dataset_queues": EventBuffer(_QUEUE_FIELDS), "device_queue": EventBuffer(_DEVICE_QUEUE_FIELDS)}
        # the frequent events (a sample every few ms, a push and a pop per step) are kept as delivered
        self.on_queue_sample = self._buf["dataset_queues"].append
        self.on_device_queue = self._buf["device_queue"].append

    # structure and cumulative reports are kept whatever the schedule; samples only in recorded steps
    def static_handlers(self):
        return {"dataset_pipeline": self.on_pipeline, "dataset_op": self.on_op}

    def handlers(self):
        return {"queue_sample": self.on_queue_sample, "device_queue": self.on_device_queue}

    def on_pipeline(self, ev: dict) -> None:
        pid = as_int(ev.get("pipeline_id"))
        buf = self._buf["dataset_pipeline"]
        for op in ev.get("ops") or ():
            g = op.get
            buf.append((pid, as_int(g("op_id")), as_str(g("op_type")), as_int(g("parent_id")),
                        as_int(g("num_workers")), as_int(g("queue_capacity"))))

    def on_op(self, ev: dict) -> None:
        g = ev.get
        self._buf["dataset_ops"].append((
            as_int(g("pipeline_id")), as_int(g("op_id")), as_str(g("op_type")), as_int(g("t_ns")),
            as_int(g("rows"), 0), as_int(g("batches"), 0), as_int(g("busy_ns"), 0), as_int(g("wait_in_ns"), 0),
            as_int(g("wait_out_ns"), 0), as_int(g("num_workers"))))

    def drain(self, t0, final=False):
        out = {}
        for table, buf in self._buf.items():
            cols = buf.drain()
            if cols:
                out[table] = to_arrow(table, cols, t0)
        return out
