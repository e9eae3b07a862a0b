"""Timeline: the run's tasks as lanes, with a level of detail that keeps any view small.

``load_timeline(run)`` reads the task *times* once (start, end and the columns that choose a lane and a
colour; Parquet dictionary-encoded, straight into numpy) and prepares, per lane, the tasks sorted by start
plus the lane's busy intervals merged into a disjoint list with their cumulative length. The dashboard
caches the result per run; every zoom or pan then calls

    timeline_window(data, t0_ns, t1_ns, width_px) -> TimelineWindow

which, per lane, returns either

* ``mode == "tasks"``: the exact tasks that overlap the window (with name, op and scope), when the lane
  holds at most ``per_px * width_px`` of them there (about two per pixel) and all exact lanes together at
  most ``max_tasks``; or
* ``mode == "busy"``: one bin per pixel with the fraction of the bin the lane was busy (the union of its
  task intervals, so overlapping tasks are not counted twice) and the number of tasks starting in it.
  Computed without a Python loop: busy time up to ``t`` is ``cum[k] + clip(t - s[k], 0, len[k])`` with
  ``k = searchsorted(s, t) - 1`` over the merged intervals ``s``, so a bin's busy time is the difference of
  that at its two edges -- O(width log n) for any window.

Zooming in shrinks the window until a lane's task count fits, and the lane switches back to exact tasks.

Lanes: ``Steps`` (one slice per step, from the step markers) with its phases beside it (``steps/phases``,
drawn in the Steps lane: data wait -> forward -> backward -> update -> tail, see ``step_phases``), one per stream in the order aicore0, aicore1,
aicpu, comm, host (then any other stream), the host's sink feeder thread (``TransferData``, graph
``data_sink``) on its own lane, and PyNative host ops (``host_ops``) when present. Waits (``get_next``,
``event_wait``, ``event_record``) are drawn but do not count as busy.

Flows (``task_flows``): the links of one task, as Perfetto draws them for a selected slice -- an imported
run's ``flows`` table (Kineto's launch -> kernel ``ac2g``, ``fwdbwd``) or its ``launch_task`` column; for our
own runs the links the Chrome export draws: the sink feeder's k-th ``TransferData`` -> the k-th ``GetNext``,
and a step's host input copy -> the step's first device task.

Memory: the lanes hold int64 times, int32 rows and int8 codes (about 40 bytes per task with the merged busy
intervals); task names are read only for the rows a window shows (``read_rows``: the row groups holding
them), so nothing per request is proportional to the run.

"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from insight.trace import Run, TraceError, as_run, empty_frame, read, read_rows

INDEX_MIN_TASKS = 1_000_000  # runs of at least this many tasks keep their lanes on disk (see _save_index)
NAMES_IN_MEMORY = 2_000_000  # above this many tasks, names are read per window (row groups), not all kept
PER_PX = 2.0            # a lane shows exact tasks while it holds at most this many per pixel of the window
MAX_TASKS = 20_000      # and all exact lanes together at most this many
STREAM_ORDER = ("aicore0", "aicore1", "aicpu", "comm", "host")
WAIT_KINDS = ("get_next", "event_wait", "event_record")
FEEDER_GRAPH = "data_sink"

# colour codes of tasks (the dashboard maps them to colours)
PHASES = ("forward", "backward", "update", "input")
CODE_OTHER, CODE_WAIT, CODE_STEP_EVEN, CODE_STEP_ODD, CODE_HOST_OP = 4, 5, 6, 7, 8
CODE_DATA_WAIT, CODE_TAIL = 9, 10
CODE_LABELS = ("forward", "backward", "update", "input", "other", "wait (GetNext / events)", "step", "step",
               "PyNative host op", "data wait", "tail")
# the phases of a step, in order, and their colour codes (forward / backward / update share the tasks' colours)
STEP_PHASES = (("data wait", CODE_DATA_WAIT), ("forward", 0), ("backward", 1), ("update", 2), ("tail", CODE_TAIL))

TASK_READ = {"graph": "", "kind": "", "stream": "", "phase": "", "start_ns": -1, "end_ns": -1}
DETAIL_COLUMNS = {"step": -1, "graph": "", "task_id": -1, "name": "", "op": "", "kind": "", "stream": "", "scope": "",
                  "phase": "", "start_ns": -1, "end_ns": -1, "flops": -1, "bytes": -1, "shape": "", "dtype": "",
                  "fused_ops": ""}
NAME_COLUMNS = {"name": "", "op": "", "scope": ""}
HOST_OP_COLUMNS = {"op": "", "name": "", "scope": "", "start_ns": -1, "end_ns": -1}
FLOW_COLUMNS = {"cat": "", "src_task": -1, "dst_task": -1}
SOURCES = ("tasks", "host_ops", "steps", "phases")  # what a lane's ``row`` indexes


@dataclass
class Lane:
    """One lane's tasks, sorted by start. ``row`` indexes the lane's source table (``tasks``, ``host_ops``,
    ``steps``: ``TimelineData.steps``, or ``phases``: ``TimelineData.phases``)."""
    key: str
    label: str
    source: str
    start: np.ndarray
    end: np.ndarray
    row: np.ndarray
    code: np.ndarray
    reach: np.ndarray = None   # running max of ``end``: tasks before ``searchsorted(reach, t)`` end by ``t``
    busy_start: np.ndarray = None  # merged busy intervals (disjoint, sorted)
    busy_len: np.ndarray = None
    busy_cum: np.ndarray = None    # busy time before each merged interval

    def __post_init__(self):
        n = len(self.end)
        ordered = n < 2 or bool(np.all(self.end[1:] >= self.end[:-1]))
        # a stream runs one task at a time: its ends are in order already (no copy)
        self.reach = self.end if ordered else np.maximum.accumulate(self.end)
        work = self.code != CODE_WAIT
        if n < 2 or bool(np.all(self.start[1:] >= self.reach[:-1])):
            # no task overlaps the next: the tasks are the busy intervals (waits with length 0), no merge
            self.busy_start = self.start
            self.busy_len = np.where(work, self.end - self.start, 0)
        else:
            self.busy_start, self.busy_len = merge_intervals(self.start[work], self.end[work])
        self.busy_cum = np.empty(len(self.busy_len), np.int64)
        if len(self.busy_len):
            self.busy_cum[0] = 0
            np.cumsum(self.busy_len[:-1], out=self.busy_cum[1:])

    def __len__(self) -> int:
        return len(self.start)

    @property
    def busy_ns(self) -> int:
        return int(self.busy_len.sum())

    def busy_until(self, t: np.ndarray) -> np.ndarray:
        """Busy nanoseconds of the lane in ``[-inf, t)`` for each ``t`` (vectorised)."""
        t = np.asarray(t, np.int64)
        if not len(self.busy_start):
            return np.zeros(t.shape, np.int64)
        k = np.searchsorted(self.busy_start, t, side="right") - 1
        kk = np.clip(k, 0, None)
        part = np.clip(t - self.busy_start[kk], 0, self.busy_len[kk])
        return np.where(k >= 0, self.busy_cum[kk] + part, 0)

    def span(self, t0: int, t1: int) -> tuple[int, int]:
        """Index range ``[lo, hi)`` holding every task that overlaps ``[t0, t1)`` (and possibly a few nested
        ones that end before ``t0``): an upper bound on the count, found by two binary searches."""
        lo = int(np.searchsorted(self.reach, t0, side="right"))
        hi = int(np.searchsorted(self.start, t1, side="left"))
        return lo, max(lo, hi)


def merge_intervals(start: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The union of ``[start, end)`` intervals (``start`` sorted) as disjoint (starts, lengths)."""
    if not len(start):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    reach = np.maximum.accumulate(end)
    new = np.ones(len(start), bool)
    new[1:] = start[1:] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.r_[first[1:] - 1, len(start) - 1]
    s = start[first]
    return s.astype(np.int64), (reach[last] - s).astype(np.int64)


@dataclass
class TimelineData:
    """What ``load_timeline`` reads once per run; ``timeline_window`` answers every view from it."""
    run: Run
    rank: int
    lanes: list
    steps: pd.DataFrame         # step_times: step, start_ns, end_ns, phases
    t_min: int
    t_max: int
    n_tasks: int
    phases: pd.DataFrame | None = None   # step_phases: step, phase, code, start_ns, end_ns
    row_lane: np.ndarray | None = None   # index into ``lanes`` of each tasks row (-1: not drawn)
    get_next: np.ndarray | None = None   # rows of the GetNext tasks, by start
    _names: dict | None = None
    _host_ops: pd.DataFrame | None = None
    _flows: pd.DataFrame | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def lane(self, key: str) -> Lane:
        for ln in self.lanes:
            if ln.key == key:
                return ln
        raise KeyError(key)

    @property
    def step_numbers(self) -> list[int]:
        return [int(s) for s in self.steps["step"]]

    def step_range(self, step: int) -> tuple[int, int] | None:
        """``(start_ns, end_ns)`` of a step (the step trace's definition), or None."""
        m = self.steps[self.steps["step"] == int(step)]
        if m.empty:
            return None
        r = m.iloc[0]
        return int(r["start_ns"]), int(r["end_ns"])

    # -- details, read on demand --------------------------------------------------------------------
    def task_rows(self, rows, columns: dict = DETAIL_COLUMNS) -> pa.Table:
        """``columns`` of ``tasks`` at global positions ``rows`` (the order ``load_timeline`` read them:
        files in order, then rows): reads only the Parquet row groups that hold them."""
        return _read_rows(self.run, self.rank, np.asarray(rows, np.int64), columns)

    def names(self) -> dict:
        """``{column: (codes, values)}`` for name, op and scope of every task: what exact tasks are
        labelled with, read once on the first zoom that shows exact tasks (numpy indexing afterwards).
        Runs of more than ``NAMES_IN_MEMORY`` tasks read the names of a window's rows instead."""
        with self._lock:
            if self._names is None:
                t = _read_task_table(self.run, self.rank, NAME_COLUMNS)
                out = {}
                for c in NAME_COLUMNS:
                    codes, values = _codes(t.column(c))
                    out[c] = (codes, np.array(values + [""], dtype=object))
                self._names = out
            return self._names

    def details(self, source: str, rows) -> pd.DataFrame:
        """Full rows of ``source`` (``tasks``, ``host_ops`` or ``steps``) at positions ``rows``."""
        rows = np.asarray(rows, np.int64)
        if source == "tasks":
            out = self.task_rows(rows).to_pandas() if len(rows) else empty_frame(DETAIL_COLUMNS)
            for c in out.columns:
                if isinstance(out[c].dtype, pd.CategoricalDtype):
                    out[c] = out[c].astype(str)
            out["dur_ns"] = out["end_ns"] - out["start_ns"]
            return out
        if source == "host_ops":
            return self.host_ops().iloc[rows].reset_index(drop=True).assign(
                dur_ns=lambda d: d["end_ns"] - d["start_ns"])
        if source == "steps":
            return self.steps.iloc[rows].reset_index(drop=True)
        if source == "phases" and self.phases is not None:
            out = self.phases.iloc[rows].reset_index(drop=True)
            return out.assign(dur_ns=out["end_ns"] - out["start_ns"])
        raise ValueError(f"unknown source {source!r}")

    def lane_index(self, source: str, row: int) -> int:
        """Position in ``lanes`` of the lane drawing ``row`` of ``source`` (-1: none)."""
        row = int(row)
        if source == "tasks":
            ok = self.row_lane is not None and 0 <= row < len(self.row_lane)
            return int(self.row_lane[row]) if ok else -1
        key = {"host_ops": "host/pynative", "steps": "steps", "phases": "steps/phases"}.get(source)
        return next((i for i, ln in enumerate(self.lanes) if ln.key == key), -1)

    def flows_table(self) -> pd.DataFrame:
        """An imported run's ``flows`` (cat, src_task, dst_task), read once; empty for our own runs."""
        with self._lock:
            if self._flows is None:
                f = read(self.run, "flows", FLOW_COLUMNS, rank=self.rank) if self.run is not None \
                    else empty_frame(FLOW_COLUMNS)
                self._flows = f[(f["src_task"] >= 0) & (f["dst_task"] >= 0)].reset_index(drop=True)
            return self._flows

    def host_ops(self) -> pd.DataFrame:
        with self._lock:
            if self._host_ops is None:
                self._host_ops = read(self.run, "host_ops", HOST_OP_COLUMNS, required=("start_ns", "end_ns"),
                                      rank=self.rank)
            return self._host_ops


@dataclass
class LaneView:
    key: str
    label: str
    source: str
    mode: str                       # "tasks" (exact) or "busy" (per-pixel utilisation)
    n_tasks: int                    # tasks overlapping the window (an upper bound in busy mode)
    tasks: pd.DataFrame | None = None   # mode tasks: start_ns, end_ns, dur_ns, row, code, name, op, scope
    edges_ns: np.ndarray | None = None  # mode busy: bins + 1 edges
    busy: np.ndarray | None = None      # mode busy: fraction of each bin busy, 0..1
    starts: np.ndarray | None = None    # mode busy: tasks starting in each bin


@dataclass
class TimelineWindow:
    t0_ns: int
    t1_ns: int
    width_px: int
    lanes: list

    @property
    def exact(self) -> bool:
        """Every lane shows exact tasks."""
        return all(ln.mode == "tasks" for ln in self.lanes)

    @property
    def n_exact(self) -> int:
        return sum(len(ln.tasks) for ln in self.lanes if ln.mode == "tasks")


# -- loading ------------------------------------------------------------------------------------------
def _codes(col: pa.ChunkedArray) -> tuple[np.ndarray, list]:
    """A string column as (int32 codes, values), whatever its chunks' dictionaries (unified in Arrow, no
    per-row Python); a null is the value ""."""
    if col.num_chunks == 0:
        return np.zeros(0, np.int32), []
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)
    col = col.unify_dictionaries()
    values = ["" if v is None else v for v in col.chunk(0).dictionary.to_pylist()]
    idx = pa.chunked_array([ch.indices for ch in col.chunks], col.type.index_type)
    if col.null_count:
        if "" not in values:
            values.append("")
        idx = pc.fill_null(idx, values.index(""))
    codes = _np(idx)
    # the same string twice in the dictionary (a null and "") gets one code
    uniq = {}
    remap = np.array([uniq.setdefault(v, len(uniq)) for v in values] or [0], np.int32)
    if len(uniq) != len(values):
        codes = remap[codes]
        values = list(uniq)
    return codes.astype(np.int32, copy=False), values


def _read_uncached(run: Run, table: str, rank: int, columns: list, dictionary: list) -> pa.Table:
    """``columns`` of ``table`` straight from its Parquet files, the ``dictionary`` ones as Parquet's
    dictionary pages (no string per row is ever built) and kept out of the run's column cache: what the
    timeline reads once to build its lanes. FileNotFoundError when a file vanished (a compaction)."""
    parts = {c: [] for c in columns}
    for f in run.table_files(table, rank):
        try:
            names = pq.read_schema(f, memory_map=True).names
            pf = pq.ParquetFile(f, memory_map=True, read_dictionary=[c for c in dictionary if c in names])
            have = [c for c in columns if c in names]
            t = pf.read(columns=have, use_threads=True)
        except FileNotFoundError:
            raise
        except Exception:  # noqa: BLE001 - damaged or unusual: the run's own reader decides (and names the file)
            raise _Fallback from None
        for c in columns:
            if c in have:
                a = t.column(c)
                if c not in dictionary and pa.types.is_integer(a.type) and a.type != pa.int64():
                    a = pc.cast(a, pa.int64(), safe=False)  # as the cached reader does: huge unsigned wrap
            else:
                typ = pa.dictionary(pa.int32(), pa.string()) if c in dictionary else pa.int64()
                a = pa.chunked_array([pa.nulls(t.num_rows, typ)], typ)
            parts[c].extend(a.chunks)
    out = {}
    try:
        for c in columns:
            out[c] = _one_type(parts[c], c in dictionary)
    except (pa.ArrowException, ValueError, TypeError):
        raise _Fallback from None
    return pa.table(out)


class _Fallback(Exception):
    """The direct read cannot take this run's files: read them through the run's column cache instead."""


def _one_type(chunks: list, dictionary: bool) -> pa.ChunkedArray:
    if not chunks:
        return pa.chunked_array([], pa.dictionary(pa.int32(), pa.string()) if dictionary else pa.int64())
    types = {ch.type for ch in chunks}
    typ = next(iter(types))
    if len(types) > 1:  # e.g. a part file whose column is all null: one type for the chunked array
        typ = next((x for x in types if not pa.types.is_null(x)), typ)
        chunks = [ch if ch.type == typ else pc.cast(ch, typ) for ch in chunks]
    return pa.chunked_array(chunks, typ)


def _read_columns(run: Run, table: str, rank: int, columns: dict, required: tuple,
                  dictionary: tuple, cache: bool = True) -> pa.Table | None:
    """``columns`` (name -> default) of ``table`` from the run's column cache (``cache=False``: straight from
    the files, strings as dictionaries, see ``_read_uncached``): strings dictionary-encoded, numbers int64
    with nulls filled, absent columns filled with their default; None for an absent table."""
    names = run.schema_names(table, rank)
    if names is None:
        return None
    read(run, table, {}, required=required, rank=rank)  # a required column missing from any file: TraceError
    present = [c for c in columns if c in names]
    t = None
    if not cache:
        try:
            t = _read_uncached(run, table, rank, present, [c for c in present if c in dictionary])
        except (FileNotFoundError, _Fallback):  # compacted while read, or unusual files: the cached reader
            t = None
    if t is None:
        t = run.arrow(table, rank, present)
    n = t.num_rows if present else run.num_rows(table, rank)
    cols = {}
    for c, default in columns.items():
        if c in present:
            a = t.column(c)
            if isinstance(default, str):
                if pa.types.is_null(a.type):
                    a = pc.cast(a, pa.string())
                if not pa.types.is_dictionary(a.type):
                    a = pc.dictionary_encode(a)
            else:
                if not (pa.types.is_integer(a.type) or pa.types.is_floating(a.type) or pa.types.is_null(a.type)):
                    raise TraceError(f"run {run.name!r}: table {table}: column {c!r} holds {a.type}, expected numbers")
                a = pc.cast(a, pa.int64(), safe=False)
                if a.null_count:
                    a = pc.fill_null(a, default)
            cols[c] = a
        elif isinstance(default, str):
            cols[c] = pa.chunked_array([pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)),
                                                                       pa.array([default]))])
        else:
            cols[c] = pa.chunked_array([pa.array(np.full(n, default, np.int64))])
    return pa.table(cols)


def _read_task_table(run: Run, rank: int, columns: dict = DETAIL_COLUMNS) -> pa.Table:
    strings = tuple(c for c, d in columns.items() if isinstance(d, str))
    t = _read_columns(run, "tasks", rank, columns, ("start_ns", "end_ns"), strings)
    if t is None:
        return pa.table({c: pa.array([], pa.string() if isinstance(d, str) else pa.int64())
                         for c, d in columns.items()})
    return t  # chunked: ``take`` across chunks is cheap, combining 1M rows is not


def _read_rows(run: Run, rank: int, rows: np.ndarray, columns: dict) -> pa.Table:
    """Rows of ``tasks`` by global position, reading just the row groups that hold them."""
    return read_rows(run, "tasks", rows, columns, rank)


def _np(col: pa.ChunkedArray) -> np.ndarray:
    return col.to_numpy() if col.num_chunks != 1 else col.chunk(0).to_numpy(zero_copy_only=False)


def load_timeline(run: Run | str | os.PathLike, rank: int = 0) -> TimelineData:
    """Read the task times of ``run`` once and build its lanes (see the module docstring)."""
    from insight.analysis.steps import step_times

    run = as_run(run)
    lanes: list[Lane] = []
    row_lane = get_next = None
    n_tasks = 0
    index = _index_dir(run, rank)
    cached = _load_index(index) if index is not None else None
    t = None
    if cached is not None:
        lanes, row_lane, get_next, n_tasks = cached
    else:
        t = _read_columns(run, "tasks", rank, TASK_READ, ("start_ns", "end_ns"), ("graph", "kind", "stream", "phase"),
                          cache=False)
    if t is not None and t.num_rows:
        start, end = _np(t.column("start_ns")), _np(t.column("end_ns"))
        keep = (start >= 0) & (end >= 0)
        if np.any(end < start):
            end = np.maximum(end, start)
        stream, streams = _codes(t.column("stream"))
        graph, graphs = _codes(t.column("graph"))
        kind, kinds = _codes(t.column("kind"))
        phase, phases = _codes(t.column("phase"))
        del t  # the Arrow copies: only the numpy arrays from here on
        # colour code: phase, or "wait" for GetNext / events
        phase_code = np.array([PHASES.index(p) if p in PHASES else CODE_OTHER for p in phases] or [CODE_OTHER], np.int8)
        code = phase_code[phase] if len(phases) else np.full(len(start), CODE_OTHER, np.int8)
        is_wait = np.isin(kind, [i for i, k in enumerate(kinds) if k in WAIT_KINDS])
        code = np.where(is_wait, CODE_WAIT, code).astype(np.int8)
        # lane: the stream, and the sink feeder's host thread apart
        feeder = np.isin(graph, [i for i, g in enumerate(graphs) if g == FEEDER_GRAPH])
        host = [i for i, s in enumerate(streams) if s == "host"]
        feeder &= np.isin(stream, host)
        # lane ids in display order: streams (aicore0 .. host, then others), the feeder right after the host
        order = sorted(range(len(streams)), key=lambda i: (STREAM_ORDER.index(streams[i]) if streams[i] in STREAM_ORDER
                                                           else len(STREAM_ORDER), streams[i]))
        specs = []  # (key, label)
        lane_of_stream = np.zeros(max(1, len(streams)), np.int16)
        feeder_lane = -1
        for i in order:
            name = streams[i]
            lane_of_stream[i] = len(specs)
            specs.append((name or "(no stream)", name or "(no stream)"))
            if name == "host":
                feeder_lane = len(specs)
                specs.append(("host/feeder", "host · feeder (TransferData)"))
        lane = lane_of_stream[stream]
        if feeder_lane >= 0:
            lane[feeder] = feeder_lane
        lane[~keep] = len(specs)  # dropped: no start or end
        # rows by lane (a stable radix sort of small ints), then by start within a lane -- only the lanes whose
        # rows are not in time order already (writers append per stream in time order) are sorted
        rows = np.argsort(lane, kind="stable").astype(np.int32 if len(lane) < 2**31 else np.int64)
        bounds = np.searchsorted(lane[rows], np.arange(len(specs) + 1), side="left")
        row_lane = np.full(len(start), -1, np.int16)
        for j, (key, label) in enumerate(specs):
            r = rows[bounds[j]:bounds[j + 1]]
            if len(r):
                s_r = start[r]
                if np.any(s_r[1:] < s_r[:-1]):
                    o = np.argsort(s_r, kind="stable")
                    r, s_r = r[o], s_r[o]
                row_lane[r] = len(lanes)
                lanes.append(Lane(key, label, "tasks", s_r, end[r], r, code[r]))
        gn_code = [i for i, k in enumerate(kinds) if k == "get_next"]
        get_next = np.flatnonzero(np.isin(kind, gn_code) & keep) if gn_code else np.zeros(0, np.int64)
        get_next = get_next[np.argsort(start[get_next], kind="stable")]
        del start, end, stream, graph, kind, phase, code, lane, rows
        n_tasks = int(keep.sum())
        if index is not None and n_tasks >= INDEX_MIN_TASKS:
            _save_index(index, list(lanes), row_lane, get_next, n_tasks)
    ho = read(run, "host_ops", HOST_OP_COLUMNS, required=("start_ns", "end_ns"), rank=rank)
    if len(ho):
        s, e = ho["start_ns"].to_numpy(np.int64), ho["end_ns"].to_numpy(np.int64)
        rows = np.flatnonzero((s >= 0) & (e >= 0))
        rows = rows[np.argsort(s[rows], kind="stable")]
        lanes.append(Lane("host/pynative", "host · PyNative ops", "host_ops", s[rows], np.maximum(e[rows], s[rows]),
                          rows.astype(np.int64), np.full(len(rows), CODE_HOST_OP, np.int8)))
    steps = step_times(run, rank)
    steps = steps[(steps["start_ns"] >= 0) & (steps["end_ns"] >= steps["start_ns"])].reset_index(drop=True)
    if len(steps):
        s = steps["start_ns"].to_numpy(np.int64)
        rows = np.argsort(s, kind="stable").astype(np.int64)
        codes = np.where(np.arange(len(rows)) % 2 == 0, CODE_STEP_EVEN, CODE_STEP_ODD).astype(np.int8)
        lanes.insert(0, Lane("steps", "Steps", "steps", s[rows], steps["end_ns"].to_numpy(np.int64)[rows], rows,
                             codes))
    phases = step_phases(steps, lanes)
    if len(phases):
        lanes.insert(1, Lane("steps/phases", "Steps", "phases", phases["start_ns"].to_numpy(np.int64),
                             phases["end_ns"].to_numpy(np.int64), np.arange(len(phases), dtype=np.int64),
                             phases["code"].to_numpy(np.int8)))
    if row_lane is not None:  # task lanes moved down by the lanes inserted before them
        shift = sum(ln.source in ("steps", "phases") for ln in lanes)
        row_lane = np.where(row_lane >= 0, row_lane + shift, -1).astype(np.int16)
    t_min = min((int(ln.start[0]) for ln in lanes if len(ln)), default=0)
    t_max = max((int(ln.reach[-1]) for ln in lanes if len(ln)), default=0)
    return TimelineData(run=run, rank=rank, lanes=lanes, steps=steps, t_min=t_min, t_max=max(t_max, t_min + 1),
                        n_tasks=n_tasks, phases=phases, row_lane=row_lane, get_next=get_next)


def step_phases(steps: pd.DataFrame, lanes: list) -> pd.DataFrame:
    """Each step cut into its phases, in order and without gaps (zero-length ones left out):

    * ``data wait``: the step's start -> ``fp_start`` (the iteration interval: GetNext, the input copy);
    * ``forward``: ``fp_start`` -> the first backward-phase task of the step (on any stream);
    * ``backward``: -> ``bp_end``;
    * ``update``: ``bp_end`` -> the end of the last update-phase task starting before the step's end;
    * ``tail``: -> the step's end (whatever follows: the AllReduce wait, host work).

    Without phase annotations the forward runs to ``bp_end`` and the tail from there. Columns: ``step_row``
    (row of ``steps``), ``step``, ``phase``, ``code`` (colour code), ``start_ns``, ``end_ns``."""
    cols = ["step_row", "step", "phase", "code", "start_ns", "end_ns"]
    if steps is None or not len(steps):
        return pd.DataFrame({c: [] for c in cols})
    start = steps["start_ns"].to_numpy(np.int64)
    fp = np.clip(steps["fp_start_ns"].to_numpy(np.int64), start, None)
    end = steps["end_ns"].to_numpy(np.int64)
    bp = np.clip(steps["bp_end_ns"].to_numpy(np.int64), fp, end)
    fp = np.minimum(fp, bp)
    big = np.iinfo(np.int64).max
    bwd = np.full(len(start), big)
    upd = np.full(len(start), -1, np.int64)
    for ln in lanes:
        if ln.source != "tasks" or not len(ln):
            continue
        b = ln.start[ln.code == 1]
        if len(b):
            k = np.searchsorted(b, fp, side="left")
            cand = b[np.minimum(k, len(b) - 1)]
            bwd = np.where((k < len(b)) & (cand < bp), np.minimum(bwd, cand), bwd)
        m = ln.code == 2
        us, ue = ln.start[m], ln.end[m]
        if len(us):
            ue = np.maximum.accumulate(ue)
            k = np.searchsorted(us, end, side="left") - 1
            kk = np.maximum(k, 0)
            upd = np.where((k >= 0) & (us[kk] >= bp), np.maximum(upd, ue[kk]), upd)
    bwd = np.where(bwd == big, bp, bwd)
    upd = np.clip(np.where(upd < 0, bp, upd), bp, end)
    edges = np.stack([start, fp, bwd, bp, upd, end], axis=1)  # the five phases' boundaries per step
    n, k = len(start), len(STEP_PHASES)
    s_, e_ = edges[:, :-1].ravel(), edges[:, 1:].ravel()
    keep = e_ > s_
    row = np.repeat(np.arange(n), k)[keep]
    out = pd.DataFrame({
        "step_row": row, "step": steps["step"].to_numpy()[row],
        "phase": np.tile(np.array([p for p, _ in STEP_PHASES], dtype=object), n)[keep],
        "code": np.tile(np.array([c for _, c in STEP_PHASES], np.int8), n)[keep],
        "start_ns": s_[keep], "end_ns": e_[keep]})
    return out.sort_values("start_ns", kind="stable").reset_index(drop=True)


# -- level of detail -------------------------------------------------------------------------------------
def timeline_window(run, t0_ns: int, t1_ns: int, width_px: int, max_tasks: int = MAX_TASKS,
                    per_px: float = PER_PX, details: bool = True, rank: int = 0) -> TimelineWindow:
    """The view of ``[t0_ns, t1_ns)`` drawn ``width_px`` pixels wide: per lane, exact tasks or per-pixel
    busy bins (module docstring). ``run`` is a ``TimelineData`` (cheap: what the dashboard passes) or a
    run / path (read first). ``details``: add name, op and scope to exact tasks."""
    data = run if isinstance(run, TimelineData) else load_timeline(run, rank)
    t0, t1 = int(t0_ns), int(t1_ns)
    if t1 <= t0:
        t1 = t0 + 1
    width = max(1, int(width_px))
    limit = int(per_px * width)
    spans = [ln.span(t0, t1) for ln in data.lanes]
    counts = [hi - lo for lo, hi in spans]
    exact = [c <= limit for c in counts]
    # all exact lanes together stay under max_tasks: the fullest ones fall back to busy bins
    for i in sorted(range(len(counts)), key=lambda i: -counts[i]):
        if sum(c for c, x in zip(counts, exact) if x) <= max_tasks:
            break
        exact[i] = False
    edges = None
    out = []
    for ln, (lo, hi), n, ex in zip(data.lanes, spans, counts, exact):
        if ex:
            s, e = ln.start[lo:hi], ln.end[lo:hi]
            m = (e > t0) | (s >= t0)
            df = pd.DataFrame({"start_ns": s[m], "end_ns": e[m], "dur_ns": e[m] - s[m], "row": ln.row[lo:hi][m],
                               "code": ln.code[lo:hi][m]})
            if details:
                df = _with_names(data, ln, df)
            out.append(LaneView(ln.key, ln.label, ln.source, "tasks", len(df), tasks=df))
        else:
            if edges is None:
                edges = np.unique(np.linspace(t0, t1, width + 1).round().astype(np.int64))
            b = ln.busy_until(edges)
            span = np.diff(edges)
            busy = np.divide(np.diff(b), span, out=np.zeros(len(span)), where=span > 0).clip(0, 1)
            starts = np.diff(np.searchsorted(ln.start, edges, side="left"))
            out.append(LaneView(ln.key, ln.label, ln.source, "busy", n, edges_ns=edges, busy=busy, starts=starts))
    return TimelineWindow(t0, t1, width, out)


def _with_names(data: TimelineData, ln: Lane, df: pd.DataFrame) -> pd.DataFrame:
    rows = df["row"].to_numpy()
    if ln.source == "tasks" and data.n_tasks > NAMES_IN_MEMORY:  # read the window's rows only
        t = data.task_rows(rows, NAME_COLUMNS) if len(rows) else None
        for c in ("name", "op", "scope"):
            df[c] = np.asarray(t.column(c).to_pylist(), dtype=object) if t is not None else \
                np.array([], dtype=object)
    elif ln.source == "tasks":
        names = data.names()
        for c in ("name", "op", "scope"):
            codes, values = names[c]
            df[c] = values[codes[rows]] if len(rows) else np.array([], dtype=object)
    elif ln.source == "host_ops":
        ho = data.host_ops()
        for c in ("name", "op", "scope"):
            df[c] = ho[c].to_numpy()[rows] if len(rows) else []
        df["name"] = np.where(df["name"] == "", df["op"], df["name"]) if len(rows) else df["name"]
    elif ln.source == "phases":
        ph = data.phases
        df["name"] = ph["phase"].to_numpy()[rows] if len(rows) else []
        df["op"] = [f"step {int(s)}" for s in ph["step"].to_numpy()[rows]]
        df["scope"] = ""
    else:  # steps
        st = data.steps
        df["name"] = [f"step {int(s)}" for s in st["step"].to_numpy()[rows]]
        df["op"] = "step"
        df["scope"] = ""
    return df


def task_details(run, source: str, row: int) -> dict:
    """Every field of one task (or host op, or step) as a plain dict, for a details panel."""
    data = run if isinstance(run, TimelineData) else load_timeline(run)
    df = data.details(source, [int(row)])
    if df.empty:
        return {}
    rec = df.iloc[0].to_dict()
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in rec.items()}


# -- flows ------------------------------------------------------------------------------------------------
@dataclass
class Flow:
    """A link between two tasks (rows of ``tasks``): ``cat`` says which kind."""
    cat: str
    src: int
    dst: int


def task_flows(data: TimelineData, source: str, row: int) -> list[Flow]:
    """The flows into and out of one task (module docstring): an imported run's ``flows`` table (else its
    ``launch_task`` column); for our own runs TransferData -> GetNext (the k-th transfer feeds the k-th GetNext:
    the device queue is FIFO) and a step's host input copy -> the step's first device task."""
    if source != "tasks" or data.run is None or data.row_lane is None:
        return []
    row = int(row)
    if not 0 <= row < len(data.row_lane) or data.row_lane[row] < 0:
        return []
    ft = data.flows_table()
    if len(ft):
        m = (ft["src_task"].to_numpy() == row) | (ft["dst_task"].to_numpy() == row)
        return [Flow(str(c), int(a), int(b)) for c, a, b in ft.loc[m, ["cat", "src_task", "dst_task"]].itertuples(
            index=False)][:64]
    names = data.run.schema_names("tasks", data.rank) or []
    if "launch_task" in names:  # imported without a flows table: device work names its launch
        cols = {"launch_task": -1}
        launch = int(data.task_rows([row], cols).column("launch_task")[0].as_py())
        out = [Flow("launch", launch, row)] if launch >= 0 else []
        return out  # the launches of a runtime call: in the flows table when the trace had them
    rec = data.task_rows([row], {"kind": "", "stream": "", "graph": "", "step": -1, "start_ns": -1}).to_pylist()[0]
    lane = data.lanes[int(data.row_lane[row])]
    out = []
    gn = data.get_next if data.get_next is not None else np.zeros(0, np.int64)
    if lane.key == "host/feeder" and rec["kind"] == "memcpy_h2d":
        k = int(np.flatnonzero(lane.row == row)[0])  # the lane is in start order: the k-th transfer
        if k < len(gn):
            out.append(Flow("TransferData -> GetNext", row, int(gn[k])))
    elif rec["kind"] == "get_next":
        k = int(np.flatnonzero(gn == row)[0]) if np.any(gn == row) else -1
        feeder = next((ln for ln in data.lanes if ln.key == "host/feeder"), None)
        if feeder is not None and 0 <= k < len(feeder):
            out.append(Flow("TransferData -> GetNext", int(feeder.row[k]), row))
    elif rec["stream"] == "host" and rec["kind"] == "memcpy_h2d":
        dst = _first_device_task(data, rec["start_ns"], data.step_range(rec["step"]) if rec["step"] >= 0 else None)
        if dst >= 0:
            out.append(Flow("input copy -> first device task", row, dst))
    return out


def _first_device_task(data: TimelineData, t: int, step: tuple | None) -> int:
    """The row of the earliest device task (not a wait) starting at or after ``t`` within ``step``, else -1."""
    best, best_t = -1, None
    limit = step[1] if step else None
    for ln in data.lanes:
        if ln.source != "tasks" or ln.key.startswith("host"):
            continue
        k = int(np.searchsorted(ln.start, t, side="left"))
        while k < len(ln) and ln.code[k] == CODE_WAIT:
            k += 1
        if k < len(ln) and (limit is None or ln.start[k] < limit) and (best_t is None or ln.start[k] < best_t):
            best, best_t = int(ln.row[k]), int(ln.start[k])
    return best


# -- the lane index on disk ----------------------------------------------------------------------------------
# Building the lanes of a run of 10M tasks reads and sorts ~200 MB; doing it once per run, not once per server
# process, is what keeps a fresh server's first view fast. The task lanes (start, end, row, code, busy
# intervals), the row -> lane map and the GetNext rows are written as .npy files to the user's cache dir,
# keyed by the run's real path, the rank and every tasks file's size and mtime (a run that changes gets a new
# key; the old index is removed then), and memory-mapped when read: a view touches only the pages its binary
# searches and its window need, so the server's memory stays far below the index's size.
INDEX_VERSION = 1
_LANE_ARRAYS = ("start", "end", "row", "code", "reach", "busy_start", "busy_len", "busy_cum")


def prepare_index(run: Run | str | os.PathLike, rank: int = 0) -> bool:
    """Build the on-disk lane index of a run of at least INDEX_MIN_TASKS tasks ahead of its first view (the
    dashboard calls it in the background for the runs it discovers), so the first view does not pay for
    reading and sorting every task. True when the run has an index (now or already); False for smaller
    runs, which need none, and runs without tasks."""
    run = as_run(run)
    index = _index_dir(run, rank)
    if index is None or run.num_rows("tasks", rank) < INDEX_MIN_TASKS:
        return False
    if not (index / "meta.json").exists():
        load_timeline(run, rank)  # builds the lanes and writes the index (its own thread, atomically)
    return True


def _index_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "insight" / "timeline"


def _index_dir(run: Run, rank: int) -> Path | None:
    """The index directory of this version of the run's tasks (None: no tasks table)."""
    files = run.table_files("tasks", rank)
    if not files:
        return None
    try:
        stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    except OSError:
        return None
    who = hashlib.sha1(f"{run.real}\x00{int(rank)}".encode()).hexdigest()[:16]
    what = hashlib.sha1(json.dumps([INDEX_VERSION, stamp]).encode()).hexdigest()[:16]
    return _index_root() / f"{who}-{what}"


def _save_index(path: Path, lanes: list, row_lane, get_next, n_tasks: int) -> None:
    """Write the task lanes to ``path`` in the background (atomically: a temporary directory renamed)."""
    def write():
        tmp = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
            meta = {"version": INDEX_VERSION, "n_tasks": int(n_tasks), "lanes": []}
            for i, ln in enumerate(lanes):
                same = {"reach": ln.reach is ln.end, "busy_start": ln.busy_start is ln.start}
                for a in _LANE_ARRAYS:
                    if not same.get(a):
                        np.save(tmp / f"L{i}_{a}.npy", np.ascontiguousarray(getattr(ln, a)), allow_pickle=False)
                meta["lanes"].append({"key": ln.key, "label": ln.label, "source": ln.source, "n": len(ln), **same})
            np.save(tmp / "row_lane.npy", row_lane, allow_pickle=False)
            np.save(tmp / "get_next.npy", np.asarray(get_next, np.int64), allow_pickle=False)
            (tmp / "meta.json").write_text(json.dumps(meta))
            who = path.name.split("-")[0]
            for old in path.parent.glob(f"{who}-*"):  # earlier versions of this run
                if old != path:
                    shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, path)
            tmp = None
        except OSError:
            pass  # no cache (read-only home, a full disk): the next server builds the lanes again
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    # not a daemon: a process that exits meanwhile finishes the index rather than leaving half of it
    threading.Thread(target=write, name="insight-timeline-index", daemon=False).start()


def _load_index(path: Path):
    """(task lanes, row_lane, get_next, n_tasks) memory-mapped from an index, or None (absent or damaged)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("version") != INDEX_VERSION:
            return None
        lanes = []
        for i, m in enumerate(meta["lanes"]):
            ln = object.__new__(Lane)
            ln.key, ln.label, ln.source = str(m["key"]), str(m["label"]), str(m["source"])
            for a in _LANE_ARRAYS:
                if a == "reach" and m.get("reach"):
                    continue
                if a == "busy_start" and m.get("busy_start"):
                    continue
                setattr(ln, a, np.load(path / f"L{i}_{a}.npy", mmap_mode="r", allow_pickle=False))
            if m.get("reach"):
                ln.reach = ln.end
            if m.get("busy_start"):
                ln.busy_start = ln.start
            n = int(m["n"])
            if not (len(ln.start) == len(ln.end) == len(ln.row) == len(ln.code) == len(ln.reach) == n
                    and len(ln.busy_start) == len(ln.busy_len) == len(ln.busy_cum)):
                return None
            lanes.append(ln)
        row_lane = np.load(path / "row_lane.npy", mmap_mode="r", allow_pickle=False)
        get_next = np.load(path / "get_next.npy", allow_pickle=False)
        return lanes, row_lane, get_next, int(meta["n_tasks"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
