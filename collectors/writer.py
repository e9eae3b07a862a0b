"""The run directory on disk: part files, the manifest, the background flush thread, compaction.

Every ``flush()`` drains all collectors and writes each table's new rows as one part file
``rank_0/<table>/part-NNNNN.parquet`` (written under a dot-prefixed temporary name, which neither
``part-*.parquet`` globs nor pyarrow's dataset discovery pick up, then renamed), then rewrites
``manifest.json`` atomically (temporary file + ``os.replace``). So a process killed at any instant
leaves every part and the manifest either complete or absent. ``compact()`` turns each table's parts
into ``rank_0/<table>.parquet`` (again via a temporary file and a rename) and removes the parts.

A write that fails (disk full, quota, permissions) removes its temporary file; a failed flush keeps the
rows it could not write and writes them with the next flush, so a passing problem loses nothing. When the
run cannot be finished, ``fail()`` marks it ``"status": "failed"`` with the error in the manifest, so
readers report the run as failed instead of reading a half-written run as a good one.
"""
from __future__ import annotations

import json
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from collectors.base import Collector
from collectors.buffers import concat, dictionary_schema
from collectors.schema import SCHEMAS

MANIFEST = "manifest.json"


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


def read_part(path: Path, schema: pa.Schema) -> pa.Table:
    """Read a part back for compaction with its string columns as dictionary arrays (as they were written):
    decoding only the dictionary pages is several times cheaper than materialising every string."""
    strings = [f.name for f in schema if pa.types.is_string(f.type)]
    with pq.ParquetFile(path, read_dictionary=strings) as f:  # (not read_table: no pyarrow.dataset machinery)
        return f.read()


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
        self.parts = {t: 0 for t in self.tables}
        self.flushes = 0
        self.background_cpu_s = 0.0  # CPU time of the background thread's flushes (what recording costs besides the hook)
        self.error: BaseException | None = None
        self._pending: dict[str, list] = {}  # rows a failed flush could not write: written by the next one
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rank_dir.mkdir(parents=True, exist_ok=True)

    # -- manifest -------------------------------------------------------------------------------------
    def write_manifest(self, status: str | None = None, compacted: bool = False) -> None:
        m = self.manifest
        if status is not None:
            m["status"] = status
        prefix = f"rank_{self.rank}"
        if compacted:
            m["tables"] = {t: f"{prefix}/{t}.parquet" for t in self.tables}
        else:
            m["tables"] = {t: f"{prefix}/{t}/" for t in self.tables if self.parts[t]}
        m["step_count"] = self.rows.get("steps", 0)
        if self.on_flush is not None:
            self.on_flush(m)
        write_json_atomic(self.run_dir / MANIFEST, m)

    # -- flushing -------------------------------------------------------------------------------------
    def _write_part(self, table: str, t: pa.Table) -> None:
        d = self.rank_dir / table
        d.mkdir(exist_ok=True)
        n = self.parts[table]
        tmp = d / f".part-{n:05d}.parquet.tmp"
        try:
            pq.write_table(t, tmp, store_schema=False, **write_options(SCHEMAS[table]))
            os.replace(tmp, d / f"part-{n:05d}.parquet")
        except BaseException:
            _unlink_quietly(tmp)  # give back the space a half-written part took
            raise
        self.parts[table] = n + 1
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
            return written

    def _loop(self, interval: float) -> None:
        # the writer is background work: when the cores are contended, let the training threads run first
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
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
                self.background_cpu_s += time.thread_time() - c

    def start_thread(self, interval: float) -> None:
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="insight-writer", daemon=True)
        self._thread.start()

    def stop_thread(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None

    # -- compaction -------------------------------------------------------------------------------------
    ROW_GROUP = 1 << 18

    @classmethod
    def _merge(cls, parts: list[Path], schema: pa.Schema, dest: Path) -> None:
        """Concatenate parts into one file, in row groups of about ROW_GROUP rows, reading the next part
        in a second thread while writing (pyarrow releases the GIL in both)."""
        with pq.ParquetWriter(dest, dictionary_schema(schema), store_schema=False, **write_options(schema)) as w, \
                ThreadPoolExecutor(1, thread_name_prefix="insight-compact") as pool:
            if not parts:
                w.write_table(dictionary_schema(schema).empty_table())
                return
            pending, rows = [], 0
            nxt = pool.submit(read_part, parts[0], schema)
            for k in range(len(parts)):
                t = nxt.result()
                nxt = pool.submit(read_part, parts[k + 1], schema) if k + 1 < len(parts) else None
                pending.append(t)
                rows += t.num_rows
                if rows >= cls.ROW_GROUP or nxt is None:
                    w.write_table(pa.concat_tables(pending), row_group_size=max(rows, 1))
                    pending, rows = [], 0

    def compact(self, status: str = "complete") -> None:
        """One file per table (every enabled table, empty ones too, so readers get the dtypes), no parts.
        Tables are compacted two at a time (training is over; pyarrow releases the GIL)."""
        with self._lock:
            big_first = sorted(self.tables, key=lambda t: -self.rows.get(t, 0))
            with ThreadPoolExecutor(2, thread_name_prefix="insight-compact") as pool:
                for f in [pool.submit(self._compact_table, t) for t in big_first]:
                    f.result()
            self.write_manifest(status, compacted=True)

    def _compact_table(self, table: str) -> None:
        d = self.rank_dir / table
        parts = sorted(d.glob("part-*.parquet"), key=lambda p: int(p.stem[5:])) if d.is_dir() else []
        dest = self.rank_dir / f"{table}.parquet"
        if len(parts) == 1:  # already the right file: just move it (atomically)
            os.replace(parts[0], dest)
        else:
            tmp = self.rank_dir / f".{table}.parquet.tmp"
            try:
                self._merge(parts, SCHEMAS[table], tmp)
                os.replace(tmp, dest)  # from here readers use it; the parts are leftovers
            except BaseException:
                _unlink_quietly(tmp)
                raise
        if d.is_dir():
            for p in d.iterdir():
                p.unlink()
            d.rmdir()

    # -- failure ------------------------------------------------------------------------------------------
    def fail(self, error: BaseException) -> bool:
        """The run cannot be finished: remove temporary files, then mark the manifest ``failed`` with
        ``error`` (the tables listed are what is on disk). Never raises; returns whether the manifest was
        written (on a full disk the atomic write may not fit: the manifest is then rewritten in place,
        and if even that fails it is left unreadable, which readers also report as an error)."""
        with self._lock:
            try:  # this writer's temporary files only: .part-NNNNN.parquet.tmp, .<table>.parquet.tmp
                for t in self.tables:
                    for tmp in [*(self.rank_dir / t).glob(".part-*.parquet.tmp"), self.rank_dir / f".{t}.parquet.tmp"]:
                        _unlink_quietly(tmp)
            except OSError:
                pass
            _unlink_quietly(self.run_dir / f".{MANIFEST}.tmp")
            m = self.manifest
            m["status"] = "failed"
            m["error"] = " ".join(f"{type(error).__name__}: {error}".split())[:1000]
            prefix = f"rank_{self.rank}"
            tables = {}
            for t in self.tables:
                if (self.rank_dir / f"{t}.parquet").exists():
                    tables[t] = f"{prefix}/{t}.parquet"
                elif any((self.rank_dir / t).glob("part-*.parquet")):
                    tables[t] = f"{prefix}/{t}/"
            m["tables"] = tables
            m["step_count"] = self.rows.get("steps", 0) if "steps" in tables else 0
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
