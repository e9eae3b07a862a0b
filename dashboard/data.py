"""The dashboard's view of the runs on disk: discovery, safe lookup by id, one loaded run per run, cached
analyses.

The dashboard never imports ``runtime``: everything it shows comes from ``insight.analysis`` over the
Parquet files of a run. Runs are re-discovered at most every ``reload_interval`` seconds. Each run is opened
once (an ``insight.trace.Run``: its tables read lazily and once, analyses memoised on it) and reopened when
its manifest changes (a run still being written). Analyses are cached per run -- failures too, so a broken
run is not re-read on every request -- until the manifest changes. A run that cannot be opened is an entry
with its error (``RunStore.entries``): one broken run never hides the others.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from insight.analysis.timeline import prepare_index
from insight.trace import MANIFEST, Run, TraceError, find_runs, open_run, resolve_run


MAX_OPEN_RUNS = 32


class RunNotFound(LookupError):
    pass


@dataclass
class Entry:
    """A run of the base dir as the Runs page lists it: ``error`` is None for a readable run."""
    id: str
    path: Path
    manifest: dict | None
    error: str | None = None


def _one_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:500]


class RunStore:
    def __init__(self, base_dir, reload_interval: float = 3.0, cache_size: int = 256):
        self.base_dir = Path(base_dir).resolve()
        if not self.base_dir.is_dir():
            raise TraceError(f"--summary-base-dir {base_dir}: no such directory")
        self.reload_interval = float(reload_interval)
        self._runs: list[Path] = []
        self._scanned = 0.0
        self._open: OrderedDict = OrderedDict()   # run dir -> (stamp, Run | TraceError), least recent first
        self._cache: OrderedDict = OrderedDict()  # (run dir, what, args) -> (stamp, ok, value)
        self._cache_size = cache_size
        self._lock = threading.RLock()
        # big runs get their timeline index built in the background when first discovered (one at a time)
        self._seen: set[Path] = set()
        self._to_index: queue.Queue = queue.Queue()
        self._indexer: threading.Thread | None = None

    # -- discovery ----------------------------------------------------------------------------------
    def run_dirs(self) -> list[Path]:
        with self._lock:
            if time.monotonic() - self._scanned >= self.reload_interval or not self._scanned:
                try:
                    self._runs = find_runs(self.base_dir)
                except TraceError:
                    self._runs = []
                self._scanned = time.monotonic()
                self._index_new_runs()
            return list(self._runs)

    def _index_new_runs(self) -> None:
        new = [p for p in self._runs if p not in self._seen]
        if not new:
            return
        self._seen.update(new)
        for p in new:
            self._to_index.put(p)
        if self._indexer is None:
            self._indexer = threading.Thread(target=self._index_worker, name="insight-index-runs", daemon=True)
            self._indexer.start()

    def _index_worker(self) -> None:
        """Builds the timeline index of each newly discovered run of a million tasks or more, so its first
        timeline view is fast; a run that cannot be read is left to the pages, which report it."""
        while True:
            p = self._to_index.get()
            try:
                run = open_run(p)
                for rank in run.ranks:
                    prepare_index(run, rank)
            except Exception:  # noqa: BLE001 - a broken run is the pages' to report, not this thread's
                pass

    def run_ids(self) -> list[str]:
        return [self._id(p) for p in self.run_dirs()]

    def _id(self, p: Path) -> str:
        return p.name if p != self.base_dir else "."

    def entries(self) -> list[Entry]:
        """Every run of the base dir, readable or not: a broken run is an entry with its error."""
        out = []
        for p in self.run_dirs():
            rid = self._id(p)
            try:
                out.append(Entry(rid, p, self.run(rid).manifest))
            except (TraceError, RunNotFound) as e:
                msg = _one_line(e) if isinstance(e, TraceError) else \
                    f"{rid}: the run directory is a symbolic link leaving the base directory, or vanished"
                out.append(Entry(rid, p, None, msg))
        return out

    def path(self, run_id: str) -> Path:
        """The run's directory; never anything outside the base dir (``../x``, absolute paths, links)."""
        if not isinstance(run_id, str):
            raise RunNotFound(str(run_id)[:80])
        if run_id == "." and (self.base_dir / MANIFEST).exists():
            return self.base_dir
        try:
            return resolve_run(self.base_dir, run_id)
        except TraceError:
            raise RunNotFound(run_id[:255]) from None

    # -- one loaded run per run ---------------------------------------------------------------------------
    def _stamp(self, p: Path) -> tuple:
        try:
            m = (p / MANIFEST).stat()
            return (m.st_mtime_ns, m.st_size, m.st_ino)
        except OSError:
            return (0, 0, 0)

    def run(self, run_id: str) -> Run:
        """The run, opened once per version of its manifest. Raises RunNotFound / TraceError (a failure to
        open is remembered until the manifest changes)."""
        p = self.path(run_id)
        stamp = self._stamp(p)
        with self._lock:
            hit = self._open.get(str(p))
            if hit is not None and hit[0] == stamp:
                self._open.move_to_end(str(p))
                return _value(hit[1])
        try:
            value = open_run(p)
        except TraceError as e:
            value = TraceError(_one_line(e))
        with self._lock:
            self._open[str(p)] = (stamp, value)
            while len(self._open) > MAX_OPEN_RUNS:  # a loaded run keeps the columns read so far
                self._open.popitem(last=False)
        return _value(value)

    # -- cached analyses -----------------------------------------------------------------------------
    def get(self, run_id: str, what: str, fn, *args):
        """``fn(run, *args)`` for the run, cached until the run changes -- a TraceError too.
        Raises RunNotFound / TraceError."""
        p = self.path(run_id)
        key = (str(p), what, args)
        stamp = self._stamp(p)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == stamp:
                self._cache.move_to_end(key)
                return _value(hit[1])
        run = self.run(run_id)
        try:
            value = fn(run, *args)
        except TraceError as e:
            value = TraceError(_one_line(e))
        with self._lock:
            self._cache[key] = (stamp, value)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return _value(value)

    def get_pair(self, run_a: str, run_b: str, what: str, fn):
        """``fn(run_a, run_b)`` over the two loaded runs, cached until either run changes."""
        b = self.run(run_b)
        return self.get(run_a, what, lambda run, _b_key: fn(run, b), (str(self.path(run_b)),
                                                                      self._stamp(self.path(run_b))))

    def manifest(self, run_id: str) -> dict:
        return self.run(run_id).manifest


def _value(v):
    if isinstance(v, TraceError):
        raise TraceError(str(v))
    return v


_store: RunStore | None = None


def set_store(store: RunStore) -> None:
    global _store
    _store = store


def store() -> RunStore:
    if _store is None:
        raise RuntimeError("the dashboard's RunStore is not set: create the app with dashboard.app.create_app")
    return _store
