"""Synthetic Insight runs with known numbers, written as docs/trace-format.md says (schema version 1).

``training_run(base, ...)`` writes a single-device training run whose every number follows from its
arguments (all durations in integer microseconds -> exact nanoseconds):

* step ``s`` (``first_step`` .. ``first_step + n_steps - 1``), sequential on ``aicore0``:
  iteration interval (GetNext in sink mode / the ``feed_inputs`` host copy otherwise, ending at
  fp_start) -> forward ops -> backward ops (fp+bp) -> update ops (tail); the optional AllReduce runs on
  the ``comm`` stream from bp_end, overlapping the update (``tail = max(update, allreduce)``);
* the first step's interval is ``first_interval_us`` (it is excluded from averages);
* memory: parameters allocated at t=0, then each step allocates its activations and frees them;
  the peak is in step ``peak_step`` where an extra ``peak_extra`` tensor is alive (these rows are the
  plan's liveness, ``source = "planned"``; without ``pool`` the table has no ``source`` column, as runs
  recorded before it); with ``pool=True`` the MemoryPool's blocks too (``source = "pool"``): the
  parameters at t=0, the activation reserve (``sum(act_bytes) + peak_extra``) at 1 us, the kernel pool
  (``POOL_KERNEL``) at step 1's fp_start, a data-queue batch (``POOL_QUEUE``) from each push to its pop and
  a workspace (``POOL_WORKSPACE``) from fp_start + 5 us to bp_end in every step;
* device queue: one push and one pop per step; pops in ``empty_steps`` waited;
* dataset pipeline ``batch(0) <- map(1) <- numpy_slices(2)`` whose output queues hold the sampled
  ``depths`` given per op.

``Expected`` carries the numbers the analyses must find.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

US = 1000
MB = 1 << 20

FWD = (("conv2d_1", "conv2d", 400, "LeNet/conv1"), ("relu_2", "relu", 100, "LeNet/relu"),
       ("matmul_3", "matmul", 300, "LeNet/fc1"))
BWD = (("matmul_grad_4", "matmul", 500, "Gradients/LeNet/fc1"), ("conv2d_grad_5", "conv2d_grad", 800,
                                                                  "Gradients/LeNet/conv1"))
UPD = (("assign_6", "assign", 100, "Momentum"), ("assign_7", "assign", 100, "Momentum"))
FLOPS = {"conv2d": 2_000_000, "matmul": 500_000, "conv2d_grad": 4_000_000}
POOL_KERNEL, POOL_QUEUE, POOL_WORKSPACE = 1 * MB, MB // 2, MB // 4

PIPE_DEFAULT = (
    {"op_id": 0, "op_type": "batch", "parent_id": -1, "num_workers": 1, "queue_capacity": 16, "depths": [12, 14, 16, 16]},
    {"op_id": 1, "op_type": "map", "parent_id": 0, "num_workers": 2, "queue_capacity": 16, "depths": [14, 16]},
    {"op_id": 2, "op_type": "numpy_slices", "parent_id": 1, "num_workers": 1, "queue_capacity": 16, "depths": [16]},
)


@dataclass
class Expected:
    path: Path
    steps: list
    step_time_ns: list
    interval_ns: list
    fp_bp_ns: int
    tail_ns: int
    allreduce_ns: int
    n_tasks: int
    task_total_ns: int
    peak_bytes: int = 0
    peak_step: int = -1
    peak_tensors: list = field(default_factory=list)
    capacity: int = 0
    pool_peak_bytes: int = 0


def write_table(run_dir: Path, table: str, df: pd.DataFrame | pa.Table, parts: int | None = None, rank: int = 0):
    """``parts=None``: the compacted ``rank_0/<table>.parquet``; else ``parts`` part files (a run still
    recording)."""
    t = df if isinstance(df, pa.Table) else pa.Table.from_pandas(df, preserve_index=False)
    base = run_dir / f"rank_{rank}"
    base.mkdir(parents=True, exist_ok=True)
    if not parts:
        pq.write_table(t, base / f"{table}.parquet")
        return f"rank_{rank}/{table}.parquet"
    d = base / table
    d.mkdir(exist_ok=True)
    bounds = np.linspace(0, t.num_rows, parts + 1).astype(int)
    for k in range(parts):
        pq.write_table(t.slice(bounds[k], bounds[k + 1] - bounds[k]), d / f"part-{k:05d}.parquet")
    return f"rank_{rank}/{table}/"


def write_manifest(run_dir: Path, tables: dict, *, name=None, status="complete", capacity=64 * MB, step_count=0,
                   streams=("aicore0",), created="2025-01-02T03:04:05+00:00", **extra):
    ids = {"aicore0": 0, "aicore1": 1, "aicpu": 2, "comm": 3, "host": 4}
    m = {"schema_version": 1, "run_id": "0123456789abcdef" + run_dir.name.encode().hex()[:16], "name": name or run_dir.name,
         "created": created, "start_perf_ns": 123_456_789_000, "status": status,
         "device": {"target": "Ascend", "capacity_bytes": capacity},
         "streams": [{"stream_id": ids[s], "name": s} for s in streams], "ranks": [0], "step_count": step_count,
         "tables": tables, "options": {"profile_memory": True, "data_process": True},
         "runtime": {"version": "0.1.0", "python": "3.11"}}
    m.update(extra)
    (run_dir / "manifest.json").write_text(json.dumps(m, indent=1))
    return m


def _task(step, graph, task_id, name, op, kind, stream, scope, phase, start, end, flops=0, shape="", dtype="float32",
          fused=""):
    sid = {"aicore0": 0, "aicore1": 1, "aicpu": 2, "comm": 3, "host": 4}[stream]
    return {"step": step, "graph": graph, "task_id": task_id, "name": name, "op": op, "kind": kind, "stream": stream,
            "stream_id": sid, "scope": scope, "phase": phase, "start_ns": start, "end_ns": end, "dur_ns": end - start,
            "flops": flops, "bytes": 4096, "shape": shape, "dtype": dtype, "fused_ops": fused}


def _task_frame(rows):
    df = pd.DataFrame(rows)
    for c, t in (("step", np.int32), ("task_id", np.int32), ("stream_id", np.int8)):
        df[c] = df[c].astype(t)
    return df


def training_run(base, name="synth", *, n_steps=5, first_step=1, interval_us=1000, first_interval_us=5000,
                 fwd=FWD, bwd=BWD, upd=UPD, allreduce_us=0, sink=True, h2d_us=0, capacity=64 * MB,
                 param_bytes=8 * MB, act_bytes=(2 * MB, 3 * MB), peak_step=None, peak_extra=4 * MB,
                 empty_steps=(), pipeline=PIPE_DEFAULT, parts=None, memory=True, extra_tasks=(), pool=False) -> Expected:
    """See the module docstring. ``interval_us`` may be a list (one per step after the first)."""
    run = Path(base) / name
    run.mkdir(parents=True, exist_ok=True)
    intervals = list(interval_us) if isinstance(interval_us, (list, tuple)) else [interval_us] * (n_steps - 1)
    intervals = [first_interval_us] + intervals
    tasks, steps, mem, dq = [], [], [], []
    in_use = param_bytes
    mem.append({"t_ns": 0, "action": "alloc", "device": "device", "kind": "parameter", "tensor": "params", "op": "parameter",
                "scope": "", "size": param_bytes, "offset": 0, "in_use": in_use, "capacity": capacity, "step": -1,
                "shape": "", "dtype": "float32"})
    peak_step = first_step + n_steps // 2 if peak_step is None else peak_step
    t = 2_000 * US  # the first step begins 2 ms into the run
    graph = "train_step"
    fp_bp = sum(d for *_, d, _s in fwd) + sum(d for *_, d, _s in bwd) + h2d_us
    tail = max(sum(d for *_, d, _s in upd), allreduce_us)
    for k in range(n_steps):
        s = first_step + k
        begin = t
        fp_start = begin + intervals[k] * US
        gn_len = intervals[k] * US // 2
        if sink:
            gn = _task(s, graph, -1, "GetNext", "get_next", "get_next", "aicore0", "", "input", fp_start - gn_len, fp_start)
            tasks.append(gn)
            # the feeder's TransferData for this batch, earlier on the host
            tasks.append(_task(-1, "data_sink", -2, "TransferData", "copy_h2d", "memcpy_h2d", "host", "", "input",
                               begin - 300 * US, begin - 200 * US, shape="32x1x8x8"))
            waited = s in empty_steps
            dq.append({"t_ns": begin - 200 * US, "action": "push", "depth": 1, "capacity": 4, "wait_ns": 0, "step": s})
            dq.append({"t_ns": fp_start, "action": "pop", "depth": 0, "capacity": 4,
                       "wait_ns": gn_len if waited else 0, "step": s})
        else:
            tasks.append(_task(s, graph, -1, "feed_inputs", "copy_h2d", "memcpy_h2d", "host", "", "input",
                               fp_start - gn_len, fp_start))
        cur = fp_start
        tid = 0
        for j, (nm, op, d, scope) in enumerate(fwd):
            tasks.append(_task(s, graph, tid, nm, op, "kernel", "aicore0", scope, "forward", cur, cur + d * US,
                               FLOPS.get(op, 0), "32x16x8x8"))
            cur += d * US
            tid += 1
            if j == 0 and h2d_us:
                tasks.append(_task(s, graph, tid, "copy_h2d_emb", "copy_h2d", "memcpy_h2d", "aicore0", "", "input", cur,
                                   cur + h2d_us * US))
                cur += h2d_us * US
                tid += 1
        for nm, op, d, scope in bwd:
            tasks.append(_task(s, graph, tid, nm, op, "kernel", "aicore0", scope, "backward", cur, cur + d * US,
                               FLOPS.get(op, 0), "32x16x8x8"))
            cur += d * US
            tid += 1
        bp_end = cur
        if allreduce_us:
            tasks.append(_task(s, graph, tid, "AllReduce_8", "all_reduce", "kernel", "comm", "", "update", bp_end,
                               bp_end + allreduce_us * US))
            tid += 1
        for nm, op, d, scope in upd:
            tasks.append(_task(s, graph, tid, nm, op, "kernel", "aicore0", scope, "update", cur, cur + d * US))
            cur += d * US
            tid += 1
        end = bp_end + tail * US
        for row in extra_tasks:
            tasks.append(dict(row, step=s, start_ns=fp_start + row["start_ns"], end_ns=fp_start + row["end_ns"],
                              dur_ns=row["end_ns"] - row["start_ns"]))
        steps.append({"step": s, "epoch": 1 + k // 10, "begin_ns": begin, "get_next_start_ns": fp_start - gn_len,
                      "get_next_end_ns": fp_start, "fp_start_ns": fp_start, "bp_end_ns": bp_end, "end_ns": end,
                      "fp_start_op": fwd[0][0], "bp_end_op": bwd[-1][0], "loss": 2.0 / (k + 1), "sink": sink})
        # memory: activations of the step
        live = [("act_a", "conv2d_1", act_bytes[0], "32x16x8x8"), ("act_b", "matmul_3", act_bytes[1], "32x64")]
        if s == peak_step:
            live.append(("big_tensor", "conv2d_grad_5", peak_extra, "32x32x8x8"))
        off = param_bytes
        for j, (tn, op, size, shape) in enumerate(live):
            in_use += size
            mem.append({"t_ns": fp_start + (j + 1) * 10 * US, "action": "alloc", "device": "device", "kind": "activation",
                        "tensor": tn, "op": op, "scope": "LeNet", "size": size, "offset": off, "in_use": in_use,
                        "capacity": capacity, "step": s, "shape": shape, "dtype": "float32"})
            off += size
        for j, (tn, op, size, shape) in enumerate(reversed(live)):
            in_use -= size
            mem.append({"t_ns": bp_end - (len(live) - j) * 10 * US, "action": "free", "device": "device",
                        "kind": "activation", "tensor": tn, "op": op, "scope": "LeNet", "size": size, "offset": -1,
                        "in_use": in_use, "capacity": capacity, "step": s, "shape": shape, "dtype": "float32"})
        t = end  # the next step begins asking for data when this one ends
    pool_rows = _pool_rows(steps, param_bytes, sum(act_bytes) + peak_extra, capacity) if pool else []
    tables = {}
    task_df = _task_frame(tasks)
    tables["tasks"] = write_table(run, "tasks", task_df, parts)
    sdf = pd.DataFrame(steps)
    sdf["step"] = sdf["step"].astype(np.int32)
    sdf["epoch"] = sdf["epoch"].astype(np.int32)
    tables["steps"] = write_table(run, "steps", sdf)
    if memory:
        mdf = pd.DataFrame(mem)
        if pool:
            mdf = pd.concat([mdf.assign(source="planned"), pd.DataFrame(pool_rows)], ignore_index=True)
            mdf = mdf.sort_values("t_ns", kind="stable").reset_index(drop=True)
        mdf["step"] = mdf["step"].astype(np.int32)
        tables["memory"] = write_table(run, "memory", mdf)
    if sink:
        qdf = pd.DataFrame(dq)
        for c in ("depth", "capacity", "step"):
            qdf[c] = qdf[c].astype(np.int32)
        tables["device_queue"] = write_table(run, "device_queue", qdf)
    if pipeline:
        tables.update(write_pipeline(run, pipeline, t0=2_000 * US))
    streams = sorted(set(task_df["stream"]), key=["aicore0", "aicore1", "aicpu", "comm", "host"].index)
    write_manifest(run, tables, capacity=capacity, step_count=n_steps, streams=streams)
    sync = task_df["kind"].isin(["event_record", "event_wait"])
    peak_bytes = param_bytes + sum(act_bytes) + peak_extra
    return Expected(
        path=run, steps=[r["step"] for r in steps],
        step_time_ns=[r["end_ns"] - (steps[i - 1]["end_ns"] if i else r["begin_ns"]) for i, r in enumerate(steps)],
        interval_ns=[i * US for i in intervals], fp_bp_ns=fp_bp * US, tail_ns=tail * US, allreduce_ns=allreduce_us * US,
        n_tasks=len(task_df), task_total_ns=int(task_df.loc[~sync, "dur_ns"].sum()), peak_bytes=peak_bytes,
        peak_step=peak_step, peak_tensors=["params", "act_a", "act_b", "big_tensor"], capacity=capacity,
        pool_peak_bytes=(param_bytes + sum(act_bytes) + peak_extra + POOL_KERNEL + POOL_QUEUE) if pool else 0)


def _pool_rows(steps, param_bytes, reserve, capacity) -> list[dict]:
    """The MemoryPool's blocks of a synthetic run (see the module docstring), ``in_use`` the running sum."""
    ev = [(0, "alloc", "parameter", "params", param_bytes), (1 * US, "alloc", "activation_reserve",
                                                             "train_step.activations", reserve)]
    for k, r in enumerate(steps):
        if k == 0:
            ev.append((r["fp_start_ns"], "alloc", "kernel_pool", "fused.buffers", POOL_KERNEL))
        ev.append((r["begin_ns"] - 200 * US, "alloc", "queue", f"batch_{r['step']}", POOL_QUEUE))
        ev.append((r["fp_start_ns"], "free", "queue", f"batch_{r['step']}", POOL_QUEUE))
        ev.append((r["fp_start_ns"] + 5 * US, "alloc", "workspace", f"ws_{r['step']}", POOL_WORKSPACE))
        ev.append((r["bp_end_ns"], "free", "workspace", f"ws_{r['step']}", POOL_WORKSPACE))
    ev.sort(key=lambda e: (e[0], e[1] == "alloc"))  # a free before an alloc at the same instant
    rows, in_use = [], 0
    for t, action, kind, name, size in ev:
        in_use += size if action == "alloc" else -size
        rows.append({"t_ns": t, "action": action, "device": "device", "kind": kind, "tensor": name, "op": "",
                     "scope": "", "size": size, "offset": -1, "in_use": in_use, "capacity": capacity, "step": -1,
                     "shape": "", "dtype": "", "source": "pool"})
    return rows


def write_pipeline(run: Path, ops, t0: int = 0, n_samples: int = 100, pipeline_ids=(0,)) -> dict:
    """The ``dataset_*`` tables for ``ops`` (dicts with op_id, op_type, parent_id, num_workers, queue_capacity
    and ``depths``: the sampled output-queue depths, cycled over ``n_samples`` samples)."""
    prows, qrows, srows = [], [], []
    for pid in pipeline_ids:
        for o in ops:
            prows.append({"pipeline_id": pid, "op_id": o["op_id"], "op_type": o["op_type"], "parent_id": o["parent_id"],
                          "num_workers": o["num_workers"], "queue_capacity": o["queue_capacity"]})
            d = o["depths"]
            for i in range(n_samples):
                qrows.append({"pipeline_id": pid, "op_id": o["op_id"], "t_ns": t0 + i * 10_000 * US,
                              "depth": d[i % len(d)], "capacity": o["queue_capacity"]})
            for rep in (1, 2):  # two cumulative reports: the last one is the total
                srows.append({"pipeline_id": pid, "op_id": o["op_id"], "op_type": o["op_type"], "t_ns": t0 + rep * US,
                              "rows": 100 * rep, "batches": 3 * rep, "busy_ns": 1_000_000 * rep,
                              "wait_in_ns": 10 * rep, "wait_out_ns": 20 * rep, "num_workers": o["num_workers"]})
    out = {}
    for table, rows, ints in (("dataset_pipeline", prows, ("pipeline_id", "op_id", "parent_id", "num_workers", "queue_capacity")),
                              ("dataset_queues", qrows, ("pipeline_id", "op_id", "depth", "capacity")),
                              ("dataset_ops", srows, ("pipeline_id", "op_id", "num_workers"))):
        df = pd.DataFrame(rows)
        for c in ints:
            df[c] = df[c].astype(np.int32)
        out[table] = write_table(run, table, df)
    return out


def input_share_run(base, name, share, work_us=2000, **kw) -> Expected:
    """A run whose steps after the first spend ``share`` of the step in the iteration interval."""
    fwd = (("conv2d_1", "conv2d", work_us // 2, "LeNet/conv1"),)
    bwd = (("conv2d_grad_2", "conv2d_grad", work_us // 2, "Gradients/LeNet/conv1"),)
    interval = int(round(share / (1 - share) * work_us))
    return training_run(base, name, fwd=fwd, bwd=bwd, upd=(), interval_us=interval, **kw)


def big_run(base, name="big", n_tasks=1_000_000, tasks_per_step=1000, parts=5) -> Path:
    """A run of ``n_tasks`` kernel tasks on two streams in ``parts`` part files (a run still recording),
    built column-wise so a million rows take about a second. Some names carry quotes, backslashes and
    control characters."""
    run = Path(base) / name
    run.mkdir(parents=True, exist_ok=True)
    i = np.arange(n_tasks, dtype=np.int64)
    step = (i // tasks_per_step).astype(np.int32)
    k = (i % tasks_per_step).astype(np.int32)
    start = 1_000_000 + step.astype(np.int64) * (tasks_per_step * 2_000 + 50_000) + k.astype(np.int64) * 2_000
    end = start + 1_500
    names = np.array([f"op_{j}" for j in range(tasks_per_step)], dtype=object)
    names[1] = 'weird "quoted" \\ name\x01\n\t'
    names[2] = "ünïcode_ß_😀"
    ops = ["conv2d", "matmul", "relu", "add"]
    def const(v):
        return pa.DictionaryArray.from_arrays(np.zeros(n_tasks, np.int8), pa.array([v])).cast(pa.string())

    def pick(values, idx):
        return pa.DictionaryArray.from_arrays(pa.array(idx.astype(np.int32)), pa.array(list(values))).cast(pa.string())

    side = (k % 10 == 9)
    tasks = pa.table({
        "step": step, "graph": const("train_step"), "task_id": k, "name": pick(names, k), "op": pick(ops, k % 4),
        "kind": const("kernel"), "stream": pick(["aicore0", "aicore1"], side.astype(np.int32)),
        "stream_id": side.astype(np.int8), "scope": const("Net/block"),
        "phase": pick(["forward", "backward"], (k >= tasks_per_step // 2).astype(np.int32)), "start_ns": start,
        "end_ns": end, "dur_ns": end - start, "flops": np.full(n_tasks, 1000, np.int64),
        "bytes": np.full(n_tasks, 64, np.int64), "shape": const("32x16"), "dtype": const("float32"), "fused_ops": const(""),
    })
    tables = {"tasks": write_table(run, "tasks", tasks, parts)}
    n_steps = int(step.max()) + 1
    s = np.arange(n_steps)
    first = 1_000_000 + s * (tasks_per_step * 2_000 + 50_000)
    steps = pd.DataFrame({"step": s.astype(np.int32), "epoch": np.ones(n_steps, np.int32), "begin_ns": first - 40_000,
                          "get_next_start_ns": first - 20_000, "get_next_end_ns": first - 10_000, "fp_start_ns": first,
                          "bp_end_ns": first + tasks_per_step * 2_000 - 500, "end_ns": first + tasks_per_step * 2_000 - 500,
                          "fp_start_op": "op_0", "bp_end_op": f"op_{tasks_per_step - 1}", "loss": 1.0, "sink": False})
    tables["steps"] = write_table(run, "steps", steps)
    write_manifest(run, tables, status="running", step_count=n_steps, streams=("aicore0", "aicore1"))
    return run


# -- damaging runs ------------------------------------------------------------------------------------
def truncate(path: Path, keep: float = 0.5) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])


def set_manifest(run: Path, **fields) -> None:
    p = Path(run) / "manifest.json"
    m = json.loads(p.read_text())
    m.update(fields)
    p.write_text(json.dumps(m))
