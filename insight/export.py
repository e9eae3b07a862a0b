"""Exports of a run: Chrome trace-event JSON (Perfetto, chrome://tracing) and CSV tables.

``export_chrome`` streams: it reads each table one Parquet record batch at a time (row groups of the
compacted file, or the part files of a run still recording) and formats a batch's events column-wise
with Arrow compute, writing the resulting bytes straight to the file -- so a run of millions of tasks
exports in memory bounded by one batch, and quickly.

Layout of the trace (PyTorch's exporter conventions):

* a process per device (``pid`` = rank) and one for the host (``pid`` = 1000 + rank), named and sorted by
  ``M`` events; a named thread per stream (``tid`` = stream id), a ``Steps`` thread on the device;
* one ``X`` event per task (``cat`` = task kind, ``ts``/``dur`` in microseconds with 3 decimals,
  relative to the run start, whose ``perf_counter_ns`` reading is ``baseTimeNanoseconds``);
* step slices (``cat`` ``step``) with the step trace's phases nested in them (``step_phase``);
* flows ``s`` -> ``f`` (``"bp": "e"``) from the sink feeder's ``TransferData`` to the ``GetNext`` that
  dequeues that batch, and from a step's host input copy to the step's first device task;
* counters (``C``): device memory in use, host memory, device-queue depth, host-queue depth;
* PyNative host ops (``host_ops``) as ``X`` events of ``cat`` ``host_op`` on the host.

Every string is written with ``json.dumps``, so names with quotes or control characters stay valid JSON.
"""
from __future__ import annotations

import errno
import gzip as _gzip
import json
import os
import sys
import tempfile
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from insight.analysis._io import as_run, bad_file, rel, table_files, task_columns
from insight.analysis.steps import step_times, summarize
from insight.trace import Run, TraceError

BATCH_ROWS = 16_384  # rows per record batch: bounds the memory of reading and formatting
HOST_PID_BASE = 1000
STREAM_TIDS = {"aicore0": 0, "aicore1": 1, "aicpu": 2, "comm": 3, "host": 4}
STEPS_TID = 100
PYNATIVE_TID = 200
TASK_COLUMNS = task_columns("step", "graph", "task_id", "name", "op", "kind", "stream", "scope", "phase", "start_ns",
                            "end_ns", "flops", "shape", "dtype")


MAX_NAME_BYTES = 120  # a file name made from a run's name: well under every file system's 255-byte limit
CSV_TABLES = ("step_breakdown", "step_summary", "op_stats", "op_type_stats", "data_pipeline_ops",
              "data_pipeline_summary", "device_queue_per_step", "memory_timeline", "memory_peak", "memory_peak_tensors",
              "recommendations")


class ExportError(ValueError):
    """The export cannot be written where asked (inside the run, an existing file without overwrite, a
    missing parent directory, a directory where a file is expected, a place that cannot be written)."""


@dataclass
class ExportResult:
    path: Path
    events: int
    task_events: int
    bytes: int


# -- where an export may be written ----------------------------------------------------------------------
def safe_filename(name, suffix: str = "", fallback: str = "run") -> str:
    """``name`` (e.g. a run's name from its manifest, which anyone can edit) as ONE harmless file name in
    the current directory: no path separators, no ``..``, no leading dot or dash, no control characters,
    at most ``MAX_NAME_BYTES`` bytes of UTF-8 before ``suffix``."""
    text = unicodedata.normalize("NFC", name if isinstance(name, str) else str(name))
    out = "".join(ch if (ch.isalnum() or ch in "-_.+=@,") else "_" for ch in text)
    out = out.lstrip(".-_") or fallback
    raw = out.encode("utf-8")[:MAX_NAME_BYTES]
    out = raw.decode("utf-8", errors="ignore").rstrip(".") or fallback
    return out + suffix


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_output(run: Run, out, *, directory: bool = False, overwrite: bool = False) -> Path:
    """Validate an export destination before anything is computed; returns it as a Path.

    Refuses (``ExportError``, one line naming the path): a destination inside the run directory (an
    export must never replace a run's own files), a missing parent directory (never created silently),
    a parent that is not a directory, a directory where a file is expected (or a file where a directory
    is), and an existing file unless ``overwrite``. Whether the place is writable is found out when the
    file is created (``ExportError`` too)."""
    if out is None or str(out) == "" or "\x00" in str(out):
        raise ExportError(f"invalid output path {str(out)!r}")
    out = Path(out)
    try:
        real = out.resolve()
        run_root = Path(run.path).resolve()
    except (OSError, RuntimeError) as e:  # e.g. a symlink loop
        raise ExportError(f"cannot resolve the output path {str(out)!r}: {e}") from None
    if _inside(real, run_root):
        raise ExportError(f"refusing to write {str(out)!r}: it is inside the run directory {str(run.path)!r} "
                          f"(an export never replaces a run's files); choose a path outside it")
    parent = real.parent
    if not parent.exists():
        raise ExportError(f"cannot write {str(out)!r}: the directory {str(out.parent)!r} does not exist "
                          f"(create it first)")
    if not parent.is_dir():
        raise ExportError(f"cannot write {str(out)!r}: {str(out.parent)!r} is not a directory")
    if directory:
        if real.exists() and not real.is_dir():
            raise ExportError(f"cannot write CSV files to {str(out)!r}: it exists and is not a directory")
        if real.is_dir() and not overwrite:
            clash = [f"{t}.csv" for t in CSV_TABLES if (real / f"{t}.csv").exists()]
            if clash:
                raise ExportError(f"{str(out)!r} already holds {clash[0]}" + (f" and {len(clash) - 1} more CSV files"
                                  if len(clash) > 1 else "") + "; pass --force to overwrite them")
    else:
        if real.is_dir():
            raise ExportError(f"cannot write {str(out)!r}: it is a directory; give a file name")
        if real.exists() and not overwrite:
            raise ExportError(f"{str(out)!r} exists; pass --force to overwrite it")
    return out


def _temp_beside(out: Path):
    """A new temporary file next to ``out`` (same file system, so the final rename is atomic)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name[:80]}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise _write_error(out, e) from None
    return os.fdopen(fd, "wb"), Path(tmp)


def _write_error(out: Path, e: OSError) -> ExportError:
    what = e.strerror or type(e).__name__
    if e.errno == errno.ENOENT:  # e.g. /proc: the directory exists but nothing can be created in it
        what = "nothing can be created in that directory"
    return ExportError(f"cannot write {str(out)!r}: {what}")


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished temporary file to ``out``; without ``overwrite`` never replace a file that
    appeared meanwhile (a hard link fails if the name exists)."""
    if not overwrite:
        try:
            os.link(tmp, out)
        except FileExistsError:
            raise ExportError(f"{str(out)!r} exists; pass --force to overwrite it") from None
        except OSError:  # no hard links on this file system: check, then rename
            if out.exists():
                raise ExportError(f"{str(out)!r} exists; pass --force to overwrite it") from None
            os.replace(tmp, out)
            return
        tmp.unlink()
        return
    os.replace(tmp, out)


# -- reading record batches -----------------------------------------------------------------------------
def _batches(run: Run, table: str, rank: int, columns: dict, required=(), keep_dict=()):
    """Yields ``(rows, {column: Arrow array})`` (defaults filled in), one per Parquet record batch.
    Columns in ``keep_dict`` are read dictionary-encoded (names repeat: far less memory) and stay so."""
    for f in table_files(run, table, rank):
        try:
            names = pq.read_schema(f).names
            pf = pq.ParquetFile(f, read_dictionary=[c for c in keep_dict if c in names])
        except Exception as e:  # noqa: BLE001
            raise bad_file(run, f, e) from None
        missing = [c for c in required if c not in names]
        if missing:
            raise TraceError(f"run {run.name!r}: {rel(run, f)} has no column {', '.join(map(repr, missing))}")
        present = [c for c in columns if c in names]
        it = pf.iter_batches(batch_size=BATCH_ROWS, columns=present)
        while True:
            try:
                b = next(it)
            except StopIteration:
                break
            except Exception as e:  # noqa: BLE001
                raise bad_file(run, f, e) from None
            n = b.num_rows
            out = {}
            for c, default in columns.items():
                if c in names:
                    out[c] = _column(run, f, c, b.column(c), default, c in keep_dict)
                else:
                    out[c] = pa.array(np.full(n, default)) if not isinstance(default, str) else pa.array([default] * n,
                                                                                                          pa.string())
            yield n, out


def _column(run: Run, f: Path, name: str, a: pa.Array, default, keep_dict: bool) -> pa.Array:
    """Column ``name`` of a batch as the exporter needs it: strings as strings (dictionary-encoded when
    ``keep_dict``), numbers as int64, nulls replaced by ``default``. A column of the wrong kind (text
    where the trace format has integers, nested values) is a TraceError naming the file and column."""
    t = a.type
    if isinstance(default, str):
        if pa.types.is_dictionary(t):
            if not (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)):
                a, t = a.cast(t.value_type), t.value_type
            elif not keep_dict:
                a, t = a.cast(pa.string()), pa.string()
        if not pa.types.is_dictionary(t):
            if pa.types.is_large_string(t) or pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
                a = a.cast(pa.string())
            elif not pa.types.is_string(t):
                raise TraceError(f"run {run.name!r}: {rel(run, f)}: column {name!r} holds {t}, expected text")
        return pc.fill_null(a, default) if a.null_count else a
    if pa.types.is_dictionary(t):
        t = t.value_type
        a = a.cast(t)
    if pa.types.is_boolean(t):
        a = a.cast(pa.int64())
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        try:
            a = a.cast(pa.int64())  # safe: a fractional, NaN or out-of-range value is an error, not a guess
        except (pa.ArrowInvalid, OverflowError):
            raise TraceError(f"run {run.name!r}: {rel(run, f)}: column {name!r} holds values that are not "
                             f"int64 integers") from None
    else:
        raise TraceError(f"run {run.name!r}: {rel(run, f)}: column {name!r} holds {t}, expected integers")
    return pc.fill_null(a, int(default)) if a.null_count else a


def _rows(run: Run, table: str, rank: int) -> int:
    total = 0
    for f in table_files(run, table, rank):
        try:
            total += pq.ParquetFile(f).metadata.num_rows
        except Exception as e:  # noqa: BLE001
            raise bad_file(run, f, e) from None
    return total


def _np(a: pa.Array) -> np.ndarray:
    return a.to_numpy(zero_copy_only=False)


# -- vectorised JSON formatting ---------------------------------------------------------------------------
class _Strings:
    """JSON-escaped string columns, escaping each distinct value once per export."""

    def __init__(self):
        self.cache: dict[str, str] = {}

    def __call__(self, a: pa.Array) -> pa.Array:
        enc = a if pa.types.is_dictionary(a.type) else pc.dictionary_encode(a.cast(pa.string()))
        if isinstance(enc, pa.ChunkedArray):
            enc = enc.combine_chunks()
        cache = self.cache
        vals = []
        for v in enc.dictionary.to_pylist():
            s = cache.get(v)
            if s is None:
                s = cache[v] = json.dumps("" if v is None else v, ensure_ascii=False)
            vals.append(s)
        return pc.take(pa.array(vals, pa.string()), enc.indices)


def _ints(a) -> pa.Array:
    return pc.cast(pa.array(a) if isinstance(a, np.ndarray) else a, pa.string())


def _us(ns: np.ndarray) -> pa.Array:
    """Integer nanoseconds -> microseconds with exactly three decimals, no float rounding."""
    ns = np.asarray(ns, np.int64)
    neg = ns < 0
    a = np.where(neg, -(ns + 1), ns).astype(np.uint64) + neg.astype(np.uint64)  # |INT64_MIN| fits in uint64
    whole = pc.cast(pa.array(a // 1000), pa.string())
    frac = pc.utf8_lpad(pc.cast(pa.array(a % 1000), pa.string()), width=3, padding="0")
    sign = pc.if_else(pa.array(neg), "-", "")
    return pc.binary_join_element_wise(sign, whole, ".", frac, "")


def _join(*pieces) -> pa.Array:
    return pc.binary_join_element_wise(*pieces, "")


def _dump(v) -> str:
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def _us1(ns: int) -> str:
    a = abs(int(ns))
    return f"{'-' if ns < 0 else ''}{a // 1000}.{a % 1000:03d}"


def _timed(ev: dict, ts_ns: int, dur_ns: int | None = None) -> str:
    """``ev`` as JSON with ``ts`` (and ``dur``) written as exact microsecond decimals."""
    times = f'"ts":{_us1(ts_ns)},' + (f'"dur":{_us1(dur_ns)},' if dur_ns is not None else "")
    return "{" + times + _dump(ev)[1:]


class _Writer:
    def __init__(self, f, bar):
        self.f, self.bar = f, bar
        self.events = 0
        self.first = True

    def event(self, ev: dict | str) -> None:
        text = ev if isinstance(ev, str) else _dump(ev)
        self.f.write(((",\n" if not self.first else "\n") + text).encode())
        self.first = False
        self.events += 1

    def lines(self, arr: pa.Array, n: int) -> None:
        """``arr``: one JSON event per element, each starting with ",\\n"; written as one buffer."""
        if n == 0:
            return
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        offsets = np.frombuffer(arr.buffers()[1], np.int32, count=len(arr) + 1, offset=arr.offset * 4)
        data = arr.buffers()[2]
        if self.first:  # the very first event carries no separator; M events are always written first
            raise AssertionError("metadata events must come first")
        self.f.write(memoryview(data)[offsets[0]:offsets[-1]])
        self.events += n
        self.bar.update(n)


# -- the exporter --------------------------------------------------------------------------------------
def export_chrome(run: Run | str | os.PathLike, out_path: str | os.PathLike, gzip: bool = False,
                  progress: bool = False, overwrite: bool = True) -> ExportResult:
    """Write the run as Chrome trace-event JSON (``gzip=True``: gzip-compressed, which Perfetto opens).
    Written to a temporary file and renamed, so a failed export leaves no half file behind.
    ``check_output`` rules apply (never inside the run, parent must exist); ``overwrite=False`` refuses an
    existing file (the CLI's default; ``--force`` overwrites)."""
    run = as_run(run)
    out_path = check_output(run, out_path, overwrite=overwrite)
    total = sum(_rows(run, t, r) for r in run.ranks for t in ("tasks", "memory", "device_queue", "host_ops"))
    raw, tmp = _temp_beside(out_path)
    f = _gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=5, mtime=0) if gzip else raw
    try:
        try:
            with tqdm(total=total, unit="ev", disable=not progress, file=sys.stderr, desc="export",
                      leave=False) as bar:
                w = _Writer(f, bar)
                m = _manifest(run)
                header = {"displayTimeUnit": "ms", "baseTimeNanoseconds": _int_or(m.get("start_perf_ns"), 0),
                          "metadata": {"run": _text(run.name), "run_id": _text(m.get("run_id")),
                                       "created": _text(m.get("created")), "status": _text(m.get("status")),
                                       "schema_version": _int_or(m.get("schema_version"), None),
                                       "device": {"target": _target(run),
                                                  "capacity_bytes": _int_or(_device(run).get("capacity_bytes"), 0)},
                                       "exporter": "insight"}}
                f.write((_dump(header)[:-1] + ',"traceEvents":[').encode())
                task_events = 0
                for rank in run.ranks:
                    task_events += _export_rank(run, rank, w)
                f.write(b"\n]}\n")
            if gzip:
                f.close()
            raw.close()
        except OSError as e:  # e.g. the disk filled up
            raise _write_error(out_path, e) from None
        _publish(tmp, out_path, overwrite)
    except BaseException:
        try:
            if gzip:
                f.close()
            raw.close()
        except OSError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        raise
    return ExportResult(out_path, w.events, task_events, out_path.stat().st_size)


# The manifest is edited by hand and copied around: take from it only values of the expected kind (a
# deeply nested or oddly typed field must never reach json.dumps or str()).
def _manifest(run: Run) -> dict:
    m = run.manifest
    return m if isinstance(m, dict) else {}


def _text(v, limit: int = 1000) -> str:
    return v[:limit] if isinstance(v, str) else ""


def _device(run: Run) -> dict:
    d = _manifest(run).get("device")
    return d if isinstance(d, dict) else {}


def _target(run: Run) -> str:
    return _text(_device(run).get("target"), 100) or "device"


def _stream_names(run: Run) -> list[str]:
    s = _manifest(run).get("streams")
    return [_text(x.get("name"), 100) for x in s if isinstance(x, dict)] if isinstance(s, list) else []


def _int_or(v, default: int) -> int:
    """An int from a manifest field that should hold one (anything else -> ``default``)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and -2**63 <= v < 2**63 else default


def _dur(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """``max(end - start, 0)`` without int64 overflow (absurd times still give a valid document)."""
    start, end = np.asarray(start, np.int64), np.asarray(end, np.int64)
    d = end.astype(np.uint64) - start.astype(np.uint64)  # exact modulo 2**64; the true value when end >= start
    return np.where(end > start, np.minimum(d, np.uint64(2**63 - 1)), 0).astype(np.int64)


def _export_rank(run: Run, rank: int, w: _Writer) -> int:
    dev_pid, host_pid = rank, HOST_PID_BASE + rank
    target = _target(run)
    for pid, name, order in ((dev_pid, f"{target} {rank} (device)", 2 * rank),
                             (host_pid, f"host (rank {rank})", 2 * rank + 1)):
        w.event({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}})
        w.event({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": order}})
    threads: set = set()
    tids = dict(STREAM_TIDS)

    def thread(pid, tid, name, order=None):
        if (pid, tid) in threads:
            return
        threads.add((pid, tid))
        w.event({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": name}})
        w.event({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                 "args": {"sort_index": tid if order is None else order}})

    for name in _stream_names(run):
        tids.setdefault(name, len(tids))
        thread(host_pid if name == "host" else dev_pid, tids[name], name)
    thread(dev_pid, STEPS_TID, "Steps", -1)
    esc = _Strings()
    flows = _flows(run, rank)
    n_tasks = 0
    for n, c in _batches(run, "tasks", rank, TASK_COLUMNS, required=("name", "start_ns", "end_ns"),
                         keep_dict=("graph", "name", "op", "kind", "scope", "phase", "shape", "dtype")):
        stream = c["stream"]
        for name in pc.unique(stream).to_pylist():
            tids.setdefault(name, len(tids))
            thread(host_pid if name == "host" else dev_pid, tids[name], name or "(no stream)")
        names = pa.array(list(tids), pa.string())
        tid = pc.take(pa.array(list(tids.values()), pa.int64()), pc.index_in(stream, value_set=names))
        pid = pc.if_else(pc.equal(stream, "host"), host_pid, dev_pid)
        start, end = _np(c["start_ns"]), _np(c["end_ns"])
        line = _join(',\n{"ph":"X","cat":', esc(c["kind"]), ',"name":', esc(c["name"]), ',"pid":', _ints(pid),
                     ',"tid":', _ints(tid), ',"ts":', _us(start), ',"dur":', _us(_dur(start, end)),
                     ',"args":{"op":', esc(c["op"]), ',"step":', _ints(c["step"]), ',"task_id":', _ints(c["task_id"]),
                     ',"graph":', esc(c["graph"]), ',"scope":', esc(c["scope"]), ',"phase":', esc(c["phase"]),
                     ',"shape":', esc(c["shape"]), ',"dtype":', esc(c["dtype"]), ',"flops":', _ints(c["flops"]), '}}')
        w.lines(line, n)
        n_tasks += n
    for k, (src, dst) in enumerate(flows):
        for (ph, (pid_, tid_, ts)) in (("s", src), ("f", dst)):
            ev = {"ph": ph, "id": f"{rank}:{k}", "name": "launch", "cat": "flow", "pid": pid_, "tid": tid_}
            if ph == "f":
                ev["bp"] = "e"
            w.event(_timed(ev, ts))
    _export_steps(run, rank, dev_pid, w, esc)
    _export_counters(run, rank, dev_pid, host_pid, w)
    cols = {"op": "", "name": "", "scope": "", "start_ns": -1, "end_ns": -1}
    first = True
    for n, c in _batches(run, "host_ops", rank, cols, required=("start_ns", "end_ns")):
        if first:
            thread(host_pid, PYNATIVE_TID, "PyNative ops")
            first = False
        start, end = _np(c["start_ns"]), _np(c["end_ns"])
        name = pc.if_else(pc.equal(c["name"], ""), c["op"], c["name"])
        w.lines(_join(',\n{"ph":"X","cat":"host_op","name":', esc(name), f',"pid":{host_pid},"tid":{PYNATIVE_TID},"ts":',
                      _us(start), ',"dur":', _us(_dur(start, end)), ',"args":{"op":', esc(c["op"]),
                      ',"scope":', esc(c["scope"]), '}}'), n)
    return n_tasks


def _flows(run: Run, rank: int) -> list:
    """(source, target) pairs of (pid, tid, ts_ns): TransferData -> the GetNext that dequeued its batch
    (the queue is FIFO, so the k-th transfer feeds the k-th GetNext), and a step's host input copy ->
    the step's first device task."""
    dev_pid, host_pid = rank, HOST_PID_BASE + rank
    cols = task_columns("step", "kind", "stream", "graph", "start_ns", "end_ns")
    transfers, gets, feeds = [], [], {}
    first_dev: dict = {}
    for n, c in _batches(run, "tasks", rank, cols, required=("start_ns", "end_ns")):
        kind, stream = c["kind"], c["stream"]
        step, start, end = _np(c["step"]), _np(c["start_ns"]), _np(c["end_ns"])
        host = _np(pc.equal(stream, "host"))
        h2d = host & _np(pc.equal(kind, "memcpy_h2d"))
        for i in np.flatnonzero(h2d):
            if step[i] < 0 or c["graph"][i].as_py() == "data_sink":
                transfers.append((int(start[i]), int(end[i])))
            else:
                feeds[int(step[i])] = int(start[i])
        for i in np.flatnonzero(_np(pc.equal(kind, "get_next"))):
            gets.append((int(start[i]), int(end[i]), stream[i].as_py()))
        dev = np.flatnonzero(~host & (step >= 0) & ~_np(pc.is_in(kind, pa.array(["event_record", "event_wait"]))))
        if len(dev):
            order = np.lexsort((start[dev], step[dev]))
            d = dev[order]
            firsts = d[np.r_[True, step[d][1:] != step[d][:-1]]]
            for i in firsts:
                s = int(step[i])
                if s not in first_dev or start[i] < first_dev[s][0]:
                    first_dev[s] = (int(start[i]), stream[i].as_py())
    out = []
    transfers.sort()
    gets.sort()
    for (t0, t1), (g0, g1, gs) in zip(transfers, gets):
        if t1 <= g1:
            out.append(((host_pid, STREAM_TIDS["host"], t0), (dev_pid, STREAM_TIDS.get(gs, 0), g0)))
    for s, t0 in sorted(feeds.items()):
        if s in first_dev:
            g0, gs = first_dev[s]
            out.append(((host_pid, STREAM_TIDS["host"], t0), (dev_pid, STREAM_TIDS.get(gs, 0), g0)))
    return out


def _export_steps(run: Run, rank: int, dev_pid: int, w: _Writer, esc) -> None:
    bd = step_times(run, rank)  # the markers alone: the step slices need no task data
    for r in bd.itertuples():
        base = {"ph": "X", "pid": dev_pid, "tid": STEPS_TID}
        w.event(_timed(dict(base, cat="step", name=f"step {r.step}",
                            args={"step": int(r.step), "epoch": int(r.epoch), "step_time_ms": r.step_time_ms,
                                  "iteration_interval_ms": r.iteration_interval_ms, "fp_bp_ms": r.fp_bp_ms,
                                  "tail_ms": r.tail_ms, "fp_start_op": r.fp_start_op, "bp_end_op": r.bp_end_op}),
                       r.start_ns, r.step_time_ns))
        for name, t0, d in (("iteration interval", r.start_ns, r.iteration_interval_ns),
                            ("fp+bp", r.fp_start_ns, r.fp_bp_ns), ("tail", r.bp_end_ns, r.tail_ns)):
            if d > 0:
                w.event(_timed(dict(base, cat="step_phase", name=name, args={"step": int(r.step)}), t0, d))


def _export_counters(run: Run, rank: int, dev_pid: int, host_pid: int, w: _Writer) -> None:
    cols = {"t_ns": -1, "device": "device", "in_use": 0}
    for n, c in _batches(run, "memory", rank, cols, required=("t_ns", "in_use")):
        pid = pc.if_else(pc.equal(c["device"], "host"), host_pid, dev_pid)
        name = pc.if_else(pc.equal(c["device"], "host"), '"host memory"', '"device memory"')
        w.lines(_join(',\n{"ph":"C","name":', name, ',"pid":', _ints(pid), ',"ts":', _us(_np(c["t_ns"])),
                      ',"args":{"in_use_bytes":', _ints(c["in_use"]), '}}'), n)
    for n, c in _batches(run, "device_queue", rank, {"t_ns": -1, "depth": 0}, required=("t_ns", "depth")):
        w.lines(_join(f',\n{{"ph":"C","name":"device queue","pid":{dev_pid},"ts":', _us(_np(c["t_ns"])),
                      ',"args":{"depth":', _ints(c["depth"]), '}}'), n)
    roots = {(int(p), int(o)) for n, c in _batches(run, "dataset_pipeline", rank,
                                                    {"pipeline_id": -1, "op_id": -1, "parent_id": -1})
             for p, o, par in zip(_np(c["pipeline_id"]), _np(c["op_id"]), _np(c["parent_id"])) if par == -1}
    if not roots:
        return
    for n, c in _batches(run, "dataset_queues", rank, {"pipeline_id": -1, "op_id": -1, "t_ns": -1, "depth": 0}):
        pid_, op = _np(c["pipeline_id"]), _np(c["op_id"])
        keep = np.fromiter(((int(a), int(b)) in roots for a, b in zip(pid_, op)), bool, n)
        if not keep.any():
            continue
        t = _np(c["t_ns"])[keep]
        d = _np(c["depth"])[keep]
        w.lines(_join(f',\n{{"ph":"C","name":"host queue","pid":{host_pid},"ts":', _us(t),
                      ',"args":{"depth":', _ints(d), '}}'), int(keep.sum()))


# -- CSV ------------------------------------------------------------------------------------------------
def export_csv(run: Run | str | os.PathLike, out_dir: str | os.PathLike, rank: int = 0,
               overwrite: bool = True) -> list[Path]:
    """Every analysis table as a CSV file in ``out_dir``; returns the paths written. ``out_dir`` is
    created if its parent exists (``check_output`` rules; ``overwrite=False`` refuses to replace CSV files
    already there). Every table is computed before anything is written; each file is written to a
    temporary name and renamed, and a failure removes what this call wrote."""
    from insight import analysis as A
    from insight.analysis.advice import has_device

    run = as_run(run)
    out = check_output(run, out_dir, directory=True, overwrite=overwrite)
    bd = A.step_breakdown(run, rank)
    s = summarize(bd)
    pipe = A.data_pipeline(run, rank, breakdown=bd)
    peak = A.memory_peak(run, rank=rank)
    types = A.op_type_stats(run, rank=rank)
    summary = {k: v for k, v in asdict(s).items() if not isinstance(v, list)}
    summary["excluded_steps"] = ";".join(map(str, s.excluded_steps))
    peak_row = {k: getattr(peak, k) for k in ("peak_bytes", "t_ns", "step", "capacity", "share_of_capacity",
                                              "fragmentation", "allocations", "frees", "untracked_bytes")}
    pipe_row = {k: getattr(pipe, k) for k in ("verdict", "host_queue_empty_ratio", "host_queue_samples",
                                              "device_queue_pops", "device_queue_empty_pops", "consumer_bottleneck",
                                              "bottleneck_op_id", "bottleneck_op_type", "input_share", "input_bound")}
    pipe_row["pipeline_ids"] = ";".join(map(str, pipe.pipeline_ids))
    pipe_row["advice"] = " | ".join(pipe.advice)
    ops = pipe.ops.copy()
    if "children" in ops:
        ops["children"] = ops["children"].apply(lambda v: ";".join(map(str, v)) if isinstance(v, list) else "")
    tables = {
        "step_breakdown": bd,
        "step_summary": pd.DataFrame([summary]),
        "op_stats": A.op_stats(run, rank=rank),
        "op_type_stats": types,
        "data_pipeline_ops": ops,
        "data_pipeline_summary": pd.DataFrame([pipe_row]),
        "device_queue_per_step": pipe.device_queue,
        "memory_timeline": A.memory_timeline(run, rank=rank),
        "memory_peak": pd.DataFrame([peak_row]),
        "memory_peak_tensors": peak.live,
        "recommendations": pd.DataFrame([r.as_dict() for r in A.advise(s, pipe, peak, types,
                                                                        device=has_device(run, rank))],
                                        columns=["id", "severity", "title", "detail", "metric", "value", "threshold"]),
    }
    assert tuple(tables) == CSV_TABLES
    created = False
    try:
        out.mkdir()
        created = True
    except FileExistsError:
        if not out.is_dir():
            raise ExportError(f"cannot write CSV files to {str(out)!r}: it exists and is not a directory") from None
    except OSError as e:
        raise _write_error(out, e) from None
    paths: list[Path] = []
    try:
        for name, df in tables.items():
            p = out / f"{name}.csv"
            f, tmp = _temp_beside(p)
            try:
                with f:
                    df.to_csv(f, index=False)
                _publish(tmp, p, overwrite)
            except OSError as e:
                raise _write_error(p, e) from None
            finally:
                tmp.unlink(missing_ok=True)
            paths.append(p)
    except BaseException:
        for p in paths:
            p.unlink(missing_ok=True)
        if created:
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    return paths
