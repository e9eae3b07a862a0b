"""Pass 2 of an import: the columns of one trace file -> the tables of one rank (docs/import.md).

Everything here is vectorised over numpy arrays (per lane, never per event), so a trace of millions of
events maps in seconds. Three flavours share the code:

* ``kineto`` -- torch.profiler / Kineto: GPU lanes from device pids, host threads, ``ProfilerStep#N`` steps
  (with the TensorBoard plugin's device-side step ends), kernel <-> launch links by correlation id, phases
  from autograd / optimizer / DataLoader ranges, memory from ``[memory]`` events;
* ``insight`` -- a trace written by our own exporter (``insight export --format chrome``): tasks, steps and
  PyNative host ops come back as they were;
* ``chrome`` -- any other trace-event JSON: one lane per (process, thread), one task per slice, and one step
  spanning the trace.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from insight.analysis.gpu import merged_intervals
from insight.importer.events import EventColumns, _text

NONE = -1
# Kineto categories (lower-cased; older traces say Operator / Runtime / Kernel / Memcpy / Memset)
HOST_KINDS = {"cpu_op": "cpu_op", "operator": "cpu_op", "user_annotation": "annotation",
              "python_function": "python", "cuda_runtime": "runtime", "cuda_driver": "runtime", "runtime": "runtime",
              "driver": "runtime", "overhead": "overhead"}
DEVICE_KINDS = {"kernel": "kernel", "gpu_memcpy": "memcpy", "memcpy": "memcpy", "gpu_memset": "memset",
                "memset": "memset", "cuda_sync": "event_wait", "gpu_user_annotation": "gpu_annotation"}
SKIP_CATS = {"trace"}  # Kineto's "PyTorch Profiler (0)" span: the profiling window, not work
KINETO_HEADER = ("schemaVersion", "deviceProperties", "distributedInfo", "baseTimeNanoseconds")
STEP_RE = re.compile(r"^ProfilerStep#(\d+)$")
DATALOADER = ("enumerate(DataLoader)#", "enumerate(DataPipe)#")
OPTIMIZER = ("Optimizer.step#", "Optimizer.zero_grad#")
BACKWARD = ("autograd::engine::evaluate_function",)
COMM_CPU = ("nccl:", "gloo:", "c10d::", "record_param_comms")
MEMCPY_KINDS = {"htod": "memcpy_h2d", "dtoh": "memcpy_d2h", "dtod": "memcpy_d2d", "htoh": "memcpy_h2h",
                "ptop": "memcpy_p2p"}


@dataclass
class Codes:
    """A string column as codes into ``values`` (written as a dictionary column, never as Python strings)."""
    codes: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.codes)


@dataclass
class RankTables:
    flavor: str
    rank: int
    zero_abs_ns: int                  # absolute time (trace clock, ns) of this rank's time zero
    tables: dict                      # table -> {column: ndarray} (string columns as object arrays)
    streams: list                     # [{"stream_id", "name", "kind", "label"}]
    device: dict                      # {"target", "capacity_bytes", ...}
    counts: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    header: dict = field(default_factory=dict)


# -- helpers -------------------------------------------------------------------------------------------
def kernel_class(name: str) -> str:
    """A kernel's name without return type, namespaces, template arguments and parameters:
    ``void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, ...>(int, ...)``
    -> ``vectorized_elementwise_kernel``; plain names (``ampere_sgemm_128x64_nn``) stay as they are."""
    s = name.strip()
    out, depth = [], 0
    for ch in s:  # drop everything inside <...> and (...)
        if ch in "<(":
            depth += 1
        elif ch in ">)":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    s = "".join(out).strip()
    s = s.split()[-1] if s.split() else name  # drop a return type ("void ")
    s = s.rsplit("::", 1)[-1]
    return s or name


def unique_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(codes, return_inverse=True)`` for interned string codes (small non-negative integers) in
    linear time: a bincount instead of a sort of millions of rows."""
    if not len(codes):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    uniq = np.flatnonzero(np.bincount(codes))
    remap = np.zeros(int(uniq[-1]) + 1, np.int64)
    remap[uniq] = np.arange(len(uniq))
    return uniq, remap[codes]


def _starts(values: np.ndarray, prefixes) -> np.ndarray:
    return np.array([isinstance(v, str) and v.startswith(tuple(prefixes)) for v in values], bool)


def inside(lane: np.ndarray, start: np.ndarray, end: np.ndarray, r_lane, r_start, r_end) -> np.ndarray:
    """For each slice: does one of the ranges on its lane contain it?"""
    out = np.zeros(len(lane), bool)
    for ln in np.unique(r_lane):
        sel = r_lane == ln
        ms, me = merged_intervals(r_start[sel], r_end[sel])
        rows = np.flatnonzero(lane == ln)
        if not len(rows):
            continue
        k = np.searchsorted(ms, start[rows], side="right") - 1
        kk = np.clip(k, 0, None)
        out[rows] = (k >= 0) & (end[rows] <= me[kk])
    return out


def bind_many(lane_sorted: dict, lanes: np.ndarray, ts: np.ndarray, enclosing: np.ndarray) -> np.ndarray:
    """The slice each flow end (or instant event) binds to on its lane at its time: one starting exactly then
    (the innermost), else -- ``enclosing`` -- the innermost slice open then, or -- not ``enclosing`` (an ``f``
    without ``"bp": "e"``) -- the next one to start. Vectorised per lane; -1 when there is none."""
    out = np.full(len(ts), NONE, np.int64)
    for ln in np.unique(lanes):
        ent = lane_sorted.get(int(ln))
        if ent is None:
            continue
        starts, ends, rows = ent
        sel = np.flatnonzero(lanes == ln)
        t = ts[sel]
        k = np.searchsorted(starts, t, side="right") - 1
        kk = np.clip(k, 0, None)
        exact = (k >= 0) & (starts[kk] == t)
        res = np.where(exact, rows[kk], NONE)
        nxt = ~exact & ~enclosing[sel]
        res[nxt] = np.where(k[nxt] + 1 < len(rows), rows[np.clip(k[nxt] + 1, 0, len(rows) - 1)], NONE)
        todo = np.flatnonzero(~exact & enclosing[sel] & (k >= 0))
        j = k[todo]
        for _ in range(64):  # walk back to the innermost slice still open at t
            if not len(todo):
                break
            hit = ends[j] >= t[todo]
            res[todo[hit]] = rows[j[hit]]
            todo, j = todo[~hit], j[~hit] - 1
            keep = j >= 0
            todo, j = todo[keep], j[keep]
        out[sel] = res
    return out


def step_of(t: np.ndarray, s_start: np.ndarray, s_end: np.ndarray, s_num: np.ndarray) -> np.ndarray:
    """The step (number) whose [start, end) holds each time, -1 outside every step."""
    if not len(s_start) or not len(t):
        return np.full(len(t), -1, np.int64)
    k = np.searchsorted(s_start, t, side="right") - 1
    kk = np.clip(k, 0, None)
    ok = (k >= 0) & ((t < s_end[kk]) | ((t == s_end[kk]) & (s_end[kk] == s_start[kk])))
    return np.where(ok, s_num[kk], -1)


# -- the mapping ---------------------------------------------------------------------------------------
def detect_flavor(cols: EventColumns, header: dict, cats: set) -> str:
    meta = header.get("metadata")
    if isinstance(meta, dict) and meta.get("exporter") == "insight":
        return "insight"
    if any(k in header for k in KINETO_HEADER):
        return "kineto"
    if {c.lower() for c in cats} & (set(HOST_KINDS) | set(DEVICE_KINDS)) - {"runtime", "driver", "operator"}:
        return "kineto"
    return "chrome"


def build(cols: EventColumns, header: dict, rank: int) -> RankTables:
    cols.finish()
    S = cols.strings
    x = cols.slices.lazy()
    for c in ("ts", "dur", "name", "cat", "lane", "corr", "ext", "bytes", "flops", "shape", "dtype"):
        x[c]  # materialised now: the chunks can go (half the memory of pass 1)
    if cols.slices.constant("a_op") is not None:  # nothing from our own exporter
        cols.slices.chunks.clear()
    strings = S.array()
    n = len(x["ts"])
    start = x["ts"]
    end = start + np.maximum(x["dur"], 0)
    cat_codes = unique_codes(x["cat"])[0]
    flavor = detect_flavor(cols, header, {strings[c] for c in cat_codes})
    base = header.get("baseTimeNanoseconds")
    base = int(base) if isinstance(base, (int, float)) and not isinstance(base, bool) else 0
    skipped = dict(cols.skipped)

    # per-slice kind (as an interned string code) and what the slice is
    cat_l = {c: strings[c].lower() for c in cat_codes}
    kind = np.zeros(n, np.int64)
    is_dev = np.zeros(n, bool)
    drop = np.zeros(n, bool)
    for c in cat_codes:
        sel = x["cat"] == c
        cl = cat_l[c]
        if flavor == "kineto":
            if cl in SKIP_CATS:
                drop |= sel
                skipped[f"{strings[c]} spans (the profiling window)"] = int(sel.sum())
                continue
            if cl in DEVICE_KINDS:
                kind[sel] = S(DEVICE_KINDS[cl])
                is_dev |= sel
            else:
                kind[sel] = S(HOST_KINDS.get(cl, cl or "slice"))
        else:
            kind[sel] = S(strings[c] or "slice")

    def names(idx):
        return strings[x["name"][idx]]

    lanes = x["lane"]
    n_lanes = len(cols.lane_keys)
    if flavor == "kineto":
        mc = kind == S("memcpy")
        if mc.any():
            kinds_mc = np.array([_memcpy_kind(v) for v in names(mc)], object)
            kind[mc] = [S(v) for v in kinds_mc]
    # -- lanes -> streams
    dev_events = np.bincount(lanes[is_dev], minlength=n_lanes) if n else np.zeros(n_lanes, np.int64)
    host_events = np.bincount(lanes[~is_dev & ~drop], minlength=n_lanes) if n else np.zeros(n_lanes, np.int64)
    step_mask = np.zeros(n, bool)
    step_num = np.full(n, -1, np.int64)
    if flavor == "kineto" and n:
        ann = (kind == S("annotation")) | (kind == S("cpu_op"))
        num_of = np.full(len(strings), -1, np.int64)  # name code -> N of ProfilerStep#N
        for code in unique_codes(x["name"][ann])[0]:
            m = STEP_RE.match(strings[code])
            if m:
                num_of[code] = int(m.group(1))
        num = num_of[x["name"]]
        step_mask = ann & (num >= 0)
        step_num[step_mask] = num[step_mask]
    lane_name: dict = {}
    lane_kind: dict = {}
    main_dev = None
    if flavor == "kineto":
        per_pid: dict = {}
        for ln, cnt in enumerate(dev_events):
            if cnt:
                pid = cols.lane_keys[ln][0]
                per_pid[pid] = per_pid.get(pid, 0) + int(cnt)
        main_dev = max(per_pid, key=per_pid.get) if per_pid else None
        steps_per_lane = np.bincount(lanes[step_mask], minlength=n_lanes) if n else np.zeros(n_lanes, np.int64)
        cpu_per_lane = np.bincount(lanes[kind == S("cpu_op")], minlength=n_lanes) if n else np.zeros(n_lanes)
        host_lanes = [ln for ln in range(n_lanes) if host_events[ln] and not dev_events[ln]]
        main = max(host_lanes, key=lambda ln: (steps_per_lane[ln], cpu_per_lane[ln], host_events[ln]), default=None)
        # the device stream that runs only NCCL kernels (the most of them) is the format's "comm" stream
        kern = kind == S("kernel")
        is_nccl = _nccl_mask(strings, x["name"]) & kern
        all_k = np.bincount(lanes[kern], minlength=n_lanes)
        nccl_k = np.bincount(lanes[is_nccl], minlength=n_lanes)
        only = [ln for ln in range(n_lanes) if nccl_k[ln] and nccl_k[ln] == all_k[ln]]
        comm_lane = max(only, key=lambda ln: nccl_k[ln]) if only else None
        for ln in range(n_lanes):
            pid, tid = cols.lane_keys[ln]
            if dev_events[ln]:
                sid = f"stream{tid}" if _is_int(tid) and int(tid) >= 0 else _slug(cols.thread_names.get((pid, tid))
                                                                                  or f"tid{tid}")
                lane_name[ln] = "comm" if ln == comm_lane else f"gpu{pid}.{sid}"
                lane_kind[ln] = "device"
            elif host_events[ln]:
                lane_name[ln] = "host" if ln == main else f"host.{_slug(str(tid))}"
                lane_kind[ln] = "host"
    elif flavor == "insight":
        for ln in range(n_lanes):
            pid, tid = cols.lane_keys[ln]
            t = cols.thread_names.get((pid, tid), "")
            lane_name[ln] = t or f"{pid}/{tid}"
            lane_kind[ln] = "host" if t == "host" or (isinstance(pid, int) and pid >= 1000) else "device"
    else:
        for ln in range(n_lanes):
            pid, tid = cols.lane_keys[ln]
            p = cols.process_names.get(pid) or str(pid)
            t = cols.thread_names.get((pid, tid)) or str(tid)
            lane_name[ln] = f"{p}/{t}"
            lane_kind[ln] = "host"
    # identical names for different lanes (e.g. our export of a multi-rank run: every rank has an aicore0)
    # are kept apart, never merged into one stream
    seen: dict = {}
    for ln in sorted(lane_name):
        nm = lane_name[ln]
        if nm in seen:
            lane_name[ln] = f"{nm} ({cols.lane_keys[ln][0]}/{cols.lane_keys[ln][1]})"
        seen[nm] = ln

    # -- what becomes a task, a step, a host op
    if flavor == "insight":
        cats = strings[x["cat"]] if n else np.zeros(0, object)
        step_rows = np.flatnonzero(cats == "step")
        host_op_rows = np.flatnonzero(cats == "host_op")
        task = (cats != "step") & (cats != "step_phase") & (cats != "host_op")
    else:
        step_rows = np.flatnonzero(step_mask)
        host_op_rows = np.zeros(0, np.int64)
        task = ~drop & ~step_mask

    # time zero: the first imported timestamp of this file
    fl = cols.flows.all()
    mem = cols.memory.all()
    cols.flows.chunks.clear()
    cols.memory.chunks.clear()
    ctr = cols.counters
    ctr["ts"] = np.array(ctr["ts"], np.int64)
    firsts = [a.min() for a in (start[~drop] if n else start, fl["ts"], mem["ts"], ctr["ts"]) if len(a)]
    zero = int(min(firsts)) if firsts else 0
    if flavor == "insight":  # our exporter writes times relative to the run start: keep that zero
        zero = min(zero, 0)

    # -- device work -> its launch (correlation id), steps, phases
    corr = x["corr"]
    launcher = np.full(n, -1, np.int64)
    if flavor == "kineto" and n:
        rt = np.flatnonzero((kind == S("runtime")) & (corr >= 0))
        dv = np.flatnonzero(is_dev & (corr >= 0))
        if len(rt) and len(dv):
            o = np.argsort(corr[rt], kind="stable")
            rc = corr[rt][o]
            k = np.searchsorted(rc, corr[dv])
            kk = np.clip(k, 0, len(rc) - 1)
            hit = rc[kk] == corr[dv]
            launcher[dv[hit]] = rt[o][kk[hit]]

    if flavor == "insight":
        s_rows = step_rows[np.argsort(start[step_rows], kind="stable")]
        s_num = x["a_step"][s_rows]
        s_start, s_end = start[s_rows], end[s_rows]
        s_epoch = x["a_epoch"][s_rows]
        ii = np.where(x["a_ii"][s_rows] >= 0, x["a_ii"][s_rows], 0)
        fpbp = np.where(x["a_fpbp"][s_rows] >= 0, x["a_fpbp"][s_rows], 0)
        fp_start = s_start + ii
        bp_end = np.minimum(fp_start + fpbp, s_end)
        fp_op = strings[x["a_op"][s_rows]]
        bp_op = strings[x["a_scope"][s_rows]]
        gn_start = gn_end = np.full(len(s_rows), -1, np.int64)
        task_step = x["a_step"]
        phase = x["a_phase"]
    else:
        s_num, s_start, s_end = _steps(flavor, kind, S, start, end, step_rows, step_num, launcher, is_dev, drop)
        s_epoch = np.full(len(s_num), -1, np.int64)
        task_step = step_of(start, s_start, s_end, s_num)
        if flavor == "kineto":
            has = launcher >= 0
            task_step[has] = step_of(start[launcher[has]], s_start, s_end, s_num)
            phase, fp_start, bp_end, fp_op, bp_op, gn_start, gn_end = _phases(
                S, strings, x["name"], kind, lanes, start, end, is_dev, task, launcher, task_step, s_num,
                s_start, s_end)
        else:
            phase = np.zeros(n, np.int64)
            fp_start, bp_end = s_start.copy(), s_end.copy()
            fp_op = bp_op = np.array([""] * len(s_num), object)
            gn_start = gn_end = np.full(len(s_num), -1, np.int64)

    # -- op type, scope: string codes (into S) like every string column of the tasks table
    nc = x["name"]
    if flavor == "insight":
        op, scope, graph, task_id = x["a_op"], x["a_scope"], x["a_graph"], x["a_task"]
    else:
        op = nc.copy()
        if flavor == "kineto" and n:
            kc = np.flatnonzero(kind == S("kernel"))
            if len(kc):
                uniq, inv = unique_codes(nc[kc])
                op[kc] = np.array([S(kernel_class(strings[u])) for u in uniq], np.int64)[inv]
            mc = np.flatnonzero(np.isin(kind, [S(k) for k in ("memcpy_h2d", "memcpy_d2h", "memcpy_d2d", "memcpy_h2h",
                                                               "memcpy_p2p", "memcpy")]))
            if len(mc):
                uniq, inv = unique_codes(nc[mc])
                op[mc] = np.array([S(strings[u].split(" (")[0]) for u in uniq], np.int64)[inv]
            op[kind == S("memset")] = S("Memset")
            nccl = np.flatnonzero(_nccl_mask(strings, nc) & (kind == S("kernel")))
            if len(nccl):  # a collective's kernel: the collective (all_reduce, all_gather, ...)
                uniq, inv = unique_codes(nc[nccl])
                op[nccl] = np.array([S(_collective(strings[u])) for u in uniq], np.int64)[inv]
        scope = np.zeros(n, np.int64)
        if flavor == "kineto" and n:
            # a device task's scope: the host op that launched it (same External id), else the launch itself
            ext = x["ext"]
            cpu = np.flatnonzero((kind == S("cpu_op")) & (ext >= 0))
            dv = np.flatnonzero(is_dev)
            if len(dv):
                byext = pd.Series(nc[cpu], index=ext[cpu])
                byext = byext[~byext.index.duplicated(keep="last")]
                sc = pd.Series(ext[dv]).map(byext).to_numpy(float)
                lsc = np.where(launcher[dv] >= 0, nc[np.clip(launcher[dv], 0, None)], 0)
                scope[dv] = np.where(np.isnan(sc), lsc, np.nan_to_num(sc)).astype(np.int64)
        graph = np.zeros(n, np.int64)
        task_id = np.full(n, -1, np.int64)

    # -- streams, in display order: device streams first
    used = sorted({int(v) for v in np.unique(lanes[task])} if n else set(),
                  key=lambda ln: (lane_kind.get(ln) != "device", lane_name.get(ln) != "host", lane_name.get(ln, "")))
    streams = []
    stream_of_lane = np.zeros(max(n_lanes, 1), np.int64)
    sid_of_lane = np.full(max(n_lanes, 1), -1, np.int64)
    for i, ln in enumerate(used):
        nm = lane_name.get(ln) or f"{cols.lane_keys[ln][0]}/{cols.lane_keys[ln][1]}"
        stream_of_lane[ln] = S(nm)
        sid_of_lane[ln] = i if i < 128 else -1
        pid, tid = cols.lane_keys[ln]
        streams.append({"stream_id": i if i < 128 else -1, "name": nm, "kind": lane_kind.get(ln, "host"),
                        "pid": _jsonable(pid), "tid": _jsonable(tid),
                        "label": cols.thread_names.get((pid, tid), "")})

    strings = S.array()  # (kinds, phases and stream names were interned since)
    # -- the tasks table, in time order
    rows = np.flatnonzero(task)
    rows = rows[np.argsort(start[rows], kind="stable")]
    new_pos = np.full(n, -1, np.int64)
    new_pos[rows] = np.arange(len(rows))
    def codes(c):
        return Codes(c[rows], strings)

    tasks = {
        "step": task_step[rows], "graph": codes(graph), "task_id": task_id[rows], "name": codes(nc), "op": codes(op),
        "kind": codes(kind), "stream": Codes(stream_of_lane[lanes[rows]], strings),
        "stream_id": sid_of_lane[lanes[rows]], "scope": codes(scope), "phase": codes(phase),
        "start_ns": start[rows] - zero, "end_ns": end[rows] - zero, "dur_ns": end[rows] - start[rows],
        "flops": x["flops"][rows], "bytes": x["bytes"][rows], "shape": codes(x["shape"]), "dtype": codes(x["dtype"]),
        "fused_ops": Codes(np.zeros(len(rows), np.int64), strings),
        "correlation": corr[rows], "external_id": x["ext"][rows],
        "launch_task": np.where(launcher[rows] >= 0, new_pos[np.clip(launcher[rows], 0, None)], -1),
    }
    # what the memory, counters and flows below do not read: freed before they run (the peak memory)
    del graph, task_id, op, scope, phase, task_step, launcher, step_mask, step_num, is_dev, drop
    for c in ("dur", "cat", "ext", "bytes", "flops", "shape", "dtype"):
        x.pop(c, None)
    steps = {"step": s_num, "epoch": s_epoch, "begin_ns": s_start - zero,
             "get_next_start_ns": np.where(gn_start >= 0, gn_start - zero, -1),
             "get_next_end_ns": np.where(gn_end >= 0, gn_end - zero, -1),
             "fp_start_ns": fp_start - zero, "bp_end_ns": bp_end - zero, "end_ns": s_end - zero,
             "fp_start_op": np.asarray(fp_op, object), "bp_end_op": np.asarray(bp_op, object),
             "loss": np.full(len(s_num), np.nan), "sink": np.zeros(len(s_num), bool)}
    o = np.argsort(s_start, kind="stable")
    steps = {k: v[o] for k, v in steps.items()}

    tables = {"tasks": tasks, "steps": steps}
    if len(host_op_rows):
        h = host_op_rows[np.argsort(start[host_op_rows], kind="stable")]
        tables["host_ops"] = {"op": strings[x["a_op"][h]], "name": names(h), "scope": strings[x["a_scope"][h]],
                              "start_ns": start[h] - zero, "end_ns": end[h] - zero}

    # -- device properties, memory
    props = header.get("deviceProperties") if isinstance(header.get("deviceProperties"), list) else []
    dev_prop = next((p for p in props if isinstance(p, dict) and str(p.get("id")) == str(main_dev)), None)
    has_gpu = main_dev is not None or bool(props)
    if flavor == "kineto":
        device = {"target": (dev_prop or {}).get("name") or ("GPU" if has_gpu else "CPU"),
                  "capacity_bytes": int((dev_prop or {}).get("totalGlobalMem") or 0)}
        if main_dev is not None:
            device["device_id"] = _jsonable(main_dev)
        if dev_prop:
            device["properties"] = dev_prop
    elif flavor == "insight":
        meta = header.get("metadata") or {}
        device = dict(meta.get("device") or {"target": "", "capacity_bytes": 0})
    else:
        device = {"target": "", "capacity_bytes": 0}
    if len(mem["ts"]):
        tables["memory"] = _memory(mem, cols, S, strings, x["name"], kind, lanes, start, end, task, main_dev, has_gpu,
                                   device.get("capacity_bytes", 0), s_num, s_start, s_end, zero)

    if len(ctr["ts"]):
        tables["counters"] = _counters(ctr, cols.process_names, strings, s_num, s_start, s_end, zero)

    # -- flows
    tables["flows"] = _flows(fl, strings, lanes, start, end, task, corr, new_pos, zero)

    counts = {"events": cols.n_events, "tasks": int(len(rows)), "steps": int(len(s_num)),
              "memory": int(len(mem["ts"])), "flows": int(len(tables["flows"]["cat"])),
              "counters": int(len(ctr["ts"])),
              "kernels": int((kind[rows] == S("kernel")).sum()) if len(rows) else 0}
    return RankTables(flavor, rank, base + zero, tables, streams, device, counts, skipped,
                      {k: v for k, v in header.items() if k != "traceEvents"})


def _steps(flavor, kind, S, start, end, step_rows, step_num, launcher, is_dev, drop):
    """Step ranges as the TensorBoard plugin defines them: ``ProfilerStep#N`` on the host; with device work, a
    step starts at max(its host start, the previous step's end) and ends at max(its host end, the end of the
    last device task launched from inside it). No ProfilerStep: one step 0 over the host ops (or the trace)."""
    if len(step_rows):
        o = step_rows[np.argsort(start[step_rows], kind="stable")]
        num, hs, he = step_num[o], start[o], end[o]
    else:
        host = ~is_dev & ~drop & np.isin(kind, [S("cpu_op"), S("python")])
        if not host.any():
            host = ~drop
        if not host.any():
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
        num = np.array([0], np.int64)
        hs, he = np.array([start[host].min()]), np.array([end[host].max()])
    dv = np.flatnonzero(is_dev & (launcher >= 0))
    if not len(dv):
        return num, hs, he
    ls, le = start[launcher[dv]], end[launcher[dv]]
    k = np.searchsorted(hs, ls, side="right") - 1
    kk = np.clip(k, 0, None)
    ok = (k >= 0) & (le <= he[kk])
    dev_max = np.full(len(num), np.iinfo(np.int64).min)
    np.maximum.at(dev_max, kk[ok], end[dv][ok])
    if not ok.any():
        return num, hs, he
    s_start, s_end = hs.copy(), he.copy()
    prev = hs[0]
    for i in range(len(num)):
        s_start[i] = max(prev, hs[i])
        s_end[i] = max(he[i], dev_max[i], s_start[i])
        prev = s_end[i]
    return num, s_start, s_end


def _phases(S, strings, name_codes, kind, lanes, start, end, is_dev, task, launcher, task_step, s_num,
            s_start, s_end):
    n = len(start)
    host = ~is_dev & task
    ph = np.zeros(n, np.int64)
    uniq, inv = unique_codes(name_codes)
    uniq_names = strings[uniq]

    def named(prefixes):
        return _starts(uniq_names, prefixes)[inv] if n else np.zeros(0, bool)

    masks = {}
    for label, prefixes in (("input", DATALOADER), ("update", OPTIMIZER), ("backward", BACKWARD)):
        r = np.flatnonzero(named(prefixes) & ~is_dev)
        masks[label] = inside(lanes, start, end, lanes[r], start[r], end[r]) & host
    bwd = masks["backward"] & ~masks["input"] & ~masks["update"]
    first_bwd = pd.Series(start[bwd]).groupby(task_step[bwd]).min()
    fb = pd.Series(task_step[host]).map(first_bwd).to_numpy(dtype=float)
    fwd = np.zeros(n, bool)
    hrows = np.flatnonzero(host)
    fwd[hrows] = (task_step[hrows] >= 0) & (np.isnan(fb) | (start[hrows] < fb))
    fwd &= ~masks["input"] & ~masks["update"] & ~bwd
    fwd &= kind != S("annotation")  # the step's own wrappers are not forward work
    ph[fwd] = S("forward")
    ph[bwd] = S("backward")
    ph[masks["update"]] = S("update")
    ph[masks["input"]] = S("input")
    dev = np.flatnonzero(is_dev & (launcher >= 0))
    ph[dev] = ph[launcher[dev]]
    # per step: first forward task, last backward task, the first DataLoader range
    m = len(s_num)
    fp_start, bp_end = s_start.copy(), s_start.copy()
    fp_op, bp_op = np.array([""] * m, object), np.array([""] * m, object)
    gn_start, gn_end = np.full(m, -1, np.int64), np.full(m, -1, np.int64)
    idx = pd.Series(np.arange(m), index=s_num)
    idx = idx[~idx.index.duplicated()]

    def per_step(mask, key, pick_max):
        r = np.flatnonzero(mask & (task_step >= 0))
        if not len(r):
            return {}
        st = task_step[r]
        o = np.lexsort((key[r], st))  # by step, then key; equal keys in row order (a stable sort)
        st, r = st[o], r[o]
        new = st[1:] != st[:-1]
        pick = np.r_[new, True] if pick_max else np.r_[True, new]  # each step's last / first row
        return dict(zip(st[pick].tolist(), r[pick].tolist()))

    fw_first = per_step(ph == S("forward"), start, False)
    fw_last = per_step(ph == S("forward"), end, True)
    bw_last = per_step(ph == S("backward"), end, True)
    dl_rows = np.flatnonzero(named(DATALOADER) & host)
    dl_first = per_step(np.isin(np.arange(n), dl_rows), start, False)
    for s, i in idx.items():
        if s in fw_first:
            r = fw_first[s]
            fp_start[i], fp_op[i] = start[r], strings[name_codes[r]]
        if s in bw_last:
            r = bw_last[s]
            bp_end[i], bp_op[i] = end[r], strings[name_codes[r]]
        elif s in fw_last:
            bp_end[i] = end[fw_last[s]]
        else:
            bp_end[i] = fp_start[i]
        if s in dl_first:
            r = dl_first[s]
            gn_start[i], gn_end[i] = start[r], end[r]
    fp_start = np.clip(fp_start, s_start, s_end)
    bp_end = np.clip(bp_end, fp_start, s_end)
    return ph, fp_start, bp_end, fp_op, bp_op, gn_start, gn_end


def _lane_index(lanes, start, end, rows) -> dict:
    """lane -> (starts, ends, rows) of the given slices, sorted by start and, at equal starts, longest first
    (so the last of equal starts is the innermost)."""
    out = {}
    if not len(rows):
        return out
    df = pd.DataFrame({"lane": lanes[rows], "s": start[rows], "d": -(end[rows] - start[rows]), "r": rows})
    df = df.sort_values(["lane", "s", "d"], kind="stable")
    for ln, g in df.groupby("lane", sort=False):
        s = g["s"].to_numpy()
        out[int(ln)] = (s, s - g["d"].to_numpy(), g["r"].to_numpy())
    return out


def _flows(fl, strings, lanes, start, end, task, corr, new_pos, zero) -> dict:
    empty = {"cat": np.zeros(0, object), "id": np.zeros(0, object), "src_task": np.zeros(0, np.int64),
             "dst_task": np.zeros(0, np.int64), "src_ns": np.zeros(0, np.int64), "dst_ns": np.zeros(0, np.int64)}
    if not len(fl["ts"]):
        return empty
    key = ["cat", "id", "id_str"]
    is_s = fl["ph"] == ord("s")
    src = pd.DataFrame({k: v[is_s] for k, v in fl.items() if k != "ph"}).drop_duplicates(key, keep="first")
    dst = pd.DataFrame({k: v[~is_s] for k, v in fl.items() if k != "ph"}).drop_duplicates(key, keep="last")
    fl.clear()
    pairs = src.merge(dst, on=key, suffixes=("_s", "_f"))
    del src, dst
    if pairs.empty:
        return empty
    index = None
    # Kineto's flow id is the correlation id: the slices on the flow's two lanes that carry it are its ends
    # (several launches can start in the same microsecond, so time alone can pick the wrong one)
    rows = np.flatnonzero(task & (corr >= 0))
    carriers = pd.DataFrame({"lane": lanes[rows], "id": corr[rows], "row": rows}).drop_duplicates(["lane", "id"])

    def ends(side: str, enclosing: np.ndarray) -> np.ndarray:
        ln, t, fid = (pairs[f"{c}_{side}"].to_numpy() if f"{c}_{side}" in pairs else pairs[c].to_numpy()
                      for c in ("lane", "ts", "id"))
        hit = pd.DataFrame({"lane": ln, "id": fid}).merge(carriers, on=["lane", "id"], how="left")["row"]
        r = hit.fillna(-1).to_numpy(np.int64)
        ok = (r >= 0) & (fid >= 0)
        rr = np.clip(r, 0, None)
        ok &= (start[rr] <= t) & (t <= np.maximum(end[rr], start[rr]))
        out = np.where(ok, r, -1)
        rest = np.flatnonzero(~ok)  # by time alone
        if len(rest):
            nonlocal index
            if index is None:  # (Kineto's flows all bind by correlation id: no index needed)
                index = _lane_index(lanes, start, end, np.flatnonzero(task))
            out[rest] = bind_many(index, ln[rest], t[rest], enclosing[rest])
        return out

    s_rows = ends("s", np.ones(len(pairs), bool))
    f_rows = ends("f", pairs["bp_f"].to_numpy() == 1)
    num = pairs["id"].to_numpy()
    if (num >= 0).all():  # Kineto: correlation ids, as text without a Python string each
        ids = pc.cast(pa.array(num, pa.int64()), pa.string())
    else:
        ids = np.where(num >= 0, num.astype(str).astype(object), strings[pairs["id_str"].to_numpy()]).astype(object)
    return {"cat": Codes(pairs["cat"].to_numpy(), strings), "id": ids,
            "src_task": np.where(s_rows >= 0, new_pos[np.clip(s_rows, 0, None)], -1),
            "dst_task": np.where(f_rows >= 0, new_pos[np.clip(f_rows, 0, None)], -1),
            "src_ns": pairs["ts_s"].to_numpy() - zero, "dst_ns": pairs["ts_f"].to_numpy() - zero}


def _memory(mem, cols, S, strings, name_codes, kind, lanes, start, end, task, main_dev, has_gpu, capacity, s_num,
            s_start, s_end, zero) -> dict:
    o = np.argsort(mem["ts"], kind="stable")
    m = {k: v[o] for k, v in mem.items()}
    t = m["ts"]
    b = m["bytes"]
    dt, di = m["dev_type"], m["dev_id"]
    cuda = dt == 1
    main = cuda & ((di == _int_or(main_dev, -2)) | (main_dev is None))
    device = np.where(main, "device", np.where(cuda, np.char.add("cuda", di.astype(str)).astype(object),
                                               np.where(dt == 0, "host" if has_gpu else "device",
                                                        np.char.add("type", dt.astype(str)).astype(object))))
    cap = np.where(main, capacity if capacity else -1, -1)
    # the op that allocated: the innermost host op around the event on its thread
    index = _lane_index(lanes, start, end, np.flatnonzero(task & (kind == S("cpu_op"))))
    op_rows = bind_many(index, m["lane"], t, np.ones(len(t), bool))
    op = np.where(op_rows >= 0, strings[name_codes[np.clip(op_rows, 0, None)]] if len(name_codes) else "", "")
    return {"t_ns": t - zero, "action": np.where(b >= 0, "alloc", "free").astype(object),
            "device": device.astype(object),
            "kind": np.array([""] * len(t), object),
            "tensor": _hex(m["addr"]),
            "op": op.astype(object), "scope": np.array([""] * len(t), object), "size": np.abs(b),
            "offset": np.full(len(t), -1, np.int64), "in_use": m["allocated"], "capacity": cap,
            "step": step_of(t, s_start, s_end, s_num), "shape": np.array([""] * len(t), object),
            "dtype": np.array([""] * len(t), object)}


def _counters(ctr: dict, process_names: dict, strings, s_num, s_start, s_end, zero) -> dict:
    """``C`` events: one row per (event, series) in time order; the process by its ``process_name``."""
    o = np.argsort(ctr["ts"], kind="stable")
    t = ctr["ts"][o]
    pids = [ctr["pid"][i] for i in o]
    names = {p: process_names.get(p) or ("" if p is None else _text(p)) for p in set(map(_key, pids))}
    return {"name": strings[np.array(ctr["name"], np.int64)[o]],
            "series": strings[np.array(ctr["series"], np.int64)[o]],
            "process": np.array([names[_key(p)] for p in pids], object), "t_ns": t - zero,
            "value": np.array(ctr["value"], np.float64)[o], "step": step_of(t, s_start, s_end, s_num)}


def _key(v):
    """A pid as a dictionary key (a list or object as its text)."""
    try:
        hash(v)
        return v
    except TypeError:
        return _text(v)


COLLECTIVES = (("allreduce", "all_reduce"), ("allgather", "all_gather"), ("reducescatter", "reduce_scatter"),
               ("broadcast", "broadcast"), ("alltoall", "all_to_all"), ("sendrecv", "send_recv"), ("send", "send"),
               ("recv", "recv"), ("reduce", "reduce"))


def _nccl_mask(strings: np.ndarray, codes: np.ndarray) -> np.ndarray:
    uniq, inv = unique_codes(codes)
    return np.array(["nccl" in str(strings[u]).lower() for u in uniq], bool)[inv] if len(codes) else \
        np.zeros(0, bool)


def _hex(addr: np.ndarray) -> np.ndarray:
    """Addresses as ``0x7f...`` ("" for -1), each distinct one formatted once (an allocation and its free
    share it)."""
    uniq, inv = np.unique(addr, return_inverse=True)
    return np.array([f"0x{a:x}" if a >= 0 else "" for a in uniq.tolist()], object)[inv]


def _collective(name: str) -> str:
    """An NCCL kernel's collective: ``ncclDevKernel_AllGather_RING_LL(...)`` -> ``all_gather``."""
    key = name.lower().replace("_", "")
    for k, v in COLLECTIVES:
        if k in key:
            return v
    return kernel_class(name)


def _memcpy_kind(name: str) -> str:
    key = name.lower().replace("memcpy", "").split("(")[0].strip()
    return MEMCPY_KINDS.get(key, "memcpy")


def _is_int(v) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return True
    return isinstance(v, str) and v.lstrip("-").isdigit()


def _int_or(v, default: int) -> int:
    return int(v) if _is_int(v) else default


def _slug(s: str) -> str:
    return re.sub(r"\s+", "_", str(s).strip()) or "?"


def _jsonable(v):
    return v if isinstance(v, (int, str, float)) or v is None else str(v)
