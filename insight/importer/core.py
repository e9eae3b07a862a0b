"""``import_traces``: Chrome / Kineto trace files -> one Insight run directory (docs/import.md).

Each file is one rank (its ``distributedInfo.rank``, else its position on the command line). A file is read
as a stream (``insight.importer.reader``), reduced to compact columns (``events``), mapped to the tables of
docs/trace-format.md (``mapping``) and written as Parquet in row groups; then its columns are dropped before
the next file is read. Everything is written into a hidden temporary directory next to the output, renamed
to the output at the very end: a failed import (a malformed file, Ctrl-C) leaves nothing that looks like a
run.
"""
from __future__ import annotations

import gc
import importlib.metadata
import os
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from collectors.buffers import dictionary_schema
from collectors.schema import SCHEMA_VERSION, SCHEMAS, TIME_COLUMNS
from collectors.writer import MANIFEST, write_json_atomic, write_options
from insight.importer.events import EventColumns
from insight.importer.mapping import Codes, RankTables, build
from insight.importer.reader import TraceReader

ROW_GROUP = 1 << 18
PROGRESS_MIN_BYTES = 8 << 20  # a progress bar for inputs at least this large
MAX_STREAMS = 256  # listed in the manifest (its reader's limit); the tasks table names every stream anyway
_I64, _S = pa.int64(), pa.string()
# the tasks table of an imported run carries three more columns (the format lets writers add columns)
TASK_SCHEMA = pa.schema(list(SCHEMAS["tasks"]) + [pa.field("correlation", _I64), pa.field("external_id", _I64),
                                                  pa.field("launch_task", _I64)])
FLOW_SCHEMA = pa.schema([pa.field("cat", _S), pa.field("id", _S), pa.field("src_task", _I64),
                         pa.field("dst_task", _I64), pa.field("src_ns", _I64), pa.field("dst_ns", _I64)])
# C (counter) events: one row per series value (an added table, docs/import.md)
COUNTER_SCHEMA = pa.schema([pa.field("name", _S), pa.field("series", _S), pa.field("process", _S),
                            pa.field("t_ns", _I64), pa.field("value", pa.float64()), pa.field("step", pa.int32())])
TABLE_SCHEMAS = {"tasks": TASK_SCHEMA, "steps": SCHEMAS["steps"], "memory": SCHEMAS["memory"],
                 "host_ops": SCHEMAS["host_ops"], "flows": FLOW_SCHEMA, "counters": COUNTER_SCHEMA}
TIMES = dict(TIME_COLUMNS, flows=("src_ns", "dst_ns"), counters=("t_ns",))


class TraceImportError(Exception):
    """The import cannot go on (bad arguments, an output that exists, two files of one rank). One line."""


@dataclass
class ImportResult:
    path: Path
    source: str
    ranks: list
    files: list = field(default_factory=list)  # per file: path, rank, flavor, counts, skipped

    @property
    def skipped(self) -> dict:
        out: dict = {}
        for f in self.files:
            for k, v in f["skipped"].items():
                out[k] = out.get(k, 0) + v
        return out

    def count(self, what: str) -> int:
        return sum(f["counts"].get(what, 0) for f in self.files)


def read_trace(path, progress=None) -> tuple[EventColumns, dict]:
    """Parse one trace file into columns (pass 1); raises MalformedTrace."""
    cols = EventColumns()
    reader = TraceReader(path, progress=progress, scan=cols.scan)
    # the parser makes millions of short-lived dicts and lists: with the cyclic GC on, its collections would
    # cost more than the parsing (they find nothing: events hold no cycles)
    enabled = gc.isenabled()
    gc.disable()
    try:
        reader.run(cols.feed)
    finally:
        if enabled:
            gc.enable()
    return cols, reader.header


def _rank_of(header: dict) -> int | None:
    info = header.get("distributedInfo")
    if isinstance(info, dict):
        r = info.get("rank")
        if isinstance(r, int) and not isinstance(r, bool) and r >= 0:
            return r
        if isinstance(r, str) and r.isdigit():
            return int(r)
    return None


def import_traces(paths, output, name: str | None = None, progress: bool = False) -> ImportResult:
    paths = [Path(p) for p in paths]
    if not paths:
        raise TraceImportError("no trace files given")
    for p in paths:
        if not p.is_file():
            raise TraceImportError(f"{p}: no such file")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TraceImportError(f"{out} already exists; choose a new --output directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    total = sum(p.stat().st_size for p in paths)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False,
               desc="import", disable=not progress or total < PROGRESS_MIN_BYTES)
    try:
        ranks: dict = {}
        files = []
        done = 0
        for i, p in enumerate(paths):
            def tick(off, _done=done):
                bar.update(max(0, min(total, _done + off) - bar.n))

            cols, header = read_trace(p, progress=tick if not bar.disable else None)
            done += p.stat().st_size
            rank = _rank_of(header)
            if rank is None:
                rank = i if i not in ranks else max(ranks) + 1
            if rank in ranks:
                raise TraceImportError(f"{p}: rank {rank} is also the rank of {ranks[rank]['path']} "
                                       f"(distributedInfo.rank); give each rank's trace once")
            rt = build(cols, header, rank)
            del cols
            _write_rank(tmp, rt)
            ranks[rank] = {"path": str(p), "rank": rank, "flavor": rt.flavor, "counts": rt.counts,
                           "skipped": rt.skipped, "zero": rt.zero_abs_ns, "streams": rt.streams,
                           "device": rt.device, "header": rt.header}
            del rt  # this rank's tables are on disk: free them before the next file is read
            files.append(ranks[rank])
        zero = min(r["zero"] for r in ranks.values())
        for r, info in ranks.items():
            if info["zero"] != zero:
                _shift_rank(tmp / f"rank_{r}", info["zero"] - zero)
        manifest = _manifest(out, name, ranks, zero)
        write_json_atomic(tmp / MANIFEST, manifest)
        if out.exists():
            out.rmdir()  # an empty directory given as the output
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    source = "kineto" if any(f["flavor"] == "kineto" for f in files) else "chrome"
    return ImportResult(out, source, sorted(ranks), [{k: v for k, v in f.items() if k not in ("header", "zero")}
                                                     for f in files])


def _manifest(out: Path, name: str | None, ranks: dict, zero: int) -> dict:
    first = ranks[min(ranks)]
    flavors = {r["flavor"] for r in ranks.values()}
    source = "kineto" if "kineto" in flavors else "chrome"
    created = datetime.now(timezone.utc)
    if 946684800 * 10**9 <= zero <= 4102444800 * 10**9:  # the trace clock is Unix time (2000..2100)
        created = datetime.fromtimestamp(zero / 1e9, timezone.utc)
    return {
        "schema_version": SCHEMA_VERSION, "run_id": uuid.uuid4().hex, "name": name or out.name,
        "created": created.isoformat(), "start_perf_ns": int(zero), "status": "complete",
        "device": first["device"], "streams": first["streams"][:MAX_STREAMS], "ranks": sorted(ranks),
        "step_count": int(first["counts"].get("steps", 0)),
        "tables": {t: f"rank_{min(ranks)}/{t}.parquet" for t in TABLE_SCHEMAS},
        "options": {}, "runtime": {"version": _version(), "python": sys.version.split()[0]},
        "source": source,
        "import": {"files": [{"path": r["path"], "rank": r["rank"], "flavor": r["flavor"], "counts": r["counts"],
                              "skipped": r["skipped"],
                              "trace": {k: v for k, v in r["header"].items()
                                        if k in ("schemaVersion", "distributedInfo", "baseTimeNanoseconds",
                                                 "traceName", "displayTimeUnit", "trace_id", "host_name")}}
                             for r in sorted(ranks.values(), key=lambda r: r["rank"])]},
    }


def _version() -> str:
    try:
        return importlib.metadata.version("insight-profiler")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _arrow(col, typ: pa.DataType) -> pa.Array:
    if isinstance(col, pa.Array):  # (built by the mapping as Arrow already)
        return col.dictionary_encode() if pa.types.is_string(typ) else col.cast(typ)
    if pa.types.is_string(typ):
        return pa.array(col, _S).dictionary_encode()
    if typ == pa.bool_():
        return pa.array(np.asarray(col, bool))
    return pa.array(np.asarray(col).astype(typ.to_pandas_dtype(), copy=False), typ)


def _default(typ: pa.DataType, n: int):
    """A column the mapping does not fill (e.g. one added to the format later): the format's missing value."""
    if pa.types.is_string(typ):
        return np.array([""] * n, object)
    if pa.types.is_floating(typ):
        return np.full(n, np.nan)
    if typ == pa.bool_():
        return np.zeros(n, bool)
    return np.full(n, -1, np.int64)


def _write_rank(run_dir: Path, rt: RankTables) -> None:
    d = run_dir / f"rank_{rt.rank}"
    d.mkdir()
    for table, schema in TABLE_SCHEMAS.items():
        cols = rt.tables.get(table)
        n = len(next(iter(cols.values()))) if cols else 0
        dschema = dictionary_schema(schema)
        with pq.ParquetWriter(d / f"{table}.parquet", dschema, store_schema=False, **write_options(schema)) as w:
            if n == 0:
                w.write_table(dschema.empty_table())
            # string codes: one compact dictionary per column (the values it uses), indices per row group
            dicts = {}
            for f in schema:
                v = cols.get(f.name) if cols else None
                if isinstance(v, Codes):  # (bincount, not a sort: codes index a known table)
                    used = np.flatnonzero(np.bincount(v.codes, minlength=len(v.values)))
                    remap = np.zeros(len(v.values), np.int32)
                    remap[used] = np.arange(len(used), dtype=np.int32)
                    dicts[f.name] = (remap[v.codes], pa.array(v.values[used].tolist(), _S))
            for a in range(0, n, ROW_GROUP):
                b = min(n, a + ROW_GROUP)
                arrays = [pa.DictionaryArray.from_arrays(pa.array(dicts[f.name][0][a:b]), dicts[f.name][1])
                          if f.name in dicts else
                          _arrow(cols[f.name][a:b] if f.name in cols else _default(f.type, b - a), f.type)
                          for f in schema]
                w.write_table(pa.Table.from_arrays(arrays, schema=dschema), row_group_size=b - a)


def _shift_rank(rank_dir: Path, delta: int) -> None:
    """Add ``delta`` ns to every time column of a rank written relative to its own first event (-1 stays)."""
    for table, schema in TABLE_SCHEMAS.items():
        src = rank_dir / f"{table}.parquet"
        times = TIMES.get(table, ())
        if not times or not src.exists():
            continue
        dst = rank_dir / f".{table}.parquet.shift"
        dschema = dictionary_schema(schema)
        strings = [f.name for f in schema if pa.types.is_string(f.type)]
        with pq.ParquetFile(src, read_dictionary=strings) as pf, \
                pq.ParquetWriter(dst, dschema, store_schema=False, **write_options(schema)) as w:
            if pf.metadata.num_row_groups == 0:
                w.write_table(dschema.empty_table())
            for g in range(pf.metadata.num_row_groups):
                t = pf.read_row_group(g)
                for c in times:
                    a = t.column(c).to_numpy()
                    t = t.set_column(t.schema.get_field_index(c), c, pa.array(np.where(a == -1, -1, a + delta)))
                w.write_table(t.cast(dschema), row_group_size=max(t.num_rows, 1))
        os.replace(dst, src)
