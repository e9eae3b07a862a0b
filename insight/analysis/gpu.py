"""GPU-trace analyses (the TensorBoard profiler plugin's overview and kernel views, HTA's idle time), for runs
imported from torch.profiler / Kineto traces (``insight import``) -- and any run whose tasks carry the kinds
they use.

``gpu_step_breakdown``: each step is tiled by priority **Kernel > Memcpy > Memset > Communication > Runtime >
DataLoader > CPU Exec > Other**: every instant of the step goes to the highest-priority category active then
(the union of that category's task intervals), the rest is Other. Computed exactly on integer nanoseconds by
cutting the time axis at every interval end and step bound, so the categories sum to the step time exactly.

* Kernel: ``kernel`` tasks on device streams, except communication kernels (NCCL);
* Memcpy / Memset: ``memcpy_*`` / ``memset`` tasks;
* Communication: NCCL kernels and host ``nccl:`` / ``gloo:`` / ``c10d::`` ops;
* Runtime: ``runtime`` tasks (cudaLaunchKernel, cudaMemcpyAsync, ...);
* DataLoader: ``enumerate(DataLoader)#...__next__`` and ``enumerate(DataPipe)#...`` ranges;
* CPU Exec: the other host ops (``cpu_op``, ``python``, ``annotation``, host kernels);
* Other: the rest of the step.

A step is ``[begin_ns, end_ns]`` of the steps table (for imported runs the plugin's definition: from
max(host start, previous step end) to max(host end, end of the last device task launched in the step)).

Also: ``gpu_summary`` (averages and GPU utilisation = kernel busy time / step time), ``kernel_time_by_stream``,
``top_kernels``, ``top_cpu_ops`` (calls, total and self host time) and ``idle_time_by_stream`` (HTA: each gap
between consecutive kernels of a stream is *host wait* when the next kernel was launched only after the gap
began, *kernel wait* when it was launched earlier and the gap is at most ``KERNEL_WAIT_NS``, else *other*).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from insight.analysis._io import NS_PER_MS, as_run, read, task_columns
from insight.trace import Run

CATEGORIES = ("kernel", "memcpy", "memset", "communication", "runtime", "dataloader", "cpu_exec", "other")
LABELS = {"kernel": "Kernel", "memcpy": "Memcpy", "memset": "Memset", "communication": "Communication",
          "runtime": "Runtime", "dataloader": "DataLoader", "cpu_exec": "CPU Exec", "other": "Other"}
HOST_KINDS = ("cpu_op", "python", "annotation", "overhead")
COMM_HOST = ("nccl:", "gloo:", "c10d::")
DATALOADER = ("enumerate(DataLoader)#", "enumerate(DataPipe)#")
KERNEL_WAIT_NS = 30_000  # HTA's threshold between a launch overhead gap and an unexplained one
COLUMNS = dict(task_columns("step", "name", "op", "kind", "stream", "start_ns", "end_ns"), launch_task=-1)
STEP_COLUMNS = {"step": -1, "begin_ns": -1, "fp_start_ns": -1, "end_ns": -1}


def _is_host(stream: pd.Series) -> np.ndarray:
    s = stream.astype(str)
    return ((s == "host") | s.str.startswith("host.") | s.str.startswith("host/")).to_numpy()


def _tasks(run: Run, rank: int) -> pd.DataFrame:
    t = read(run, "tasks", COLUMNS, required=("start_ns", "end_ns"), rank=rank)
    return t[(t["start_ns"] >= 0) & (t["end_ns"] >= t["start_ns"])].reset_index(drop=True)


def _categories(t: pd.DataFrame) -> np.ndarray:
    """The category index (into CATEGORIES) of each task, -1 for tasks no category takes (waits)."""
    kind = t["kind"].astype(str)
    name = t["name"].astype(str)
    host = _is_host(t["stream"])
    comm_k = (kind == "kernel") & (name.str.contains("nccl", case=False) | (t["stream"] == "comm")).to_numpy()
    out = np.full(len(t), -1, np.int64)
    dl = name.str.startswith(DATALOADER).to_numpy() & (name.str.endswith(".__next__")
                                                       | name.str.startswith("enumerate(DataPipe)#")).to_numpy()
    comm_h = host & name.str.startswith(COMM_HOST).to_numpy()
    rules = [  # later rules do not overwrite earlier ones
        ("kernel", (kind == "kernel").to_numpy() & ~host & ~comm_k),
        ("memcpy", kind.str.startswith("memcpy").to_numpy()),
        ("memset", (kind == "memset").to_numpy()),
        ("communication", comm_k | comm_h),
        ("runtime", (kind == "runtime").to_numpy()),
        ("dataloader", dl & host),
        ("cpu_exec", host & (kind.isin(HOST_KINDS).to_numpy() | (kind == "kernel").to_numpy())),
    ]
    for cat, mask in rules:
        out[(out < 0) & mask] = CATEGORIES.index(cat)
    return out


def merged_intervals(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The union of ``[start, end)`` intervals (any order) as sorted disjoint (starts, ends)."""
    if not len(start):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    o = np.argsort(start, kind="stable")
    s, e = start[o], end[o]
    reach = np.maximum.accumulate(e)
    new = np.ones(len(s), bool)
    new[1:] = s[1:] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.r_[first[1:] - 1, len(s) - 1]
    return s[first], reach[last]


def _step_ranges(run: Run, rank: int) -> pd.DataFrame:
    st = read(run, "steps", STEP_COLUMNS, required=("step", "end_ns"), rank=rank)
    st = st[st["end_ns"] >= 0].sort_values(["end_ns", "step"], kind="stable").reset_index(drop=True)
    begin = st["begin_ns"].where(st["begin_ns"] >= 0, st["fp_start_ns"])
    prev = st["end_ns"].shift(1)
    # a step that does not say where it begins starts where the previous one ended
    begin = begin.where(begin >= 0, prev).fillna(st["end_ns"]).astype(np.int64)
    begin = np.minimum(begin, st["end_ns"])
    return pd.DataFrame({"step": st["step"].astype(np.int64), "start_ns": begin.astype(np.int64),
                         "end_ns": st["end_ns"].astype(np.int64)})


def tile(steps: pd.DataFrame, cat: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """``(steps, len(CATEGORIES))`` nanoseconds: each step's time given to the highest-priority category active
    at each instant; rows sum to ``end_ns - start_ns`` exactly."""
    s_start, s_end = steps["start_ns"].to_numpy(np.int64), steps["end_ns"].to_numpy(np.int64)
    out = np.zeros((len(steps), len(CATEGORIES)), np.int64)
    if not len(steps):
        return out
    merged = [merged_intervals(start[cat == c], end[cat == c]) for c in range(len(CATEGORIES) - 1)]
    pts = np.unique(np.concatenate([s_start, s_end] + [a for m in merged for a in m]))
    seg0, seg1 = pts[:-1], pts[1:]
    if not len(seg0):
        return out
    winner = np.full(len(seg0), len(CATEGORIES) - 1, np.int64)  # Other
    for c in range(len(CATEGORIES) - 2, -1, -1):  # lowest priority first, so higher ones overwrite
        ms, me = merged[c]
        if not len(ms):
            continue
        k = np.searchsorted(ms, seg0, side="right") - 1
        covered = (k >= 0) & (me[np.clip(k, 0, None)] > seg0)
        winner[covered] = c
    length = seg1 - seg0
    order = np.argsort(s_start, kind="stable")
    k = np.searchsorted(s_start[order], seg0, side="right") - 1
    ok = k >= 0
    step_idx = order[np.clip(k, 0, None)]
    ok &= seg1 <= s_end[step_idx]
    np.add.at(out, (step_idx[ok], winner[ok]), length[ok])
    return out


def gpu_step_breakdown(run: Run | str | os.PathLike, rank: int = 0) -> pd.DataFrame:
    """One row per step: ``step, start_ns, end_ns, step_time_ns``, ``<category>_ns`` and ``<category>_ms`` for
    every category of CATEGORIES (summing to ``step_time_ns`` exactly), ``gpu_busy_ns`` (union of device
    kernels in the step) and ``gpu_utilization``."""
    run = as_run(run)
    t = _tasks(run, rank)
    steps = _step_ranges(run, rank)
    cat = _categories(t)
    start, end = t["start_ns"].to_numpy(np.int64), t["end_ns"].to_numpy(np.int64)
    m = tile(steps, cat, start, end)
    out = steps.copy()
    out["step_time_ns"] = out["end_ns"] - out["start_ns"]
    for i, c in enumerate(CATEGORIES):
        out[f"{c}_ns"] = m[:, i]
    kern = (t["kind"] == "kernel").to_numpy() & ~_is_host(t["stream"])
    busy = tile(steps, np.where(kern, 0, -1), start, end)[:, 0]
    out["gpu_busy_ns"] = busy
    for c in CATEGORIES + ("step_time",):
        out[f"{c}_ms"] = out[f"{c}_ns"] / NS_PER_MS
    out["gpu_utilization"] = np.where(out["step_time_ns"] > 0, busy / out["step_time_ns"].clip(lower=1), np.nan)
    return out


@dataclass
class GpuSummary:
    steps: int
    step_time_ms: float
    categories_ms: dict          # category -> average ms per step (sums to step_time_ms)
    gpu_utilization: float       # kernel busy time / step time over all steps
    kernels: int
    kernel_ms: float
    streams: int

    def shares(self) -> dict:
        st = self.step_time_ms
        return {c: (v / st if st > 0 else float("nan")) for c, v in self.categories_ms.items()}


def gpu_summary(run: Run | str | os.PathLike, rank: int = 0, breakdown: pd.DataFrame | None = None) -> GpuSummary:
    """Averages over every step (as the TensorBoard plugin's overview does)."""
    run = as_run(run)
    bd = gpu_step_breakdown(run, rank) if breakdown is None else breakdown
    n = len(bd)
    total = int(bd["step_time_ns"].sum()) if n else 0
    k = kernel_time_by_stream(run, rank)
    return GpuSummary(steps=n, step_time_ms=total / n / NS_PER_MS if n else float("nan"),
                      categories_ms={c: float(bd[f"{c}_ns"].sum()) / n / NS_PER_MS if n else float("nan")
                                     for c in CATEGORIES},
                      gpu_utilization=float(bd["gpu_busy_ns"].sum()) / total if total > 0 else float("nan"),
                      kernels=int(k["kernels"].sum()) if len(k) else 0,
                      kernel_ms=float(k["total_ms"].sum()) if len(k) else 0.0, streams=len(k))


def kernel_time_by_stream(run: Run | str | os.PathLike, rank: int = 0) -> pd.DataFrame:
    """Per device stream: ``kernels``, ``total_ns`` / ``total_ms`` (summed kernel durations), ``busy_ns``
    (their union), ``span_ns`` (first kernel start to last kernel end), ``share`` of all kernel time."""
    t = _tasks(as_run(run), rank)
    k = t[(t["kind"] == "kernel") & ~_is_host(t["stream"])]
    rows = []
    for s, g in k.groupby("stream", sort=True):
        st, en = g["start_ns"].to_numpy(np.int64), g["end_ns"].to_numpy(np.int64)
        ms, me = merged_intervals(st, en)
        rows.append({"stream": s, "kernels": len(g), "total_ns": int((en - st).sum()), "busy_ns": int((me - ms).sum()),
                     "span_ns": int(en.max() - st.min())})
    out = pd.DataFrame(rows, columns=["stream", "kernels", "total_ns", "busy_ns", "span_ns"])
    total = out["total_ns"].sum()
    out["total_ms"] = out["total_ns"] / NS_PER_MS
    out["share"] = out["total_ns"] / total if total > 0 else 0.0
    return out.sort_values("total_ns", ascending=False, kind="stable").reset_index(drop=True)


def _ranked(t: pd.DataFrame, by: str, n: int | None, extra: dict | None = None) -> pd.DataFrame:
    t = t.assign(dur_ns=t["end_ns"] - t["start_ns"], **(extra or {}))
    g = t.groupby(by, sort=False)
    agg = {"calls": g.size(), "total_ns": g["dur_ns"].sum(), "min_ns": g["dur_ns"].min(), "max_ns": g["dur_ns"].max()}
    if extra:
        agg.update({c: g[c].sum() for c in extra})
    out = pd.DataFrame(agg).reset_index()
    total = out["total_ns"].sum()
    for c in ["total", "min", "max"] + [c[:-3] for c in (extra or {})]:
        out[f"{c}_ms"] = out[f"{c}_ns"] / NS_PER_MS
    out["avg_ms"] = out["total_ms"] / out["calls"].clip(lower=1)
    out["share"] = out["total_ns"] / total if total > 0 else 0.0
    out = out.sort_values(["total_ns", by], ascending=[False, True], kind="stable").reset_index(drop=True)
    return out.head(n) if n else out


def top_kernels(run: Run | str | os.PathLike, n: int | None = 20, by: str = "name", rank: int = 0) -> pd.DataFrame:
    """Kernels by total time, grouped by full ``name`` or by ``op`` (the kernel's name class)."""
    t = _tasks(as_run(run), rank)
    return _ranked(t[(t["kind"] == "kernel") & ~_is_host(t["stream"])], by, n)


def self_times(start: np.ndarray, end: np.ndarray, lane: np.ndarray) -> np.ndarray:
    """Each slice's duration minus the time of its direct children (slices nested in it on the same lane)."""
    n = len(start)
    out = (end - start).astype(np.int64)
    order = np.lexsort((-(end - start), start, lane))
    stack: list = []
    prev_lane = None
    for i in order:
        ln = lane[i]
        if ln != prev_lane:
            stack, prev_lane = [], ln
        while stack and end[stack[-1]] <= start[i] and not (end[stack[-1]] == start[i] == end[i]):
            stack.pop()
        if stack and end[i] <= end[stack[-1]]:
            out[stack[-1]] -= end[i] - start[i]
        stack.append(i)
    return out if n else out


def top_cpu_ops(run: Run | str | os.PathLike, n: int | None = 20, rank: int = 0) -> pd.DataFrame:
    """Host ops (``cpu_op``) by total (inclusive) time, with ``self_ms``: time not spent in nested host ops."""
    t = _tasks(as_run(run), rank)
    host = t[_is_host(t["stream"]) & t["kind"].isin(("cpu_op", "python", "annotation"))].reset_index(drop=True)
    lane = pd.factorize(host["stream"])[0]
    selft = self_times(host["start_ns"].to_numpy(np.int64), host["end_ns"].to_numpy(np.int64), lane)
    ops = host["kind"] == "cpu_op"
    return _ranked(host[ops].reset_index(drop=True), "name", n, {"self_ns": selft[ops.to_numpy()]})


def idle_time_by_stream(run: Run | str | os.PathLike, rank: int = 0,
                        kernel_wait_ns: int = KERNEL_WAIT_NS) -> pd.DataFrame:
    """Per device stream, within the steps: ``idle_ns`` between consecutive kernels split into ``host_wait_ns``
    (the next kernel was launched after the previous one had ended), ``kernel_wait_ns`` (launched before, gap
    at most ``kernel_wait_ns``) and ``other_ns``; and their shares of the stream's idle time."""
    run = as_run(run)
    t = _tasks(run, rank)
    steps = _step_ranges(run, rank)
    k = t[(t["kind"] == "kernel") & ~_is_host(t["stream"])].copy()
    launch = k["launch_task"].to_numpy(np.int64)
    k["launch_ns"] = np.where(launch >= 0, t["start_ns"].reindex(np.clip(launch, 0, None)).to_numpy(), -1) \
        if len(t) else -1
    rows = []
    s_start, s_end = steps["start_ns"].to_numpy(np.int64), steps["end_ns"].to_numpy(np.int64)
    for s, g in k.sort_values("start_ns", kind="stable").groupby("stream", sort=True):
        st, en, ln = (g[c].to_numpy(np.int64) for c in ("start_ns", "end_ns", "launch_ns"))
        reach = np.maximum.accumulate(en)
        gap0, gap1, nxt_launch = reach[:-1], st[1:], ln[1:]
        gap = gap1 - gap0
        j = np.searchsorted(s_start, gap0, side="right") - 1
        in_step = (j >= 0) & (gap1 <= s_end[np.clip(j, 0, None)]) & (gap > 0)
        host_wait = in_step & (nxt_launch >= gap0)
        kern_wait = in_step & ~host_wait & (nxt_launch >= 0) & (gap <= kernel_wait_ns)
        other = in_step & ~host_wait & ~kern_wait
        idle = int(gap[in_step].sum())
        rows.append({"stream": s, "idle_ns": idle, "host_wait_ns": int(gap[host_wait].sum()),
                     "kernel_wait_ns": int(gap[kern_wait].sum()), "other_ns": int(gap[other].sum())})
    out = pd.DataFrame(rows, columns=["stream", "idle_ns", "host_wait_ns", "kernel_wait_ns", "other_ns"])
    for c in ("idle", "host_wait", "kernel_wait", "other"):
        out[f"{c}_ms"] = out[f"{c}_ns"] / NS_PER_MS
    for c in ("host_wait", "kernel_wait", "other"):
        out[f"{c}_share"] = np.where(out["idle_ns"] > 0, out[f"{c}_ns"] / out["idle_ns"].clip(lower=1), np.nan)
    return out


def report_lines(run: Run | str | os.PathLike, rank: int = 0, top: int = 10) -> list[str]:
    """The GPU section of ``insight report`` for an imported GPU/host trace (plain text lines)."""
    run = as_run(run)
    bd = gpu_step_breakdown(run, rank)
    s = gpu_summary(run, rank, breakdown=bd)
    if not s.steps:
        return ["Step breakdown (TensorBoard categories): no steps"]
    L = [f"Step breakdown (TensorBoard categories), average over {s.steps} steps: {s.step_time_ms:.3f} ms; "
         f"GPU utilisation {s.gpu_utilization * 100:.1f}%" if s.gpu_utilization == s.gpu_utilization else
         f"Step breakdown (TensorBoard categories), average over {s.steps} steps: {s.step_time_ms:.3f} ms"]
    shares = s.shares()
    for c in CATEGORIES:
        L.append(f"  {LABELS[c]:<14} {s.categories_ms[c]:10.3f} ms  ({shares[c] * 100:5.1f}%)")
    ks = kernel_time_by_stream(run, rank)
    if len(ks):
        L.append("Kernel time by stream")
        for r in ks.itertuples():
            L.append(f"  {r.stream:<20} {r.kernels:6d} kernels  {r.total_ms:10.3f} ms  ({r.share * 100:5.1f}%)")
        L.append(f"Top kernels (of {s.kernels})")
        for r in top_kernels(run, top, by="op", rank=rank).itertuples():
            L.append(f"  {str(r.op)[:48]:<48} {r.calls:6d} calls  {r.total_ms:10.3f} ms  ({r.share * 100:5.1f}%)")
        idle = idle_time_by_stream(run, rank)
        if len(idle):
            L.append("Idle time by stream (HTA): host wait / kernel wait / other")
            for r in idle.itertuples():
                L.append(f"  {r.stream:<20} {r.idle_ms:10.3f} ms idle: {r.host_wait_ms:.3f} / {r.kernel_wait_ms:.3f} / "
                         f"{r.other_ms:.3f} ms")
    cpu = top_cpu_ops(run, top, rank=rank)
    if len(cpu):
        L.append("Top CPU ops (total / self)")
        for r in cpu.itertuples():
            L.append(f"  {str(r.name)[:48]:<48} {r.calls:6d} calls  {r.total_ms:10.3f} / {r.self_ms:.3f} ms")
    return L
