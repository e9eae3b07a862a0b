"""The run directory on disk: part files, the manifest, the background flush and merge threads.

Every ``flush()`` drains all collectors and writes each table's new rows as one part file (a *batch*; batches
are numbered per table from 0), then rewrites ``manifest.json`` atomically (temporary file + ``os.replace``).
A part file is named after the batches it holds, ``rank_0/<table>/part-FFFFFF-LLLLLL.parquet`` (batches F..L;
a new part holds one batch, F = L), and is written under a dot-prefixed temporary name, which neither
``part-*.parquet`` globs nor pyarrow's dataset discovery pick up, then renamed.

So that thousands of flushes do not mean thousands of small files, a second background thread merges parts,
tiered like a log-structured merge tree: when FANIN parts of one level (a new part is level 0) have
accumulated, they are merged, streamed row group by row group into large row groups, into one part of the
next level -- so the live parts are the digits of the batch count in base FANIN, however late the merger is.
Each merge writes a temporary file, renames it to the name of the range it covers, and only then, GRACE_S
later (so that a reader that listed them just before can still open them), removes the parts it replaces. A
merged part whose rows or bytes reach SEAL_ROWS / SEAL_BYTES is *sealed* (never merged again, so no merge
costs more than a few sealed parts' worth of rows) and takes the unsealed parts before it along. A table is
at most FANIN - 1 parts per level plus its sealed parts, however long the run.

A process killed at any instant (SIGKILL) leaves every part and the manifest either complete or absent; at
worst a merged part and some of the parts it replaces both exist, and readers (``insight.trace``) keep only
the parts whose range no other part contains -- every batch exactly once, never a batch missing (the ranges
of a table's live parts are contiguous from 0). ``stop()`` costs the last flush only: ``stop_thread()``
cancels a merge in progress (between row groups, removing its temporary file) and ``finish()`` writes an
empty part for every table that received no rows (so readers get the dtypes), removes the parts merges
replaced, and writes the final manifest. Nothing is read or rewritten at the end of a run.

A flush that fails (disk full, quota, permissions) removes its temporary file and keeps the rows it could
not write for the next flush, so a passing problem loses nothing. A merge that fails keeps the parts it would
have replaced (nothing is lost; it is tried again after the table's next batch). When the run cannot be
finished, ``fail()`` marks it ``"status": "failed"`` with the error in the manifest, so readers report the
run as failed instead of reading a half-written run as a good one.
"""
from __future__ import annotations

import json
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from collectors.base import Collector
from collectors.buffers import concat, dictionary_schema
from collectors.schema import SCHEMAS

MANIFEST = "manifest.json"

FANIN = 4               # parts of one level merged into one of the next level
ROW_GROUP = 1 << 17     # rows per row group of a merged part (a stop() waits for at most one row group's write)
SEAL_ROWS = 1 << 18     # a merged part this large is never merged again (merging it further would save
SEAL_BYTES = 32 << 20   # reads under 1 % while rewriting its rows again) ... nor one this large on disk
GRACE_S = 5.0           # parts a merge replaced stay this long, for readers that listed them before it


def part_name(first: int, last: int) -> str:
    """The file name of the part holding batches ``first..last`` of its table (docs/trace-format.md)."""
    return f"part-{first:06d}-{last:06d}.parquet"


# Tables are built with dictionary-encoded strings (collectors.buffers.dictionary_schema) and every file is
# written without the Arrow schema in its metadata: the Parquet logical type of those columns is the plain
# UTF-8 string, so pandas, pyarrow, DuckDB and Spark read exactly the dtypes of docs/trace-format.md, and
# the writer never re-hashes a string it already has as a dictionary index.
def write_options(schema: pa.Schema) -> dict:
    """Parquet options: dictionary-encode the strings and small integers (low cardinality), keep min/max
    statistics for the numeric columns only (string statistics cost as much as the rest of the write)."""
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    small = [f.name for f in schema if f.type in (pa.int8(), pa.int32(), pa.bool_())]
    return {"compression": "snappy", "use_dictionary": strings + small,
            "write_statistics": [f.name for f in schema if not pa.types.is_string(f.type)]}


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


class MergeCancelled(Exception):
    """A merge stopped between two row groups because the run is stopping."""


def merge_files(paths: list[Path], schema: pa.Schema, dest: Path, cancelled=lambda: False,
                row_group: int | None = None) -> int:
    """Concatenate Parquet files of ``schema`` into ``dest`` in row groups of ``row_group`` rows, streaming
    (at most about one row group in memory). String columns are read as the dictionaries they were written
    as and each row group's dictionaries are unified before writing, so the output stays dictionary-encoded
    and no string is decoded. ``cancelled()`` is asked before every read and write (MergeCancelled). Returns
    the rows written; an empty input gives an empty file with the schema (readers get the dtypes)."""
    row_group = row_group or ROW_GROUP
    dschema = dictionary_schema(schema)
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    rows = 0
    with pq.ParquetWriter(dest, dschema, store_schema=False, **write_options(schema)) as w:
        pending, n = [], 0

        def put(ts: list[pa.Table]) -> None:
            if cancelled():
                raise MergeCancelled
            t = pa.concat_tables(ts).unify_dictionaries() if len(ts) > 1 else ts[0]
            w.write_table(t, row_group_size=max(t.num_rows, 1))

        for p in paths:
            with pq.ParquetFile(p, read_dictionary=strings) as f:
                for g in range(f.num_row_groups):
                    if cancelled():
                        raise MergeCancelled
                    t = f.read_row_group(g)
                    while t.num_rows:
                        take = t.slice(0, row_group - n)
                        t = t.slice(take.num_rows)
                        pending.append(take)
                        n += take.num_rows
                        if n == row_group:
                            put(pending)
                            rows += n
                            pending, n = [], 0
        if n or not rows:
            put(pending or [dschema.empty_table()])
            rows += n
    return rows


@dataclass
class Part:
    """One live part file of a table: batches ``first..last``."""
    first: int
    last: int
    rows: int
    nbytes: int
    level: int = 0
    sealed: bool = False

    @property
    def name(self) -> str:
        return part_name(self.first, self.last)


class RunWriter:
    def __init__(self, run_dir: Path, manifest: dict, collectors: list[Collector], t0: int,
                 tables: list[str], rank: int = 0, on_flush=None):
        self.run_dir = Path(run_dir)
        self.rank_dir = self.run_dir / f"rank_{rank}"
        self.rank = rank
        self.manifest = manifest
        self.collectors = collectors
        self.t0 = t0
        self.tables = list(tables)
        self.on_flush = on_flush  # fn(manifest) -> None: updates manifest fields before each write
        self.rows = {t: 0 for t in self.tables}
        self.parts = {t: 0 for t in self.tables}  # batches written per table (the next batch's number)
        self.live: dict[str, list[Part]] = {t: [] for t in self.tables}  # the part files on disk, in order
        self.flushes = 0
        self.merges = 0
        self.flush_cpu_s = 0.0  # CPU time of the background threads (what recording costs besides the hook)
        self.merge_cpu_s = 0.0
        self.error: BaseException | None = None
        self.merge_error: BaseException | None = None
        self._merge_failed_at: dict[str, int] = {}  # table -> its batch count when a merge failed
        self._pending: dict[str, list] = {}  # rows a failed flush could not write: written by the next one
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()       # a flush wrote parts: the merger looks for work
        self._merge_stop = threading.Event()
        self._idle = threading.Condition()
        self._busy = False
        self._merger: threading.Thread | None = None
        self._replaced: list[tuple[float, list[Path]]] = []  # (when to remove, parts a merge replaced)
        self.grace_s = GRACE_S
        self.rank_dir.mkdir(parents=True, exist_ok=True)

    @property
    def background_cpu_s(self) -> float:
        return self.flush_cpu_s + self.merge_cpu_s

    # -- manifest -------------------------------------------------------------------------------------
    def write_manifest(self, status: str | None = None) -> None:
        m = self.manifest
        if status is not None:
            m["status"] = status
        m["tables"] = {t: f"rank_{self.rank}/{t}/" for t in self.tables if self.live[t]}
        m["step_count"] = self.rows.get("steps", 0)
        if self.on_flush is not None:
            self.on_flush(m)
        write_json_atomic(self.run_dir / MANIFEST, m)

    # -- flushing -------------------------------------------------------------------------------------
    def _write_part(self, table: str, t: pa.Table) -> None:
        d = self.rank_dir / table
        d.mkdir(exist_ok=True)
        part = Part(self.parts[table], self.parts[table], t.num_rows, 0)
        tmp = d / f".{part.name}.tmp"
        try:
            # one dictionary per string column (the collectors' chunks each have their own): stays dictionary-encoded
            pq.write_table(t.unify_dictionaries() if t.num_rows else t, tmp, store_schema=False,
                           **write_options(SCHEMAS[table]))
            part.nbytes = tmp.stat().st_size
            os.replace(tmp, d / part.name)
        except BaseException:
            _unlink_quietly(tmp)  # give back the space a half-written part took
            raise
        self.live[table].append(part)
        self.parts[table] += 1
        self.rows[table] += t.num_rows

    def flush(self, final: bool = False) -> int:
        """Drain every collector into one new part per table, then rewrite the manifest. Returns the rows written."""
        with self._lock:
            out, self._pending = self._pending, {}
            for c in self.collectors:
                for table, t in c.drain(self.t0, final).items():
                    out.setdefault(table, []).append(t)
            written = 0
            # the steps part last: a step on disk always has its tasks and memory rows on disk too
            items = sorted(out.items(), key=lambda kv: kv[0] == "steps")
            for k, (table, ts) in enumerate(items):
                t = concat(ts)
                if t is None or table not in self.parts:
                    continue
                try:
                    self._write_part(table, t)
                except BaseException:
                    # keep this table's rows and every later table's (the steps last) for the next flush
                    self._pending = {tb: [concat(x)] for tb, x in items[k:] if concat(x) is not None}
                    raise
                written += t.num_rows
            self.flushes += 1
            self.write_manifest()
        if written:
            self._wake.set()
        return written

    def _loop(self, interval: float) -> None:
        # the writer is background work: when the cores are contended, let the training threads run first
        _lower_priority(10)
        while not self._stop.wait(interval):
            c = time.thread_time()
            try:
                self.flush()
                self.error = None
            except BaseException as e:  # noqa: BLE001 - keep recording; reported at stop()
                if self.error is None:
                    warnings.warn(f"insight: writing the profile to {self.run_dir} failed "
                                  f"({type(e).__name__}: {e}); will retry", RuntimeWarning, stacklevel=1)
                self.error = e
            finally:
                self.flush_cpu_s += time.thread_time() - c

    def start_thread(self, interval: float) -> None:
        """Flush every ``interval`` seconds, and merge parts, in two background threads."""
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="insight-writer", daemon=True)
        self._thread.start()
        self._merger = threading.Thread(target=self._merge_loop, name="insight-merge", daemon=True)
        self._merger.start()

    def stop_thread(self) -> None:
        """Stop flushing (after the flush in progress) and ask the merger to stop (a merge in progress is
        cancelled at its next row group; ``finish()`` / ``fail()`` wait for it)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        self._merge_stop.set()
        self._wake.set()

    def _join_merger(self) -> None:
        self._merge_stop.set()
        self._wake.set()
        if self._merger is not None and self._merger is not threading.current_thread():
            self._merger.join()
        self._merger = None

    # -- merging ----------------------------------------------------------------------------------------
    def _pick(self, table: str) -> tuple[list[Part], bool] | None:
        """The parts to merge next (consecutive, in order) and whether the result is sealed; None if none.
        The unsealed tail of the live parts is a base-FANIN counter: levels never increase from old to new,
        and the oldest FANIN parts of a level with FANIN or more (a merger that fell behind) are merged."""
        live = self.live[table]
        k = len(live)
        while k and not live[k - 1].sealed:
            k -= 1
        tail = live[k:]
        if len(tail) < FANIN or self._merge_failed_at.get(table) == self.parts[table]:
            return None
        i = 0
        while i < len(tail):
            j = i
            while j < len(tail) and tail[j].level == tail[i].level:
                j += 1
            if j - i >= FANIN:
                run = tail[i:i + FANIN]
                if sum(p.rows for p in run) >= SEAL_ROWS or sum(p.nbytes for p in run) >= SEAL_BYTES:
                    # sealed: the older unsealed parts go along, or they would stay small forever
                    return tail[:i + FANIN], True
                return run, False
            i = j
        return None

    def _merge(self, table: str, run: list[Part], sealed: bool) -> None:
        d = self.rank_dir / table
        new = Part(run[0].first, run[-1].last, sum(p.rows for p in run), 0, max(p.level for p in run) + 1, sealed)
        tmp = d / f".{new.name}.tmp"
        try:
            merge_files([d / p.name for p in run], SCHEMAS[table], tmp, self._merge_stop.is_set)
            new.nbytes = tmp.stat().st_size
            with self._lock:
                # rename first, then remove the parts it replaces: a reader (or a crash) in between sees
                # both, and keeps the part whose range contains the others
                os.replace(tmp, d / new.name)
                live = self.live[table]
                at = live.index(run[0])
                live[at:at + len(run)] = [new]
        except BaseException:
            _unlink_quietly(tmp)
            raise
        self.merges += 1
        # removed later: a reader that listed them just before the rename can still open them (readers skip
        # a part that a merged part contains, and list again if one vanishes anyway)
        self._replaced.append((time.monotonic() + self.grace_s, [d / p.name for p in run]))

    def _remove_replaced(self, everything: bool = False) -> None:
        now = time.monotonic()
        while self._replaced and (everything or self._replaced[0][0] <= now):
            for path in self._replaced.pop(0)[1]:
                _unlink_quietly(path)

    def merge_pending(self) -> int:
        """Run every merge the live parts call for (until none or the merger is told to stop); returns how many."""
        self._remove_replaced()
        done = 0
        progress = True
        while progress and not self._merge_stop.is_set():
            progress = False
            for table in self.tables:
                with self._lock:
                    picked = self._pick(table)
                if picked is None or self._merge_stop.is_set():
                    continue
                try:
                    self._merge(table, *picked)
                except MergeCancelled:
                    return done
                except Exception as e:  # noqa: BLE001 - the parts stay as they are: nothing is lost
                    if self.merge_error is None:
                        warnings.warn(f"insight: merging the parts of {self.rank_dir / table} failed "
                                      f"({type(e).__name__}: {e}); the parts are kept", RuntimeWarning, stacklevel=1)
                    self.merge_error = e
                    with self._lock:
                        self._merge_failed_at[table] = self.parts[table]
                    continue
                done += 1
                progress = True
        return done

    def _merge_loop(self) -> None:
        _lower_priority(19)  # merging is never urgent: only spare CPU
        while True:
            self._wake.wait(1.0)  # (at least once a second: replaced parts whose grace is over go)
            self._remove_replaced()
            with self._idle:
                self._wake.clear()  # (stopping sets _merge_stop before _wake: a stop is never missed)
                if self._merge_stop.is_set():
                    self._idle.notify_all()
                    return
                self._busy = True
            c = time.thread_time()
            try:
                self.merge_pending()
            finally:
                self.merge_cpu_s += time.thread_time() - c
                with self._idle:
                    self._busy = False
                    self._idle.notify_all()

    def wait_merged(self, timeout: float | None = None) -> bool:
        """Wait until the merger has nothing left to do (benchmarks and tests); False on timeout."""
        def idle() -> bool:
            if self._merger is None or self._merge_stop.is_set():
                return True
            if self._busy or self._wake.is_set():
                return False
            with self._lock:  # (a flush may have written parts and not yet woken the merger)
                return all(self._pick(t) is None for t in self.tables)

        with self._idle:
            return self._idle.wait_for(idle, timeout)

    # -- the end of a run -------------------------------------------------------------------------------
    def finish(self, status: str = "complete") -> None:
        """End the run after the last flush: wait for the merger (stopped by ``stop_thread()``), write an empty
        part for every table that got no rows (readers get its dtypes), and the manifest with ``status``.
        Costs a few small files whatever the run's length: nothing already written is read or rewritten."""
        self._join_merger()
        self._remove_replaced(everything=True)
        with self._lock:
            for t in self.tables:
                if not self.live[t]:
                    self._write_part(t, dictionary_schema(SCHEMAS[t]).empty_table())
            self.write_manifest(status)

    # -- failure ------------------------------------------------------------------------------------------
    def fail(self, error: BaseException) -> bool:
        """The run cannot be finished: remove temporary files, then mark the manifest ``failed`` with
        ``error`` (the tables listed are what is on disk). Never raises; returns whether the manifest was
        written (on a full disk the atomic write may not fit: the manifest is then rewritten in place,
        and if even that fails it is left unreadable, which readers also report as an error)."""
        try:
            self._join_merger()
            self._remove_replaced(everything=True)
        except Exception:  # noqa: BLE001 - the failure record matters more
            pass
        with self._lock:
            try:  # this writer's temporary files only: .part-FFFFFF-LLLLLL.parquet.tmp
                for t in self.tables:
                    for tmp in (self.rank_dir / t).glob(".part-*.parquet.tmp"):
                        _unlink_quietly(tmp)
            except OSError:
                pass
            _unlink_quietly(self.run_dir / f".{MANIFEST}.tmp")
            m = self.manifest
            m["status"] = "failed"
            m["error"] = " ".join(f"{type(error).__name__}: {error}".split())[:1000]
            m["tables"] = {t: f"rank_{self.rank}/{t}/" for t in self.tables if self.live[t]}
            m["step_count"] = self.rows.get("steps", 0) if "steps" in m["tables"] else 0
            try:
                if self.on_flush is not None:
                    self.on_flush(m)
            except Exception:  # noqa: BLE001 - the failure record matters more than the stream list
                pass
            try:
                write_json_atomic(self.run_dir / MANIFEST, m)
                return True
            except OSError:
                pass
            try:  # no room for a second copy: truncating the old manifest frees its blocks
                with open(self.run_dir / MANIFEST, "w") as f:
                    json.dump(m, f, separators=(",", ":"))
                return True
            except OSError:
                return False


def _lower_priority(nice: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        pass
