"""Reading the tables an analyzer needs, with the checks that turn a bad run into one TraceError.

``read(run, table, columns, required)`` returns a DataFrame holding exactly ``columns`` (a dict
name -> default): a column the file lacks gets its default (the trace format lets writers add
columns over time), a *required* column it lacks, or a column of the wrong kind, is a TraceError
naming the run and the file. An absent table is an empty frame: a run may legitimately lack
memory or dataset data.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from insight.trace import Run, TraceError, open_run

NS_PER_MS = 1e6

# every column of the tasks table (docs/trace-format.md) with the value a writer that lacks it implies
TASK_DEFAULTS = {"step": -1, "graph": "", "task_id": -1, "name": "", "op": "", "kind": "", "stream": "",
                 "stream_id": -1, "scope": "", "phase": "", "start_ns": -1, "end_ns": -1, "dur_ns": -1, "flops": -1,
                 "bytes": -1, "shape": "", "dtype": "", "fused_ops": ""}


def task_columns(*names: str) -> dict:
    return {c: TASK_DEFAULTS[c] for c in names}


def as_run(run: Run | str | os.PathLike) -> Run:
    return run if isinstance(run, Run) else open_run(run)


def table_files(run: Run, table: str, rank: int = 0) -> list[Path]:
    """The Parquet files holding ``table`` (one compacted file, or the part files in order)."""
    p = run.table_path(table, rank)
    if p is None:
        return []
    return sorted(p.glob("part-*.parquet")) if p.is_dir() else [p]


def rel(run: Run, path: Path) -> str:
    try:
        return str(path.relative_to(run.path))
    except ValueError:
        return str(path)


def bad_file(run: Run, path: Path, exc: BaseException) -> TraceError:
    msg = str(exc).splitlines()[0] if str(exc) else "corrupt"
    return TraceError(f"run {run.name!r}: cannot read {rel(run, path)} ({type(exc).__name__}: {msg})")


def schema_names(run: Run, table: str, rank: int = 0) -> list[str] | None:
    files = table_files(run, table, rank)
    if not files:
        return None
    try:
        return list(pq.read_schema(files[0]).names)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for damaged files
        raise bad_file(run, files[0], e) from None


def read(run: Run, table: str, columns: dict, required: tuple = (), rank: int = 0) -> pd.DataFrame:
    names = schema_names(run, table, rank)
    if names is None:
        return empty_frame(columns)
    where = rel(run, table_files(run, table, rank)[0])
    missing = [c for c in required if c not in names]
    if missing:
        raise TraceError(f"run {run.name!r}: {where} has no column {', '.join(map(repr, missing))}")
    present = [c for c in columns if c in names]
    # with none of the wanted columns present, read one column anyway to keep the row count
    df = run.table(table, rank, present or names[:1])[present]
    for c, default in columns.items():
        if c not in df.columns:
            df[c] = default
            continue
        col = df[c]
        if isinstance(default, bool):
            df[c] = col.fillna(False).astype(bool)
        elif isinstance(default, (int, float)):
            if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
                raise TraceError(f"run {run.name!r}: {where}: column {c!r} holds {col.dtype}, expected numbers")
            if isinstance(default, int):
                df[c] = col.fillna(default).astype(np.int64)
            else:
                df[c] = col.astype(float)
        else:
            df[c] = col.fillna(default).astype(str)
    return df[list(columns)]


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
            out[c] = pd.Series([], dtype=str)
    return pd.DataFrame(out)


def ms(ns) -> float:
    return float(ns) / NS_PER_MS


def capacity_bytes(run: Run) -> int:
    dev = run.manifest.get("device") or {}
    try:
        return int(dev.get("capacity_bytes") or 0)
    except (TypeError, ValueError):
        return 0
