"""The Profiler: records a training run into a run directory (docs/trace-format.md).

    from insight import Profiler, schedule

    with Profiler("runs/lenet") as prof:          # records from here ...
        model.train(3, ds)
    # ... to here; runs/lenet is complete: insight start --summary-base-dir runs

    prof = Profiler("runs/lenet2", start_profile=False)
    model.train(3, ds, callbacks=[prof.callback(10, 19)])   # only global steps 10..19

    prof = Profiler("runs/lenet3", schedule=schedule(wait=1, warmup=1, active=3, repeat=2))

While recording, the collectors (``collectors/``) subscribe to ``runtime.hooks`` and only append to
in-memory buffers; a background thread writes what they collected every ``flush_interval`` seconds as
part files and rewrites the manifest, so a crash loses at most the last interval (a second thread merges
the part files as they accumulate). ``stop()`` writes the last flush and marks the run complete.
"""
from __future__ import annotations

import atexit
import enum
import fcntl
import json
import os
import platform
import shutil
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from collectors import (SCHEMA_VERSION, GraphRegistry, GraphsCollector, HostOpsCollector, MemoryCollector,
                        MindDataCollector, RunWriter, StepsCollector, TasksCollector)
from collectors.tasks import StepStore
from collectors.writer import MANIFEST, write_json_atomic
from runtime import communication, hooks
from runtime.train.callback import Callback


class ProfilerError(RuntimeError):
    """The Profiler cannot do what was asked (output path in use, another Profiler active, bad options)."""


# -- schedule (torch.profiler semantics) ------------------------------------------------------------------
class ProfilerAction(enum.Enum):
    NONE = 0
    WARMUP = 1
    RECORD = 2
    RECORD_AND_SAVE = 3


class Schedule:
    """``schedule(wait, warmup, active, repeat=0, skip_first=0)``, as ``torch.profiler.schedule``: after
    ``skip_first`` steps, cycles of ``wait`` idle steps, ``warmup`` traced-but-discarded steps and
    ``active`` recorded steps, ``repeat`` times (0: until the profiler stops). Steps are counted from the
    runtime's step-end events since the profiler started, from 0."""

    def __init__(self, wait: int, warmup: int, active: int, repeat: int = 0, skip_first: int = 0):
        for name, v, lo in (("wait", wait, 0), ("warmup", warmup, 0), ("active", active, 1), ("repeat", repeat, 0),
                            ("skip_first", skip_first, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ProfilerError(f"schedule: {name} must be an integer >= {lo}, got {v!r}")
        self.wait, self.warmup, self.active, self.repeat, self.skip_first = wait, warmup, active, repeat, skip_first

    def __call__(self, step: int) -> ProfilerAction:
        if step < self.skip_first:
            return ProfilerAction.NONE
        step -= self.skip_first
        cycle = self.wait + self.warmup + self.active
        if self.repeat > 0 and step // cycle >= self.repeat:
            return ProfilerAction.NONE
        k = step % cycle
        if k < self.wait:
            return ProfilerAction.NONE
        if k < self.wait + self.warmup:
            return ProfilerAction.WARMUP
        return ProfilerAction.RECORD if k < cycle - 1 else ProfilerAction.RECORD_AND_SAVE

    def finished(self, step: int) -> bool:
        """True when no step from ``step`` on will ever be recorded."""
        return self.repeat > 0 and step >= self.skip_first + self.repeat * (self.wait + self.warmup + self.active)

    def as_dict(self) -> dict:
        return {"wait": self.wait, "warmup": self.warmup, "active": self.active, "repeat": self.repeat,
                "skip_first": self.skip_first}

    def __repr__(self):
        return "schedule(" + ", ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ")"


def schedule(wait: int, warmup: int, active: int, repeat: int = 0, skip_first: int = 0) -> Schedule:
    return Schedule(wait, warmup, active, repeat, skip_first)


_RECORDING = (ProfilerAction.RECORD, ProfilerAction.RECORD_AND_SAVE)

# -- the one active profiler of the process ---------------------------------------------------------------
_active_lock = threading.Lock()
_active: "Profiler | None" = None


def _stop_active_at_exit():
    p = _active
    if p is not None:
        try:
            p.stop()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


atexit.register(_stop_active_at_exit)


def _runtime_info() -> dict:
    try:
        from importlib.metadata import version
        v = version("insight-profiler")
    except Exception:  # noqa: BLE001
        v = "unknown"
    return {"version": v, "python": platform.python_version()}


# -- multi-process runs (mpirun): one rank_<r>/ per process in the same run directory -------------------------
def _rank_info() -> tuple[int, int]:
    """(rank, group size) of this process: from runtime.communication once init() ran, else (0, 1)."""
    if not communication.is_initialized():
        n = os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE") or "1"
        if n.isdigit() and int(n) > 1:
            raise ProfilerError(f"Profiler: this process is one of {n} started by mpirun, but runtime.communication."
                                f"init() has not been called: call it before creating the Profiler so every rank "
                                f"records its own rank_<r>/ of the run")
        return 0, 1
    return communication.rank_and_size()


def merge_rank_manifests(run_dir: Path) -> dict:
    """Rewrite ``run_dir/manifest.json`` as the merge of every ``rank_<r>/manifest.json`` fragment, under an
    exclusive lock on ``run_dir/.manifest.lock``: every rank calls this after writing its fragment, so the last
    merge -- whichever rank finishes last, or when several finish at once -- sees every rank's final state.
    ``ranks`` lists the ranks that wrote, ``group_size`` how many there were meant to be, ``rank_status`` each
    rank's status / step count / clock zero; ``status`` is failed if any rank failed, running while any runs."""
    with open(run_dir / ".manifest.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        frags = {}
        for f in run_dir.glob("rank_*/" + MANIFEST):
            try:
                m = json.loads(f.read_text())
                frags[int(m["ranks"][0])] = m
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                continue  # unreadable fragments are reported by the readers as missing ranks
        if not frags:
            return {}
        ranks = sorted(frags)
        merged = dict(frags[ranks[0]])
        statuses = [frags[r].get("status") for r in ranks]
        merged["status"] = "failed" if "failed" in statuses else "running" if "running" in statuses else "complete"
        errors = [f"rank {r}: {frags[r]['error']}" for r in ranks if frags[r].get("error")]
        if errors:
            merged["error"] = "; ".join(errors)
        merged["ranks"] = ranks
        merged["group_size"] = max([len(ranks)] + [int(frags[r].get("group_size") or 1) for r in ranks])
        merged["step_count"] = max(int(frags[r].get("step_count") or 0) for r in ranks)
        streams = {s["stream_id"]: s for r in ranks for s in frags[r].get("streams", [])}
        merged["streams"] = [streams[k] for k in sorted(streams)]
        merged["rank_status"] = {str(r): {k: frags[r].get(k) for k in ("status", "step_count", "start_perf_ns",
                                                                     "created")} for r in ranks}
        write_json_atomic(run_dir / MANIFEST, merged)
        return merged


class RankWriter(RunWriter):
    """The writer of one rank of a multi-process run: its manifest is the fragment ``rank_<r>/manifest.json``;
    after each write the run's ``manifest.json`` is re-merged from all fragments (``merge_rank_manifests``)."""

    def _as_fragment(self, write):
        run_dir, self.run_dir = self.run_dir, self.rank_dir  # the base class writes <run_dir>/manifest.json
        try:
            return write()
        finally:
            self.run_dir = run_dir
            merge_rank_manifests(run_dir)

    def write_manifest(self, status: str | None = None) -> None:
        self._as_fragment(lambda: super(RankWriter, self).write_manifest(status))

    def fail(self, error: BaseException) -> bool:
        try:
            return self._as_fragment(lambda: super(RankWriter, self).fail(error))
        except Exception:  # noqa: BLE001 - fail() never raises (the merge itself may not fit on a full disk)
            return False


class Profiler:
    def __init__(self, output_path, start_profile: bool = True, profile_memory: bool = True,
                 data_process: bool = True, schedule: Schedule | None = None, flush_interval: float = 1.0,
                 overwrite: bool = False):
        if output_path is None or str(output_path) == "":
            raise ProfilerError("Profiler: output_path (the run directory) is required")
        if schedule is not None and not isinstance(schedule, Schedule):
            raise ProfilerError(f"Profiler: schedule must come from insight.schedule(...), got {schedule!r}")
        try:
            flush_interval = float(flush_interval)
        except (TypeError, ValueError):
            flush_interval = -1.0
        if not flush_interval > 0:
            raise ProfilerError(f"Profiler: flush_interval must be a positive number of seconds, got {flush_interval!r}")
        self.path = Path(output_path)
        self.profile_memory = bool(profile_memory)
        self.data_process = bool(data_process)
        self.schedule = schedule
        self.flush_interval = flush_interval
        self.overwrite = bool(overwrite)
        self.start_profile = bool(start_profile)
        self._state = "new"  # new -> running -> stopped
        self._step_range: tuple[int, int] | None = None
        self._writer: RunWriter | None = None
        self._listener = None
        self._recording = False
        self._closed = True
        self._k = 0  # step-end events seen since start (the schedule's step counter)
        self.last_step: int | None = None  # the global step of the last step-end event seen
        self._rank, self._group = _rank_info()  # an mpirun job: each rank records rank_<r>/ of the same run
        if self._rank == 0:  # (rank 0 checks the run directory for every rank)
            self._check_output_path()
        if start_profile:
            self.start()

    # -- the run directory --------------------------------------------------------------------------------
    def _check_output_path(self) -> None:
        p = self.path
        if p.exists() and not p.is_dir():
            raise ProfilerError(f"Profiler: output_path {str(p)!r} exists and is not a directory")
        # the nearest existing ancestor must be a directory this process can create entries in
        anc = p
        while not os.path.lexists(anc) and anc.parent != anc:
            anc = anc.parent
        if anc != p and not anc.is_dir():
            raise ProfilerError(f"Profiler: cannot create output_path {str(p)!r}: {str(anc)!r} is not a directory")
        if not os.access(anc, os.W_OK | os.X_OK):
            raise ProfilerError(f"Profiler: cannot write output_path {str(p)!r}: permission denied on {str(anc)!r}")
        if self.overwrite:
            return
        if (p / MANIFEST).exists():
            raise ProfilerError(f"Profiler: {str(p)!r} already holds a profiled run (manifest.json); choose a new "
                                f"output_path or pass overwrite=True to replace it")
        if p.is_dir() and any(p.glob("rank_*")):
            raise ProfilerError(f"Profiler: {str(p)!r} already holds rank_* trace data; choose a new output_path "
                                f"or pass overwrite=True to replace it")

    def _clear_output_path(self) -> None:
        """overwrite=True: remove the previous run's files (only those: the manifest and rank_* directories)."""
        p = self.path
        for f in (p / MANIFEST, p / f".{MANIFEST}.tmp"):
            if f.exists():
                f.unlink()
        for d in p.glob("rank_*"):
            shutil.rmtree(d) if d.is_dir() else d.unlink()

    # -- lifecycle ----------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._state == "running"

    def start(self) -> None:
        global _active
        with _active_lock:
            if self._state == "running":
                raise ProfilerError(f"Profiler: already recording to {str(self.path)!r}")
            if self._state == "stopped":
                raise ProfilerError(f"Profiler: the run {str(self.path)!r} is finished; a Profiler records one run "
                                    f"-- create a new Profiler with a new output_path")
            if _active is not None:
                raise ProfilerError(f"Profiler: another Profiler is already recording to {str(_active.path)!r}; only "
                                    f"one Profiler can be active per process -- stop it first")
            _active = self
        try:
            self._start()
        except BaseException:
            with _active_lock:
                _active = None
            raise
        self._state = "running"

    def _prepare_dir(self) -> dict:
        """Check and create the run directory. In a multi-process run rank 0 does it and every rank gets the
        outcome and the run's identity in one MPI broadcast, which also starts the ranks' clocks together."""
        ident, err = {"run_id": uuid.uuid4().hex, "created": datetime.now(timezone.utc).isoformat()}, None
        if self._rank == 0:
            try:
                self._check_output_path()
                self.path.mkdir(parents=True, exist_ok=True)
                if self.overwrite:
                    self._clear_output_path()
            except ProfilerError as e:
                err = e
            except OSError as e:
                err = self._path_error(e)
        if self._group > 1:
            err, ident = communication.broadcast_object((err, ident))
        if err is not None:
            raise err
        return ident

    def _start(self) -> None:
        ident = self._prepare_dir()
        registry = GraphRegistry()
        self._graphs = GraphsCollector(registry)
        self._steps = StepsCollector()
        store = StepStore(registry)  # the step_tasks arrays, shared by the timeline and memory collectors
        self._tasks = TasksCollector(store)
        collectors = [self._graphs, self._steps, self._tasks]
        tables = ["tasks", "steps", "graphs"]
        if self.profile_memory:
            collectors.append(MemoryCollector(store))
            tables.append("memory")
        if self.data_process:
            collectors.append(MindDataCollector())
            tables += ["dataset_pipeline", "dataset_ops", "dataset_queues", "device_queue"]
        collectors.append(HostOpsCollector())
        tables.append("host_ops")
        self._collectors = collectors

        from runtime import context
        from runtime.device.memory import get_device
        t0 = time.perf_counter_ns()
        manifest = {
            "schema_version": SCHEMA_VERSION, "run_id": ident["run_id"], "name": self.path.resolve().name,
            "created": ident["created"], "start_perf_ns": t0, "status": "running",
            "device": {"target": context.get_context("device_target"),
                       "capacity_bytes": int(get_device().pool.capacity)},
            "streams": [], "ranks": [self._rank], "step_count": 0, "tables": {}, "options": self._options(),
            "runtime": _runtime_info(),
        }
        if self._group > 1:
            manifest["group_size"] = self._group
        try:
            self._writer = (RunWriter if self._group == 1 else RankWriter)(
                self.path, manifest, collectors, t0, tables, rank=self._rank, on_flush=self._update_manifest)
            self._writer.write_manifest("running")
        except OSError as e:
            self._writer = None
            raise self._path_error(e) from None

        self._k = 0
        self._recording = self._decide(0, None)
        self._closed = False
        self._listener = self._make_listener()
        hooks.subscribe(self._listener)
        self._writer.start_thread(self.flush_interval)

    def _path_error(self, e: OSError) -> ProfilerError:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(self.path) else ""
        return ProfilerError(f"Profiler: cannot write the run to output_path {str(self.path)!r}{where}: "
                             f"{e.strerror or type(e).__name__}")

    def _options(self) -> dict:
        return {"start_profile": self.start_profile, "profile_memory": self.profile_memory,
                "data_process": self.data_process, "schedule": self.schedule.as_dict() if self.schedule else None,
                "step_range": list(self._step_range) if self._step_range else None,
                "flush_interval": self.flush_interval, "pid": os.getpid(), "argv": list(sys.argv[:8])}

    def _update_manifest(self, m: dict) -> None:
        m["streams"] = [{"stream_id": k, "name": v} for k, v in sorted(self._tasks.streams.items())]
        if self._graphs.capacity:
            m["device"]["capacity_bytes"] = int(self._graphs.capacity)

    def stop(self) -> None:
        """Stop recording, write what is left (the last flush: nothing written before is rewritten), mark the
        run complete. Does nothing if the profiler is not running."""
        global _active
        with _active_lock:
            if self._state != "running":
                return
            self._state = "stopping"
        w = self._writer
        try:
            self._detach()
            w.stop_thread()
            w.flush(final=True)
            w.finish("complete")
        except Exception as e:
            # e.g. the disk is full: the run must not stay "running" (or look complete) -- mark it failed
            recorded = w.fail(e)
            raise ProfilerError(f"Profiler: could not finish the run {str(self.path)!r}: {type(e).__name__}: {e}"
                                + ("; the run is marked failed" if recorded else "")) from e
        finally:
            self._state = "stopped"
            with _active_lock:
                if _active is self:
                    _active = None

    def _detach(self) -> None:
        self._closed = True
        self._recording = False
        if self._listener is not None:
            hooks.unsubscribe(self._listener)

    def analyse(self) -> Path:
        """Stop if running; returns the run directory (open it with ``insight.trace.open_run``)."""
        self.stop()
        if self._writer is None:
            raise ProfilerError(f"Profiler: nothing was recorded to {str(self.path)!r} (the profiler never started)")
        return self.path

    def __enter__(self) -> "Profiler":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- events -------------------------------------------------------------------------------------------
    def _make_listener(self):
        gated: dict = {}
        static: dict = {}
        for c in self._collectors:
            for table, hs in ((gated, c.handlers()), (static, c.static_handlers())):
                for kind, fn in hs.items():
                    table.setdefault(kind, []).append(fn)
        gated = {k: _combine(v) for k, v in gated.items()}
        static = {k: _combine(v) for k, v in static.items()}
        on_step = self._on_step

        def listener(kind: str, ev: dict) -> None:
            if self._closed:
                return
            if kind == "step":
                on_step(ev)
                return
            h = static.get(kind)
            if h is not None:
                h(ev)
            elif self._recording:
                h = gated.get(kind)
                if h is not None:
                    h(ev)
        return listener

    def _decide(self, k: int, step) -> bool:
        """Is the step with schedule index ``k`` and global step number ``step`` (None: unknown) recorded?"""
        if self._step_range is not None:
            lo, hi = self._step_range
            if step is None or not lo <= step <= hi:
                return False
        if self.schedule is not None:
            return self.schedule(k) in _RECORDING
        return True

    def _on_step(self, ev: dict) -> None:
        phase = ev.get("phase")
        step = ev.get("step")
        if phase == "begin":
            self._recording = self._decide(self._k, step)
            if self._recording:
                self._steps.on_begin(ev)
        elif phase == "end":
            if self._recording:
                self._steps.on_end(ev)
            self.last_step = step
            self._k += 1
            self._recording = self._decide(self._k, step + 1 if isinstance(step, int) else None)
            schedule_done = self.schedule is not None and self.schedule.finished(self._k)
            range_done = self._step_range is not None and isinstance(step, int) and step >= self._step_range[1]
            if schedule_done or range_done:
                self._detach_listener_only()

    def _detach_listener_only(self) -> None:
        """Nothing more will be recorded: stop listening (so the runtime stops tracing), keep the run open."""
        self._recording = False
        if self._listener is not None:
            hooks.unsubscribe(self._listener)

    # -- callback -------------------------------------------------------------------------------------------
    def callback(self, start_step: int, stop_step: int) -> Callback:
        """A training callback that starts this profiler at global step ``start_step`` and stops it after
        ``stop_step`` (the Model's global step numbers, as in the ``step`` column). Needs
        ``start_profile=False``."""
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start_step, stop_step)):
            raise ProfilerError(f"Profiler.callback: steps must be integers, got {start_step!r}, {stop_step!r}")
        if start_step < 0 or stop_step < start_step:
            raise ProfilerError(f"Profiler.callback: need 0 <= start_step <= stop_step, got {start_step}, {stop_step}")
        if self._state != "new":
            raise ProfilerError("Profiler.callback: the profiler already started; create it with "
                                "start_profile=False and let the callback start it")
        self._step_range = (start_step, stop_step)
        return _StepRangeCallback(self, start_step, stop_step)


def _combine(fns):
    if len(fns) == 1:
        return fns[0]

    def both(ev, _fns=tuple(fns)):
        for f in _fns:
            f(ev)
    return both


class _StepRangeCallback(Callback):
    """Starts the profiler just before global step ``start`` and stops it after step ``stop``.

    The callback only estimates the coming global step (from the optimizer's step counter); the profiler
    itself records exactly the steps in [start, stop] from the step numbers of the runtime's events, so
    starting one step early only costs one traced-but-dropped step."""

    def __init__(self, profiler: Profiler, start: int, stop: int):
        self.profiler, self.start, self.stop = profiler, start, stop

    @staticmethod
    def _next_step(ctx) -> int:
        p = ctx.original_args()
        g = getattr(p.get("optimizer"), "global_step", None)
        if not isinstance(g, int):
            return max(0, p.get("cur_step_num", 1) - 1)
        # the optimizer holds the number of the last step run (0 before any)
        return 0 if (g == 0 and p.get("cur_step_num", 1) == 1) else g + 1

    def step_begin(self, run_context):
        prof = self.profiler
        if prof._state == "new" and self.start - 1 <= self._next_step(run_context) <= self.stop:
            prof.start()

    def step_end(self, run_context):
        prof = self.profiler
        if prof.running and prof.last_step is not None and prof.last_step >= self.stop:
            prof.stop()

    def end(self, run_context):
        self.profiler.stop()
