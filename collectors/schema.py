"""The explicit Arrow schemas of every table of a run (docs/trace-format.md, schema version 1).

Every part file, flushed or merged, is written with exactly these schemas, so the dtypes on disk
never depend on what the first batch of values happened to look like.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

_S, _I8, _I32, _I64, _F64, _B = pa.string(), pa.int8(), pa.int32(), pa.int64(), pa.float64(), pa.bool_()


def _schema(*cols) -> pa.Schema:
    return pa.schema([pa.field(name, typ) for name, typ in cols])


SCHEMAS: dict[str, pa.Schema] = {
    "tasks": _schema(("step", _I32), ("graph", _S), ("task_id", _I32), ("name", _S), ("op", _S), ("kind", _S),
                     ("stream", _S), ("stream_id", _I8), ("scope", _S), ("phase", _S), ("start_ns", _I64),
                     ("end_ns", _I64), ("dur_ns", _I64), ("flops", _I64), ("bytes", _I64), ("shape", _S),
                     ("dtype", _S), ("fused_ops", _S)),
    "steps": _schema(("step", _I32), ("epoch", _I32), ("begin_ns", _I64), ("get_next_start_ns", _I64),
                     ("get_next_end_ns", _I64), ("fp_start_ns", _I64), ("bp_end_ns", _I64), ("end_ns", _I64),
                     ("fp_start_op", _S), ("bp_end_op", _S), ("loss", _F64), ("sink", _B)),
    "memory": _schema(("t_ns", _I64), ("action", _S), ("device", _S), ("kind", _S), ("tensor", _S), ("op", _S),
                      ("scope", _S), ("size", _I64), ("offset", _I64), ("in_use", _I64), ("capacity", _I64),
                      ("step", _I32), ("shape", _S), ("dtype", _S), ("source", _S)),
    "device_queue": _schema(("t_ns", _I64), ("action", _S), ("depth", _I32), ("capacity", _I32),
                            ("wait_ns", _I64), ("step", _I32)),
    "dataset_pipeline": _schema(("pipeline_id", _I32), ("op_id", _I32), ("op_type", _S), ("parent_id", _I32),
                                ("num_workers", _I32), ("queue_capacity", _I32)),
    "dataset_ops": _schema(("pipeline_id", _I32), ("op_id", _I32), ("op_type", _S), ("t_ns", _I64),
                           ("rows", _I64), ("batches", _I64), ("busy_ns", _I64), ("wait_in_ns", _I64),
                           ("wait_out_ns", _I64), ("num_workers", _I32)),
    "dataset_queues": _schema(("pipeline_id", _I32), ("op_id", _I32), ("t_ns", _I64), ("depth", _I32),
                              ("capacity", _I32)),
    "graphs": _schema(("graph", _S), ("nodes", _I32), ("compile_start_ns", _I64), ("compile_end_ns", _I64),
                      ("dump", _S), ("planned_peak", _I64), ("parameter_bytes", _I64)),
    "host_ops": _schema(("op", _S), ("name", _S), ("scope", _S), ("start_ns", _I64), ("end_ns", _I64)),
}

# columns holding absolute perf_counter_ns readings, shifted to the run start when written
# (durations such as dur_ns, wait_ns, busy_ns are not shifted); -1 (missing) stays -1
TIME_COLUMNS: dict[str, tuple[str, ...]] = {
    "tasks": ("start_ns", "end_ns"),
    "steps": ("begin_ns", "get_next_start_ns", "get_next_end_ns", "fp_start_ns", "bp_end_ns", "end_ns"),
    "memory": ("t_ns",),
    "device_queue": ("t_ns",),
    "dataset_ops": ("t_ns",),
    "dataset_queues": ("t_ns",),
    "graphs": ("compile_start_ns", "compile_end_ns"),
    "host_ops": ("start_ns", "end_ns"),
}
