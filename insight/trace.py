"""Reading profiled runs (see docs/trace-format.md): discovery, manifest checks, tables as DataFrames.

Every problem with a run on disk becomes one ``TraceError`` whose message names the run and the file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TABLES = ("tasks", "steps", "memory", "device_queue", "dataset_pipeline", "dataset_ops", "dataset_queues",
          "graphs", "host_ops")


class TraceError(Exception):
    """A run cannot be read: missing or bad manifest, newer schema, corrupt or missing table."""


@dataclass
class Run:
    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest.get("name") or self.path.name

    @property
    def ranks(self) -> list[int]:
        return list(self.manifest.get("ranks") or [0])

    def table_path(self, table: str, rank: int = 0) -> Path | None:
        base = self.path / f"rank_{rank}"
        single = base / f"{table}.parquet"
        if single.exists():
            return single
        parts = base / table
        if parts.is_dir() and any(parts.glob("part-*.parquet")):
            return parts
        return None

    def has_table(self, table: str, rank: int = 0) -> bool:
        return self.table_path(table, rank) is not None

    def table(self, table: str, rank: int = 0, columns: list[str] | None = None) -> pd.DataFrame:
        """The table as a DataFrame; an absent table is an empty DataFrame, a corrupt one a TraceError."""
        if table not in TABLES:
            raise TraceError(f"{self.path}: unknown table {table!r}; tables are {', '.join(TABLES)}")
        p = self.table_path(table, rank)
        if p is None:
            return pd.DataFrame(columns=columns or [])
        try:
            if p.is_dir():
                parts = sorted(p.glob("part-*.parquet"))
                frames = [pd.read_parquet(f, columns=columns) for f in parts]
                return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns or [])
            return pd.read_parquet(p, columns=columns)
        except Exception as e:  # pyarrow raises several types for damaged files
            raise TraceError(f"run {self.name!r}: cannot read {p.relative_to(self.path)} "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt'})") from None


def read_manifest(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / MANIFEST
    if not path.exists():
        raise TraceError(f"{run_dir}: not an Insight run (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceError(f"{path}: the manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise TraceError(f"{path}: the manifest has no schema_version")
    v = manifest["schema_version"]
    if not isinstance(v, int) or v > SCHEMA_VERSION:
        raise TraceError(f"{path}: schema version {v} is newer than this Insight reads ({SCHEMA_VERSION}); "
                         f"upgrade Insight to read this run")
    return manifest


def open_run(run_dir: str | os.PathLike) -> Run:
    p = Path(run_dir)
    if not p.is_dir():
        raise TraceError(f"{run_dir}: no such run directory")
    return Run(p, read_manifest(p))


def find_runs(base_dir: str | os.PathLike) -> list[Path]:
    """Run directories under ``base_dir``: itself if it is a run, else its direct sub-directories that are."""
    base = Path(base_dir)
    if not base.is_dir():
        raise TraceError(f"{base_dir}: no such directory")
    if (base / MANIFEST).exists():
        return [base]
    return sorted(d for d in base.iterdir() if d.is_dir() and (d / MANIFEST).exists())


def resolve_run(base_dir: str | os.PathLike, run_id: str) -> Path:
    """The run called ``run_id`` directly inside ``base_dir``; never a path outside it."""
    base = Path(base_dir).resolve()
    if not run_id or run_id in (".", "..") or "/" in run_id or "\\" in run_id or "\x00" in run_id:
        raise TraceError(f"no run named {run_id!r} in {base_dir}")
    p = (base / run_id).resolve()
    if p.parent != base or not (p / MANIFEST).exists():
        raise TraceError(f"no run named {run_id!r} in {base_dir}")
    return p
