"""The dashboard's view of the runs on disk: discovery, safe lookup by id, and cached analyses.

The dashboard never imports ``runtime``: everything it shows comes from ``insight.analysis`` over the
Parquet files of a run. Runs are re-discovered at most every ``reload_interval`` seconds; analyses are
cached per run and recomputed when the run's manifest changes (a run still being written).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

from insight.trace import TraceError, find_runs, open_run, resolve_run


class RunNotFound(LookupError):
    pass


class RunStore:
    def __init__(self, base_dir, reload_interval: float = 3.0, cache_size: int = 64):
        self.base_dir = Path(base_dir).resolve()
        if not self.base_dir.is_dir():
            raise TraceError(f"--summary-base-dir {base_dir}: no such directory")
        self.reload_interval = float(reload_interval)
        self._runs: list[Path] = []
        self._scanned = 0.0
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.RLock()

    # -- discovery ----------------------------------------------------------------------------------
    def run_dirs(self) -> list[Path]:
        with self._lock:
            if time.monotonic() - self._scanned >= self.reload_interval or not self._scanned:
                self._runs = find_runs(self.base_dir)
                self._scanned = time.monotonic()
            return list(self._runs)

    def run_ids(self) -> list[str]:
        return [p.name if p != self.base_dir else "." for p in self.run_dirs()]

    def path(self, run_id: str) -> Path:
        """The run's directory; never anything outside the base dir (``../x``, absolute paths)."""
        if run_id == "." and (self.base_dir / "manifest.json").exists():
            return self.base_dir
        try:
            return resolve_run(self.base_dir, run_id)
        except TraceError:
            raise RunNotFound(run_id) from None

    # -- cached analyses -----------------------------------------------------------------------------
    def _stamp(self, p: Path) -> tuple:
        try:
            m = (p / "manifest.json").stat()
            return (m.st_mtime_ns, m.st_size)
        except OSError:
            return (0, 0)

    def get(self, run_id: str, what: str, fn, *args):
        """``fn(run, *args)`` for the run, cached until the run changes. Raises RunNotFound / TraceError."""
        p = self.path(run_id)
        key = (str(p), what, args)
        stamp = self._stamp(p)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == stamp:
                self._cache.move_to_end(key)
                return hit[1]
        run = open_run(p)
        value = fn(run, *args)
        with self._lock:
            self._cache[key] = (stamp, value)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return value

    def manifest(self, run_id: str) -> dict:
        return self.get(run_id, "manifest", lambda run: run.manifest)


_store: RunStore | None = None


def set_store(store: RunStore) -> None:
    global _store
    _store = store


def store() -> RunStore:
    if _store is None:
        raise RuntimeError("the dashboard's RunStore is not set: create the app with dashboard.app.create_app")
    return _store
