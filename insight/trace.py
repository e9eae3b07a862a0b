"""Reading profiled runs (docs/trace-format.md): the one reader every analysis, export and page goes through.

* ``open_run(dir)`` validates the manifest (bounded JSON: size, nesting depth and integer length limits; one
  pydantic model, :class:`Manifest`) and returns a :class:`Run`;
* a ``Run`` is loaded once and read lazily: each table's files are listed (and their schemas checked against
  the trace format) on first use, each column is read once, memory-mapped, and kept as Arrow; analyses
  memoise their results on the run (``run.memo``), so one ``Run`` serves every page of a run;
* ``read(run, table, columns)`` gives analyzers a DataFrame with exactly the columns they ask for;
* ``discover_runs(base)`` lists the runs of a base dir, the broken ones as entries with their error.

Every problem with a run on disk becomes one ``TraceError`` whose message names the run and the file: a bad
or hostile manifest, a newer schema, a table whose column has the wrong type, a damaged Parquet file, a
symbolic link whose target leaves the run directory. A table of a profiled run is a directory of part files
that the writer merges while it records (docs/trace-format.md): :func:`live_parts` picks the parts that hold
every batch exactly once at any instant of a merge or after a crash, a file merged away while it is read makes
the table be listed and read again, and a rank's ``steps`` are read before its other tables are listed, so
every step read has its rows in them.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
NS_PER_MS = 1e6
MAX_MANIFEST_BYTES = 1 << 20   # a manifest is a few KB
MAX_JSON_DEPTH = 32            # objects / arrays nested deeper than this are refused (the format uses 3)
MAX_INT_DIGITS = 20            # an int64 has at most 19 digits
COMPACTION_RETRIES = 5         # a part file vanished under us: the run was compacted, list its files again
SMALL_FILE_ROWS = 1 << 16      # a file this small is decoded in the calling thread (a thread pool costs more)
MAX_PART_FILES = 100_000       # part files of one table (the writer keeps a few dozen; a refused run says so)
# rank_N/<table>/part-FFFFFF-LLLLLL.parquet holds batches F..L of the table; part-NNNNN.parquet is batch N
PART_FILE = re.compile(r"part-(\d{1,12})(?:-(\d{1,12}))?\.parquet")

# the tables of docs/trace-format.md and the kind of each column: int, float, bool or str
TABLE_SCHEMAS: dict[str, dict[str, str]] = {
    "tasks": {"step": "int", "graph": "str", "task_id": "int", "name": "str", "op": "str", "kind": "str",
              "stream": "str", "stream_id": "int", "scope": "str", "phase": "str", "start_ns": "int",
              "end_ns": "int", "dur_ns": "int", "flops": "int", "bytes": "int", "shape": "str", "dtype": "str",
              "fused_ops": "str"},
    "steps": {"step": "int", "epoch": "int", "begin_ns": "int", "get_next_start_ns": "int",
              "get_next_end_ns": "int", "fp_start_ns": "int", "bp_end_ns": "int", "end_ns": "int",
              "fp_start_op": "str", "bp_end_op": "str", "loss": "float", "sink": "bool"},
    "memory": {"t_ns": "int", "action": "str", "device": "str", "kind": "str", "tensor": "str", "op": "str",
               "scope": "str", "size": "int", "offset": "int", "in_use": "int", "capacity": "int", "step": "int",
               "shape": "str", "dtype": "str", "source": "str"},
    "device_queue": {"t_ns": "int", "action": "str", "depth": "int", "capacity": "int", "wait_ns": "int",
                     "step": "int"},
    "dataset_pipeline": {"pipeline_id": "int", "op_id": "int", "op_type": "str", "parent_id": "int",
                         "num_workers": "int", "queue_capacity": "int"},
    "dataset_ops": {"pipeline_id": "int", "op_id": "int", "op_type": "str", "t_ns": "int", "rows": "int",
                    "batches": "int", "busy_ns": "int", "wait_in_ns": "int", "wait_out_ns": "int",
                    "num_workers": "int"},
    "dataset_queues": {"pipeline_id": "int", "op_id": "int", "t_ns": "int", "depth": "int", "capacity": "int"},
    "graphs": {"graph": "str", "nodes": "int", "compile_start_ns": "int", "compile_end_ns": "int", "dump": "str",
               "planned_peak": "int", "parameter_bytes": "int"},
    "host_ops": {"op": "str", "name": "str", "scope": "str", "start_ns": "int", "end_ns": "int"},
    # imported runs only (docs/import.md): launch -> device-work links, rows of ``tasks``
    "flows": {"cat": "str", "id": "str", "src_task": "int", "dst_task": "int", "src_ns": "int", "dst_ns": "int"},
    # imported runs only: Chrome-trace ``C`` (counter) events, one row per numeric series value
    "counters": {"name": "str", "series": "str", "process": "str", "t_ns": "int", "value": "float", "step": "int"},
}
TABLES = tuple(TABLE_SCHEMAS)

# every column of the tasks table with the value a writer that lacks it implies
TASK_DEFAULTS = {"step": -1, "graph": "", "task_id": -1, "name": "", "op": "", "kind": "", "stream": "",
                 "stream_id": -1, "scope": "", "phase": "", "start_ns": -1, "end_ns": -1, "dur_ns": -1, "flops": -1,
                 "bytes": -1, "shape": "", "dtype": "", "fused_ops": ""}


class TraceError(Exception):
    """A run cannot be read: missing or bad manifest, newer schema, corrupt or missing table, a path leaving
    the run directory."""


# -- the manifest -------------------------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=False)


class DeviceInfo(_Model):
    target: StrictStr = ""
    capacity_bytes: StrictInt = Field(0, ge=0, le=2**62)


class StreamInfo(_Model):
    stream_id: StrictInt = Field(-1, ge=-1, le=2**15)
    name: StrictStr = ""


class Manifest(_Model):
    """manifest.json (docs/trace-format.md). Unknown fields are kept; known ones must have their types."""
    schema_version: StrictInt = Field(ge=1)
    run_id: StrictStr = ""
    name: StrictStr = ""
    created: StrictStr = ""
    start_perf_ns: StrictInt = Field(0, ge=0, le=2**63 - 1)
    status: StrictStr = ""
    device: DeviceInfo = Field(default_factory=DeviceInfo)
    streams: list[StreamInfo] = Field(default_factory=list, max_length=256)
    ranks: list[StrictInt] = Field(default_factory=lambda: [0], max_length=4096)
    step_count: StrictInt = Field(0, ge=0, le=2**62)
    tables: dict[StrictStr, StrictStr] = Field(default_factory=dict)
    options: dict[StrictStr, Any] = Field(default_factory=dict)
    runtime: dict[StrictStr, Any] = Field(default_factory=dict)
    compacted: StrictBool | None = None

    @field_validator("device", "options", "runtime", "tables", mode="before")
    @classmethod
    def _null_is_empty(cls, v):
        return {} if v is None else v

    @field_validator("streams", mode="before")
    @classmethod
    def _null_is_none(cls, v):
        return [] if v is None else v

    @field_validator("ranks")
    @classmethod
    def _ranks(cls, v):
        if any(r < 0 or r > 4095 for r in v):
            raise ValueError("ranks must be integers 0..4095")
        return v or [0]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


def _depth(text: str) -> int:
    """The deepest nesting of objects / arrays in a JSON text (strings skipped), without recursion."""
    bare = _STRING.sub("", text)
    opens = np.frombuffer(bare.encode("utf-8", "replace"), np.uint8)
    step = np.zeros(len(opens), np.int32)
    step[(opens == ord("[")) | (opens == ord("{"))] = 1
    step[(opens == ord("]")) | (opens == ord("}"))] = -1
    return int(np.cumsum(step).max()) if len(step) else 0


def _bounded_int(s: str) -> int:
    digits = len(s.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise ValueError(f"an integer with {digits} digits (at most {MAX_INT_DIGITS})")
    return int(s)


def _short(v, n: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def parse_json(path: Path, what: str, limit: int = MAX_MANIFEST_BYTES):
    """A small JSON document, bounded: size, nesting depth, integer length. TraceError naming ``what``."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise TraceError(f"{what}: cannot read it ({e.strerror or type(e).__name__})") from None
    if len(data) > limit:
        raise TraceError(f"{what}: larger than {limit // 1024} KiB; not an Insight manifest")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TraceError(f"{what}: not UTF-8 text") from None
    depth = _depth(text)
    if depth > MAX_JSON_DEPTH:
        raise TraceError(f"{what}: JSON nested {depth} levels deep (at most {MAX_JSON_DEPTH})")
    try:
        return json.loads(text, parse_int=_bounded_int)
    except ValueError as e:  # JSONDecodeError is a ValueError; so is a refused integer
        raise TraceError(f"{what}: not valid JSON ({str(e).splitlines()[0]})") from None
    except RecursionError:
        raise TraceError(f"{what}: JSON nested too deeply") from None


def _validation_message(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ())) or "manifest"
    msg = err.get("msg", "invalid")
    got = err.get("input")
    return f"{loc}: {msg[0].lower() + msg[1:] if msg else msg} (got {_short(got)})" + (
        f"; and {e.error_count() - 1} more problem(s)" if e.error_count() > 1 else "")


def validate_manifest(raw, where: str) -> Manifest:
    if not isinstance(raw, dict):
        raise TraceError(f"{where}: the manifest is not a JSON object")
    if "schema_version" not in raw:
        raise TraceError(f"{where}: the manifest has no schema_version")
    v = raw["schema_version"]
    if type(v) is not int:
        raise TraceError(f"{where}: schema_version must be an integer, got {_short(v)}")
    if v < 1:
        raise TraceError(f"{where}: schema_version must be 1 or more, got {v}")
    if v > SCHEMA_VERSION:
        raise TraceError(f"{where}: schema version {v} is newer than this Insight reads ({SCHEMA_VERSION}); "
                         f"upgrade Insight to read this run")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        raise TraceError(f"{where}: {_validation_message(e)}") from None


# -- paths that stay inside the run -------------------------------------------------------------------------
def _within(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _escapes(p: Path, root_real: str) -> bool:
    return not _within(os.path.realpath(p), root_real)


def read_manifest(run_dir: str | os.PathLike) -> dict:
    """The validated manifest of ``run_dir`` as a dict (see :func:`open_run`)."""
    return open_run(run_dir).manifest


# -- the run ------------------------------------------------------------------------------------------------
class _TableFiles:
    """One table's files as listed at one moment, their schemas (checked) and the columns read so far."""

    def __init__(self, files: list[Path], schemas: list[pa.Schema]):
        self.files = files
        self.schemas = schemas
        self.columns: dict[str, pa.ChunkedArray] = {}
        # every column of any of the files (a writer may add columns in later parts)
        self.names: list[str] = list(dict.fromkeys(n for sc in schemas for n in sc.names))


class Run:
    """A run directory with its validated manifest; tables read lazily and once (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, manifest: dict | Manifest):
        self.path = Path(path)
        self.real = os.path.realpath(self.path)
        self.meta = manifest if isinstance(manifest, Manifest) else validate_manifest(manifest, str(path))
        self.manifest = self.meta.model_dump()
        self._tables: dict[tuple, _TableFiles | None] = {}
        self._pinned: set[int] = set()  # ranks whose steps table is read
        self._memo: dict = {}
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.meta.name or self.path.name

    @property
    def ranks(self) -> list[int]:
        return list(self.meta.ranks or [0])

    def rel(self, p: Path) -> str:
        try:
            return str(Path(p).relative_to(self.path))
        except ValueError:
            return str(p)

    def error(self, what: str) -> TraceError:
        return TraceError(f"run {self.name!r}: {what}")

    def check_inside(self, p: Path) -> Path:
        """``p`` if its real path stays inside the run directory, else a TraceError."""
        if _escapes(p, self.real):
            raise self.error(f"{self.rel(p)} is a symbolic link leaving the run directory")
        return p

    # -- files --------------------------------------------------------------------------------------------
    def table_path(self, table: str, rank: int = 0) -> Path | None:
        """``rank_N/<table>.parquet``, or the part directory ``rank_N/<table>/`` when it holds parts."""
        base = self.path / f"rank_{int(rank)}"
        if not base.exists() and not base.is_symlink():
            return None
        self.check_inside(base)
        single = base / f"{table}.parquet"
        if single.exists() or single.is_symlink():
            return self.check_inside(single)
        parts = base / table
        if parts.is_dir():
            self.check_inside(parts)
            if any(parts.glob("part-*.parquet")):
                return parts
        if single.exists():  # compacted between the two looks: the single file is complete
            return self.check_inside(single)
        return None

    def table_files(self, table: str, rank: int = 0) -> list[Path]:
        """The Parquet files holding ``table``, in row order: one compacted file, or the live part files (see
        :func:`live_parts`); every one checked to stay inside the run directory and to be a regular file."""
        p = self.table_path(table, rank)
        if p is None:
            return []
        if p.is_dir():
            for attempt in range(COMPACTION_RETRIES + 1):
                names = _part_names(self, p)
                parts, problem = live_parts(names)
                if problem is None:
                    break
                if attempt == COMPACTION_RETRIES:  # not a listing that raced a merge: the run is damaged
                    raise self.error(f"{self.rel(p)}: {problem}")
                time.sleep(0.02 * (attempt + 1))
            files = [self.check_inside(p / name) for name in parts]
        else:
            files = [p]
        for f in files:
            if f.exists() and not f.is_file():  # a directory, a FIFO, a device: never opened (a FIFO would block)
                raise self.error(f"{self.rel(f)} is not a regular file")
        return files

    def has_table(self, table: str, rank: int = 0) -> bool:
        return self.table_path(table, rank) is not None

    def bad_file(self, path: Path, exc: BaseException) -> TraceError:
        """A damaged file's TraceError; raises FileNotFoundError instead when the file is gone (a compaction
        removed it: the caller lists the files again)."""
        if not os.path.lexists(path):
            raise FileNotFoundError(2, "vanished", str(path))
        msg = str(exc).splitlines()[0] if str(exc) else "corrupt"
        return self.error(f"cannot read {self.rel(path)} ({type(exc).__name__}: {msg})")

    def _list(self, table: str, rank: int) -> _TableFiles | None:
        files = self.table_files(table, rank)
        if not files:
            return None
        schemas = []
        for f in files:
            try:
                schemas.append(pq.read_schema(f, memory_map=True))
            except FileNotFoundError:
                raise
            except Exception as e:  # noqa: BLE001 - pyarrow raises several types for damaged files
                raise self.bad_file(f, e) from None
            check_schema(self, table, f, schemas[-1])
        return _TableFiles(files, schemas)

    def _entry(self, table: str, rank: int) -> _TableFiles | None:
        if table not in TABLE_SCHEMAS:
            raise self.error(f"unknown table {table!r}; tables are {', '.join(TABLES)}")
        key = (table, int(rank))
        with self._lock:
            if int(rank) not in self._pinned:
                self._pinned.add(int(rank))
                self._pin_steps(int(rank))
            if key not in self._tables:
                self._tables[key] = _retry(lambda: self._list(table, rank))
            return self._tables[key]

    def _pin_steps(self, rank: int) -> None:
        """Read the (small) ``steps`` table whole before any other table of the rank is listed. A step's
        tasks, memory, queue rows are written before the step, and tables only grow, so every table read
        later holds the rows of every step read -- however the writer flushes and merges meanwhile."""
        def load() -> _TableFiles | None:
            e = self._list("steps", rank)
            if e is not None:
                e.columns.update(self._read_columns(e, e.names))
            return e
        try:
            self._tables[("steps", rank)] = _retry(load)
        except TraceError:
            pass  # a damaged steps table is reported when (and if) it is read

    def schema_names(self, table: str, rank: int = 0) -> list[str] | None:
        """The columns of the table (of any of its files), None when the table is absent."""
        e = self._entry(table, rank)
        return None if e is None else list(e.names)

    def arrow(self, table: str, rank: int = 0, columns: list[str] | None = None) -> pa.Table | None:
        """The table's ``columns`` (those present; all when None) as Arrow, each column read once and kept;
        None when the table is absent. A part file that vanishes (compaction) makes the table be listed and
        read again."""
        def get(e: _TableFiles) -> pa.Table:
            have = set(e.names)
            want = [c for c in (e.names if columns is None else columns) if c in have]
            with self._lock:
                missing = [c for c in want if c not in e.columns]
                if missing:
                    e.columns.update(self._read_columns(e, missing))
                return pa.table({c: e.columns[c] for c in want})

        return self._with_files(table, rank, get, None)

    def num_rows(self, table: str, rank: int = 0) -> int:
        def count(e: _TableFiles) -> int:
            if e.columns and all(c in e.columns for c in e.names):  # read already (steps): those rows
                return len(next(iter(e.columns.values())))
            total = 0
            for f in e.files:
                try:
                    total += pq.ParquetFile(f, memory_map=True).metadata.num_rows
                except FileNotFoundError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    raise self.bad_file(f, exc) from None
            return total

        return self._with_files(table, rank, count, 0)

    def _with_files(self, table: str, rank: int, fn, absent):
        """``fn(files)`` over the table's listed files; when one vanished (a compaction), list them again."""
        for attempt in range(COMPACTION_RETRIES + 1):
            e = self._entry(table, rank)
            if e is None:
                return absent
            try:
                return fn(e)
            except FileNotFoundError:
                if attempt == COMPACTION_RETRIES:
                    raise self.error(f"the files of table {table!r} kept changing while being read") from None
                with self._lock:
                    if self._tables.get((table, int(rank))) is e:
                        del self._tables[(table, int(rank))]
                time.sleep(0.02 * (attempt + 1))
        return absent  # pragma: no cover

    def _read_columns(self, e: _TableFiles, names: list[str]) -> dict[str, pa.ChunkedArray]:
        parts = []
        for f, schema in zip(e.files, e.schemas):
            has = set(schema.names)
            present = [c for c in names if c in has]
            try:
                with pq.ParquetFile(f, memory_map=True) as pf:
                    t = pf.read(columns=present, use_threads=pf.metadata.num_rows >= SMALL_FILE_ROWS)
            except FileNotFoundError:
                raise
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for damaged files
                raise self.bad_file(f, exc) from None
            parts.append((f, t, set(t.column_names)))
        out = {}
        for c in names:
            chunks = []
            types = set()
            for f, t, has in parts:
                if c in has:
                    col = t.column(c)
                    chunks.append(col)
                    types.add(col.type)
                else:  # a column a later writer added: absent from earlier parts
                    chunks.append(None)
            typ = _common_type(types)
            arrays = []
            for (f, t, _), col in zip(parts, chunks):
                if col is None:
                    arrays.append(pa.nulls(t.num_rows, typ))
                else:
                    arrays.extend(ch if ch.type == typ else _cast(ch, typ) for ch in col.chunks)
            out[c] = pa.chunked_array(arrays, typ)
        return out

    def table(self, table: str, rank: int = 0, columns: list[str] | None = None) -> pd.DataFrame:
        """The table as a DataFrame (absent: empty); a corrupt one is a TraceError."""
        t = self.arrow(table, rank, columns)
        if t is None:
            return pd.DataFrame(columns=columns or [])
        return t.to_pandas()

    # -- analyses memoised on the run -------------------------------------------------------------------------
    def memo(self, key, fn):
        """``fn()`` computed once per run object (the run is a snapshot: reopen it to see new data)."""
        with self._lock:
            if key in self._memo:
                return self._memo[key]
        value = fn()
        with self._lock:
            return self._memo.setdefault(key, value)


def _part_names(run: "Run", d: Path) -> list[str]:
    """The part file names in ``d`` (temporary dot-files and other names skipped); a directory of more than
    MAX_PART_FILES entries is refused (it is not one the writer leaves, and listing it could take minutes)."""
    names = []
    try:
        with os.scandir(d) as it:
            for k, entry in enumerate(it):
                if k >= MAX_PART_FILES:
                    raise run.error(f"{run.rel(d)}: more than {MAX_PART_FILES} part files")
                if entry.name.startswith("part-") and entry.name.endswith(".parquet"):
                    names.append(entry.name)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise run.error(f"{run.rel(d)}: cannot list it ({e.strerror or type(e).__name__})") from None
    return names


def live_parts(names: list[str]) -> tuple[list[str], str | None]:
    """Of a table directory's part file names, the ones to read, in row order, and a problem (or None).

    A part holds a contiguous range of the table's batches (``part-F-L.parquet``; ``part-N.parquet`` is batch
    N). The writer merges parts by writing the merged part and then removing the parts it replaces, so a
    reader (or a crash) can meet both: a part whose range another part contains is dropped, and every batch
    is read exactly once. What remains must cover the batches 0..L without a gap or a partial overlap; if
    not, ``problem`` says where (a listing that raced a merge: list again; otherwise a damaged run)."""
    ranges = []
    for n in names:
        m = PART_FILE.fullmatch(n)
        if m is None:
            return [], f"{n} is not a part file name (part-N.parquet or part-F-L.parquet)"
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) is not None else first
        if last < first:
            return [], f"{n}: the batch range {first}..{last} is reversed"
        ranges.append((first, -last, n))
    out, end = [], -1
    for first, neg_last, n in sorted(ranges):
        last = -neg_last
        if last <= end:  # inside a merged part that was renamed in before this one was removed
            continue
        if first > end + 1:
            return [], f"the part files of batches {end + 1}..{first - 1} are missing"
        if first <= end:
            return [], f"{n} overlaps batches {first}..{end} of another part file"
        out.append(n)
        end = last
    return out, None


def _common_type(types: set) -> pa.DataType:
    if not types:
        return pa.null()
    types = {t.value_type if pa.types.is_dictionary(t) else t for t in types} - {pa.null()}
    if not types:
        return pa.null()
    if len(types) == 1:
        return types.pop()
    if all(pa.types.is_integer(t) for t in types):
        return pa.int64()
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in types):
        return pa.float64()
    if all(pa.types.is_string(t) or pa.types.is_large_string(t) for t in types):
        return pa.string()
    return pa.string()


def _cast(a, typ):
    if pa.types.is_dictionary(a.type):
        a = a.dictionary_decode()
    return a if a.type == typ else pc.cast(a, typ, safe=False)


def _retry(fn):
    """``fn()`` again when a file vanished under it (a run compacted while it was listed)."""
    for attempt in range(COMPACTION_RETRIES + 1):
        try:
            return fn()
        except FileNotFoundError as e:
            if attempt == COMPACTION_RETRIES:
                raise TraceError(f"{e.filename or 'a file'} vanished while the run was read") from None
            time.sleep(0.02 * (attempt + 1))


# -- table schemas ------------------------------------------------------------------------------------------
def _kind_of(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    return str(t)


_ACCEPTS = {"int": {"int", "null"}, "float": {"float", "int", "null"}, "bool": {"bool", "int", "null"},
            "str": {"str", "null"}}
_EXPECTED = {"int": "integers", "float": "numbers", "bool": "booleans", "str": "strings"}


def check_schema(run: Run, table: str, path: Path, schema: pa.Schema) -> None:
    """Every column the trace format defines has its kind of type in ``path`` (unknown columns are ignored)."""
    expected = TABLE_SCHEMAS.get(table, {})
    for field in schema:
        want = expected.get(field.name)
        if want is None:
            continue
        got = _kind_of(field.type)
        if got not in _ACCEPTS[want]:
            raise run.error(f"{run.rel(path)}: column {field.name!r} holds {_EXPECTED.get(got, field.type)}, "
                            f"expected {_EXPECTED[want]} (docs/trace-format.md)")


# -- reading what an analyzer needs -------------------------------------------------------------------------
def read(run: Run, table: str, columns: dict, required: tuple = (), rank: int = 0) -> pd.DataFrame:
    """A DataFrame holding exactly ``columns`` (a dict name -> default): a column the file lacks gets its
    default (writers may add columns over time), a *required* column it lacks, or a column of the wrong kind,
    is a TraceError naming the run and the file. An absent table is an empty frame."""
    names = run.schema_names(table, rank)
    if names is None:
        return empty_frame(columns)
    e = run._entry(table, rank)
    for f, schema in zip(e.files, e.schemas):
        missing = [c for c in required if c not in schema.names]
        if missing:
            raise run.error(f"{run.rel(f)} has no column {', '.join(map(repr, missing))}")
    present = [c for c in columns if c in names]
    t = run.arrow(table, rank, present)
    n = t.num_rows if present else run.num_rows(table, rank)
    out = {}
    for c, default in columns.items():
        if c not in present:
            out[c] = np.full(n, default, dtype=object if isinstance(default, str) else None)
            continue
        a = t.column(c)
        kind = _kind_of(a.type)
        where = run.rel(e.files[0]) if e else table
        if isinstance(default, bool):
            if kind not in ("bool", "int", "null"):
                raise run.error(f"{where}: column {c!r} holds {a.type}, expected booleans")
            out[c] = (pc.fill_null(pc.cast(_cast(a, pa.int64()) if kind == "int" else a, pa.bool_()), False)
                      .to_numpy(zero_copy_only=False).astype(bool) if kind != "null" else np.zeros(n, bool))
        elif isinstance(default, (int, float)):
            if kind not in ("int", "float", "bool", "null"):
                raise run.error(f"{where}: column {c!r} holds {a.type}, expected numbers")
            if isinstance(default, int):
                a = (pc.fill_null(pc.cast(a, pa.int64(), safe=False), default) if kind != "null"
                     else pa.chunked_array([np.full(n, default, np.int64)]))
                out[c] = a.to_numpy()
            else:
                out[c] = (pc.cast(a, pa.float64(), safe=False).to_numpy(zero_copy_only=False) if kind != "null"
                          else np.full(n, np.nan))
        else:
            if kind not in ("str", "null"):
                raise run.error(f"{where}: column {c!r} holds {a.type}, expected strings")
            if kind == "null":
                out[c] = np.full(n, default, dtype=object)
            else:
                s = pc.fill_null(_cast(a, pa.string()) if pa.types.is_dictionary(a.type) else a, default)
                out[c] = s.to_numpy(zero_copy_only=False).astype(object)
    df = pd.DataFrame(out, columns=list(columns))
    for c, default in columns.items():
        if isinstance(default, bool):
            df[c] = df[c].astype(bool)
        elif isinstance(default, int):
            df[c] = df[c].astype(np.int64)
        elif isinstance(default, float):
            df[c] = df[c].astype(float)
        else:
            df[c] = df[c].astype(object)
    return df


def empty_frame(columns: dict) -> pd.DataFrame:
    out = {}
    for c, d in columns.items():
        if isinstance(d, bool):
            out[c] = pd.Series([], dtype=bool)
        elif isinstance(d, int):
            out[c] = pd.Series([], dtype=np.int64)
        elif isinstance(d, float):
            out[c] = pd.Series([], dtype=float)
        else:
            out[c] = pd.Series([], dtype=object)
    return pd.DataFrame(out)


def read_rows(run: Run, table: str, rows: np.ndarray, columns: dict, rank: int = 0) -> pa.Table:
    """Rows of ``table`` by global position (files in order, then rows), reading just the Parquet row groups
    that hold them; string columns as strings, numbers as int64 (``columns``: name -> default)."""
    rows = np.asarray(rows, np.int64)
    strings = [c for c, d in columns.items() if isinstance(d, str)]

    def attempt():
        groups = []  # (global start, file, row group, rows)
        at = 0
        for f in run.table_files(table, rank):
            try:
                meta = pq.ParquetFile(f, memory_map=True).metadata
            except FileNotFoundError:
                raise
            except Exception as e:  # noqa: BLE001
                raise run.bad_file(f, e) from None
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                groups.append((at, f, g, n))
                at += n
        if len(rows) and (rows.min() < 0 or rows.max() >= at):
            raise IndexError(f"{table} rows out of range (the run holds {at})")
        starts = np.array([g[0] for g in groups], np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        parts, order = [], []
        for k in np.unique(which):
            g0, f, g, _ = groups[k]
            sel = np.flatnonzero(which == k)
            try:
                pf = pq.ParquetFile(f, memory_map=True)
                names = pf.schema_arrow.names
                check_schema(run, table, f, pf.schema_arrow)
                t = pf.read_row_group(g, columns=[c for c in columns if c in names])
            except (FileNotFoundError, TraceError):
                raise
            except Exception as e:  # noqa: BLE001
                raise run.bad_file(f, e) from None
            t = t.take(pa.array(rows[sel] - g0))
            cols = {}
            for c, d in columns.items():
                if c in t.column_names:
                    a = t.column(c)
                    cols[c] = _cast(a, pa.string()) if c in strings else pc.fill_null(
                        pc.cast(a, pa.int64(), safe=False), d)
                else:
                    cols[c] = pa.array([d] * t.num_rows, pa.string() if c in strings else pa.int64())
            parts.append(pa.table(cols))
            order.append(sel)
        if not parts:
            return pa.table({c: pa.array([], pa.string() if c in strings else pa.int64()) for c in columns})
        out = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        back = np.empty(len(rows), np.int64)
        back[np.concatenate(order)] = np.arange(len(rows))
        return out.take(pa.array(back))

    return _retry(attempt)


# -- small helpers the analyzers share ----------------------------------------------------------------------
def task_columns(*names: str) -> dict:
    return {c: TASK_DEFAULTS[c] for c in names}


def as_run(run: Run | str | os.PathLike) -> Run:
    return run if isinstance(run, Run) else open_run(run)


def table_files(run: Run, table: str, rank: int = 0) -> list[Path]:
    return run.table_files(table, rank)


def rel(run: Run, path: Path) -> str:
    return run.rel(path)


def bad_file(run: Run, path: Path, exc: BaseException) -> TraceError:
    """The TraceError for a file that cannot be read (one that vanished too: readers without a retry)."""
    try:
        return run.bad_file(path, exc)
    except FileNotFoundError:
        return run.error(f"{run.rel(path)} vanished while it was read (the run was being compacted); read it again")


def schema_names(run: Run, table: str, rank: int = 0) -> list[str] | None:
    return run.schema_names(table, rank)


def ms(ns) -> float:
    return float(ns) / NS_PER_MS


def capacity_bytes(run: Run) -> int:
    return int(run.meta.device.capacity_bytes or 0)


# -- opening and finding runs -------------------------------------------------------------------------------
def open_run(run_dir: str | os.PathLike) -> Run:
    """The run in ``run_dir``, its manifest validated; TraceError naming the run and file otherwise."""
    p = Path(run_dir)
    if not p.is_dir():
        raise TraceError(f"{run_dir}: no such run directory")
    real = os.path.realpath(p)
    mpath = p / MANIFEST
    if not mpath.exists() and not mpath.is_symlink():
        raise TraceError(f"{run_dir}: not an Insight run (no {MANIFEST})")
    if _escapes(mpath, real):
        raise TraceError(f"{mpath}: {MANIFEST} is a symbolic link leaving the run directory")
    if not mpath.is_file():
        raise TraceError(f"{mpath}: {MANIFEST} is not a file")
    raw = parse_json(mpath, str(mpath))
    run = Run(p, validate_manifest(raw, str(mpath)))
    rank0 = p / "rank_0"
    others = [r for r in run.ranks if r != 0 and (p / f"rank_{r}").is_dir()]  # a multi-rank run still opens
    if run.meta.status == "complete" and run.meta.step_count > 0 and not (rank0.exists() or rank0.is_symlink()) \
            and not others:
        raise TraceError(f"{p}: the manifest says the run is complete with {run.meta.step_count} steps, but "
                         f"rank_0/ is missing")
    if rank0.exists() or rank0.is_symlink():
        run.check_inside(rank0)
    return run


def find_runs(base_dir: str | os.PathLike) -> list[Path]:
    """Run directories under ``base_dir``: itself if it is a run, else its direct sub-directories holding a
    manifest (readable or not: ``discover_runs`` says which are broken)."""
    base = Path(base_dir)
    if not base.is_dir():
        raise TraceError(f"{base_dir}: no such directory")
    if (base / MANIFEST).exists():
        return [base]
    out = []
    try:
        entries = sorted(base.iterdir())
    except OSError as e:
        raise TraceError(f"{base_dir}: cannot list it ({e.strerror})") from None
    for d in entries:
        try:
            if d.is_dir() and ((d / MANIFEST).exists() or (d / MANIFEST).is_symlink()):
                out.append(d)
        except OSError:  # a symlink loop, a permission problem: not a run we can list
            continue
    return out


@dataclass
class RunEntry:
    """One run of a base dir: ``run`` when it opens, else ``error`` (one line)."""
    id: str
    path: Path
    run: Run | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.run is not None


def discover_runs(base_dir: str | os.PathLike) -> list[RunEntry]:
    """Every run of ``base_dir`` (as ``find_runs``), each opened on its own: a broken one (a bad manifest, a
    symbolic link leaving the base dir, ...) is an entry with its error and never hides the others."""
    base = Path(base_dir)
    base_real = os.path.realpath(base)
    out = []
    for p in find_runs(base):
        rid = "." if p == base else p.name
        try:
            if p != base and (p.is_symlink() or _escapes(p, base_real)):
                raise TraceError(f"{p}: the run directory is a symbolic link leaving the base directory")
            out.append(RunEntry(rid, p, run=open_run(p)))
        except TraceError as e:
            out.append(RunEntry(rid, p, error=str(e).splitlines()[0] if str(e) else "unreadable"))
        except (OSError, ValueError, RecursionError, MemoryError) as e:
            out.append(RunEntry(rid, p, error=f"{p}: {type(e).__name__}: {str(e)[:200]}"))
    return out


def resolve_run(base_dir: str | os.PathLike, run_id: str) -> Path:
    """The run called ``run_id`` directly inside ``base_dir``; never a path outside it."""
    base = Path(base_dir).resolve()
    if (not isinstance(run_id, str) or not run_id or len(run_id) > 255 or run_id in (".", "..") or "/" in run_id
            or "\\" in run_id or "\x00" in run_id):
        raise TraceError(f"no run named {str(run_id)[:80]!r} in {base_dir}")
    try:
        p = (base / run_id).resolve()
        ok = p.parent == base and (p / MANIFEST).exists()
    except (OSError, ValueError, RuntimeError):
        ok = False
    if not ok:
        raise TraceError(f"no run named {run_id!r} in {base_dir}")
    return p
