"""The threaded execution engine behind ``runtime.dataset`` (MindData-style).

A dataset chain (``source -> shuffle -> map -> batch -> ...``) is turned, per iterator, into a
``_Pipeline`` of ``_Stage`` objects, one per op. Every stage runs in its own worker thread(s) and
writes into its own bounded output ``Connector`` (capacity = ``config.get_prefetch_size()``); its
parent reads from it. The root stage's connector is read by the consumer (the iterator).

Stage protocol (implemented by the op classes in ``ops.py``, wired up in ``op._setup(stage)``):

* ``stage.fetch(ws) -> (payload, info, is_data)`` runs under the stage's input lock, so it is
  sequential even with several workers: it pulls from the child's connector, keeps the op's
  sequential state (shuffle buffer, batch grouping, pass counters) and returns either a unit of
  work (``is_data``) or a control marker (``EOE`` end of a pass, ``EOF`` end of the stream, or a
  ``_Failure`` travelling up from a child).
* ``stage.process(payload, info) -> row`` (optional) is the parallel part (map functions,
  ``np.stack``, source slicing); it runs outside the lock.
* A worker takes a sequence number together with its payload and hands its result to the output
  connector only when it is its turn, so the output order is the fetch order for any number of
  workers.

Errors: a user exception (in a map function, a generator, stacking a batch) becomes a ``_Failure``
marker that is sent downstream *in order* (the consumer first receives every row before the
failing one) while everything upstream of the failing op is aborted. The consumer turns it into
one ``DatasetError`` naming the op and the row, after all threads have been joined.
"""
from __future__ import annotations

import itertools
import threading
import time
import weakref
import zlib
from collections import deque

import numpy as np

from runtime import hooks
from runtime.dataset.config import config

_now = time.perf_counter_ns

_IN, _OUT, _ORDER = 0, 1, 2


class DatasetError(RuntimeError):
    """An op of a dataset pipeline failed. ``op_id``/``op_type`` name the op, ``where`` the row or
    batch; the original exception is the ``__cause__``."""

    def __init__(self, message: str, op_id: int | None = None, op_type: str | None = None,
                 where: str | None = None):
        super().__init__(message)
        self.op_id, self.op_type, self.where = op_id, op_type, where


class _Aborted(Exception):
    """Raised inside the engine when a connector / stage was aborted (close or upstream abort)."""


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return self.name


EOE = _Marker("EOE")  # end of one pass over the data (an epoch, at the root)
EOF = _Marker("EOF")  # end of the stream: the stage is done


class _Failure:
    """A failure travelling downstream in order."""
    __slots__ = ("message", "exc", "op_id", "op_type", "where")

    def __init__(self, message, exc, op_id, op_type, where):
        self.message, self.exc, self.op_id, self.op_type, self.where = message, exc, op_id, op_type, where

    def to_error(self) -> DatasetError:
        return DatasetError(self.message, self.op_id, self.op_type, self.where)


class _WorkerStats:
    """Counters of one thread; only that thread writes them (no locking needed)."""
    __slots__ = ("t_start", "t_end", "wait_in", "wait_out", "wait_order", "wait_since", "wait_kind",
                 "items", "rows", "cpu_end", "ident", "lock")

    def __init__(self):
        self.t_start = self.t_end = 0
        self.wait_in = self.wait_out = self.wait_order = 0
        self.wait_since = 0  # start of the wait in progress (0: not waiting)
        self.wait_kind = _IN
        self.items = self.rows = 0
        self.cpu_end = None  # the thread's CPU time when it ended
        self.ident = None
        self.lock = threading.Lock()  # held while reading a live thread's CPU clock: it cannot exit meanwhile

    def cpu_ns(self) -> int:
        """CPU time of the thread (excludes sleeping, blocking and waiting for the GIL)."""
        with self.lock:
            if self.cpu_end is not None:
                return self.cpu_end
            if self.ident is None:
                return 0
            try:
                return time.clock_gettime_ns(time.pthread_getcpuclockid(self.ident))
            except (AttributeError, OSError, ValueError):  # not available on this platform
                return 0

    def snapshot(self, now):
        """(busy, wait_in, wait_out, wait_order) in ns, counting a wait in progress."""
        if not self.t_start:
            return 0, 0, 0, 0
        w = [self.wait_in, self.wait_out, self.wait_order]
        since = self.wait_since
        end = self.t_end or now
        if since and not self.t_end:
            w[self.wait_kind] += max(0, now - since)
        busy = max(0, end - self.t_start - w[0] - w[1] - w[2])
        return busy, w[0], w[1], w[2]


class Connector:
    """A bounded FIFO between two stages that accounts blocked time to the caller's stats.

    Waiters are counted so the common, uncontended put/get skips ``Condition.notify``. A producer
    blocked on a full queue is woken once a quarter of the queue is free (not at every slot), so it
    refills in bursts instead of paying a thread switch per item."""

    def __init__(self, capacity: int):
        self.capacity = int(capacity)
        self._low = self.capacity - max(1, self.capacity // 4)
        self._q = deque()
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._getters = 0
        self._putters = 0
        self._aborted = False

    def __len__(self):
        return len(self._q)

    def put(self, item, ws: _WorkerStats) -> None:
        q = self._q
        with self._lock:
            if self._aborted:
                raise _Aborted
            if len(q) >= self.capacity:
                t0 = _now()
                ws.wait_kind, ws.wait_since = _OUT, t0
                self._putters += 1
                try:
                    while len(q) >= self.capacity and not self._aborted:
                        self._not_full.wait()
                finally:
                    self._putters -= 1
                    ws.wait_out += _now() - t0
                    ws.wait_since = 0
                if self._aborted:
                    raise _Aborted
            q.append(item)
            if self._getters:
                self._not_empty.notify()

    def get(self, ws: _WorkerStats):
        q = self._q
        with self._lock:
            if not q and not self._aborted:
                t0 = _now()
                ws.wait_kind, ws.wait_since = _IN, t0
                self._getters += 1
                try:
                    while not q and not self._aborted:
                        self._not_empty.wait()
                finally:
                    self._getters -= 1
                    ws.wait_in += _now() - t0
                    ws.wait_since = 0
            if self._aborted:
                raise _Aborted
            item = q.popleft()
            if self._putters and len(q) <= self._low:
                self._not_full.notify()
            return item

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            self._q.clear()
            self._not_empty.notify_all()
            self._not_full.notify_all()


def _nrows(item) -> int:
    first = item[0] if item else None
    shape = getattr(first, "shape", ())
    return int(shape[0]) if shape else 1


class _Stage:
    """One op of one pipeline: its worker threads, output connector, state and statistics."""

    def __init__(self, pipe: "_Pipeline", op, op_id: int, parent_id: int, capacity: int, passes):
        self.pipe, self.op, self.op_id, self.parent_id = pipe, op, op_id, parent_id
        self.passes = passes  # how many EOE this stage emits before EOF (None: unbounded)
        self.op_type = op._op_type
        self.out = Connector(capacity)
        self.child: _Stage | None = None
        self.depth = 0  # distance from the source (used to derive seeds)
        self.num_workers = max(1, int(op._effective_workers()))
        self.batched = op._output_batched()
        self.ws = [_WorkerStats() for _ in range(self.num_workers)]
        self.in_lock = threading.Lock()
        self.turn = threading.Condition()
        self.seq = 0
        self.next_out = 0
        self.done = False        # no more fetching (EOF or failure seen)
        self.terminated = False  # a terminal item (EOF / failure) has been sent
        self.aborted = False
        self.cur_info = None     # what fetch is working on, for error messages
        self.seed_base = 0
        self.samples = 0
        self.depth_sum = 0
        self.depth_samples = deque(maxlen=1024)  # recent (t_ns, depth), only while a listener is subscribed
        self.fetch = None
        self.process = None
        self.threads: list[threading.Thread] = []

    # -- seeds ------------------------------------------------------------------------------------
    def pass_rng(self, pass_idx: int) -> np.random.Generator:
        """The generator of one pass: seeded by (op seed or derived seed, iterator index, pass)."""
        return np.random.default_rng([self.seed_base & 0xFFFFFFFF, self.pipe.iter_index, pass_idx])

    # -- failures ---------------------------------------------------------------------------------
    def fail(self, exc: BaseException, info) -> _Failure:
        where = self.op._where(info)
        msg = f"{self.op._label(self.op_id)} failed on {where}: {type(exc).__name__}: {exc}"
        self.done = True
        self.pipe.abort_below(self)
        return _Failure(msg, exc, self.op_id, self.op_type, where)

    def abort(self) -> None:
        self.aborted = True
        self.out.abort()
        with self.turn:
            self.turn.notify_all()

    # -- the worker loop --------------------------------------------------------------------------
    def start(self) -> None:
        for k, ws in enumerate(self.ws):
            t = threading.Thread(target=self._work, args=(ws,), daemon=True,
                                 name=f"dataset-{self.pipe.id}-{self.op_type}#{self.op_id}-w{k}")
            self.threads.append(t)
        for t in self.threads:
            t.start()

    def _work(self, ws: _WorkerStats) -> None:
        ws.t_start = _now()
        ws.ident = threading.get_ident()
        try:
            self._loop(ws)
        except _Aborted:
            pass
        except BaseException as e:  # an engine bug: still surface it in the consumer, never hang
            self.pipe.internal_error(self, e)
        finally:
            with ws.lock:
                ws.cpu_end = time.thread_time_ns()
            ws.t_end = _now()

    def _loop(self, ws: _WorkerStats) -> None:
        in_lock, turn, out = self.in_lock, self.turn, self.out
        fetch, process = self.fetch, self.process
        parallel = self.num_workers > 1
        batched = self.batched
        while True:
            if not in_lock.acquire(False):
                t0 = _now()
                ws.wait_kind, ws.wait_since = _IN, t0
                in_lock.acquire()
                ws.wait_in += _now() - t0
                ws.wait_since = 0
            try:
                if self.done or self.aborted:
                    return
                try:
                    payload, info, is_data = fetch(ws)
                except _Aborted:
                    raise
                except BaseException as e:
                    payload, info, is_data = self.fail(e, self.cur_info), None, False
                seq = self.seq
                self.seq = seq + 1
                if not is_data and payload is not EOE:
                    self.done = True
            finally:
                in_lock.release()
            if is_data and process is not None:
                try:
                    payload = process(payload, info)
                except BaseException as e:
                    payload, is_data = self.fail(e, info), False
            if parallel:
                with turn:
                    if self.next_out != seq:
                        t0 = _now()
                        ws.wait_kind, ws.wait_since = _ORDER, t0
                        while self.next_out != seq and not self.terminated and not self.aborted:
                            turn.wait()
                        ws.wait_order += _now() - t0
                        ws.wait_since = 0
                    if self.terminated or self.aborted:
                        return
            out.put(payload, ws)
            if is_data:
                ws.items += 1
                ws.rows += _nrows(payload) if batched else 1
                terminal = False
            else:
                terminal = payload is not EOE
            if parallel:
                with turn:
                    self.next_out = seq + 1
                    if terminal:
                        self.terminated = True
                    turn.notify_all()
            if terminal:
                return

    # -- statistics -------------------------------------------------------------------------------
    def stats(self, now=None) -> dict:
        now = now or _now()
        busy = wi = wo = wr = items = rows = cpu = 0
        for ws in self.ws:
            b, i, o, r = ws.snapshot(now)
            busy, wi, wo, wr = busy + b, wi + i, wo + o, wr + r
            items += ws.items
            rows += ws.rows
            cpu += ws.cpu_ns()
        return {"op_id": self.op_id, "op_type": self.op_type, "parent_id": self.parent_id,
                "desc": self.op._desc(), "num_workers": self.num_workers, "rows": rows,
                "batches": items if self.batched else 0, "items": items, "busy_ns": busy,
                "wait_in_ns": wi, "wait_out_ns": wo, "wait_order_ns": wr, "cpu_ns": cpu,
                "queue_capacity": self.out.capacity, "queue_depth": len(self.out),
                "samples": self.samples,
                "avg_queue_depth": (self.depth_sum / self.samples) if self.samples else None,
                "depth_samples": list(self.depth_samples)}


class _Pipeline:
    _ids = itertools.count()

    def __init__(self, root_op, num_epochs: int, iter_index: int, capacity: int, seed: int):
        self.id = next(_Pipeline._ids)
        self.iter_index = iter_index
        self.num_epochs = num_epochs
        self.capacity = capacity
        self.global_seed = int(seed)
        self.stages: list[_Stage] = []
        self.epochs_done = 0
        self.closed = False
        self._lock = threading.Lock()
        self.sampler: threading.Thread | None = None  # the sampler thread while it samples this pipeline
        self._sample_lock = threading.RLock()  # held while sampling; close() waits for it
        self.consumer = _WorkerStats()
        self.consumer.t_start = _now()
        self.root = self._build(root_op, -1, None if num_epochs < 0 else num_epochs)
        self._started = False
        self._announced = -1  # the hooks.generation last announced to

    def _build(self, op, parent_id, passes) -> _Stage:
        st = _Stage(self, op, len(self.stages), parent_id, self.capacity, passes)
        self.stages.append(st)
        kids = op._children()
        if kids:
            st.child = self._build(kids[0], st.op_id, op._child_passes(passes))
            st.depth = st.child.depth + 1
        explicit = op._explicit_seed()
        st.seed_base = (int(explicit) if explicit is not None else
                        zlib.crc32(f"{self.global_seed}:{st.op_type}:{st.depth}".encode()))
        op._setup(st)
        return st

    def subtree(self, st: _Stage):
        s = st.child
        while s is not None:
            yield s
            s = s.child

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._started = True
        listening = hooks.listening
        if listening:
            self.announce()
        for st in reversed(self.stages):
            st.start()
        if listening:
            self.start_sampler()

    def announce(self) -> None:
        """Emit ``dataset_pipeline`` once per set of listeners (again, late, when a new listener subscribes
        mid-iteration, e.g. a profiler started mid-training)."""
        with self._lock:
            if self._announced == hooks.generation:
                return
            self._announced = hooks.generation
        hooks.emit("dataset_pipeline", {
            "pipeline_id": self.id, "t_ns": _now(), "num_epochs": self.num_epochs,
            "ops": [{"op_id": s.op_id, "op_type": s.op_type, "parent_id": s.parent_id,
                     "num_workers": s.num_workers, "queue_capacity": s.out.capacity,
                     "desc": s.op._desc()} for s in self.stages]})

    def threads(self):
        return [t for st in self.stages for t in st.threads]

    def abort_below(self, st: _Stage) -> None:
        for s in self.subtree(st):
            s.abort()

    def internal_error(self, st: _Stage, exc: BaseException) -> None:
        """An unexpected engine exception: deliver it to the consumer and stop everything else."""
        msg = f"{st.op._label(st.op_id)} crashed: {type(exc).__name__}: {exc}"
        fail = _Failure(msg, exc, st.op_id, st.op_type, "internal")
        for s in self.stages:
            if s is not self.root:
                s.abort()
            s.done = True
        root = self.root.out
        with root._lock:  # make sure the consumer sees it, even past a full queue
            if not root._aborted:
                root._q.append(fail)
                root._not_empty.notify_all()

    def epoch_end(self) -> None:
        self.epochs_done += 1
        if 0 <= self.num_epochs <= self.epochs_done:
            self.close()  # joins the threads (no more samples), then emits the final dataset_op events
        elif hooks.listening:
            self.emit_ops(final=False)

    def close(self, emit: bool = True) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        _SAMPLER.unregister(self)  # (waits for a sample of this pipeline in progress: none comes after)
        for st in self.stages:
            st.abort()
        cur = threading.current_thread()
        deadline = time.monotonic() + 10.0
        for t in self.threads():
            if t is not cur and t.ident is not None:
                t.join(max(0.0, deadline - time.monotonic()))
        self.consumer.t_end = _now()
        if emit and self._started and hooks.listening:
            self.emit_ops(final=True)

    # -- statistics and events --------------------------------------------------------------------
    def stats(self) -> list[dict]:
        now = _now()
        return [st.stats(now) for st in self.stages]

    def emit_ops(self, final: bool) -> None:
        self.announce()
        t = _now()
        for s in self.stats():
            hooks.emit("dataset_op", {
                "pipeline_id": self.id, "op_id": s["op_id"], "op_type": s["op_type"], "rows": s["rows"],
                "batches": s["batches"], "busy_ns": s["busy_ns"], "wait_in_ns": s["wait_in_ns"],
                "wait_out_ns": s["wait_out_ns"], "num_workers": s["num_workers"],
                "wait_order_ns": s["wait_order_ns"], "cpu_ns": s["cpu_ns"], "epoch": self.epochs_done, "final": final,
                "cumulative": True, "t_ns": t})

    def start_sampler(self) -> None:
        self.announce()
        if not self.closed:
            _SAMPLER.register(self)

    def sample(self, t: int) -> None:
        """One ``queue_sample`` per stage (called by the sampler thread)."""
        with self._sample_lock:
            if self.closed:
                return
            for st in self.stages:
                d = len(st.out)
                st.samples += 1
                st.depth_sum += d
                st.depth_samples.append((t, d))
                hooks.emit("queue_sample", {"pipeline_id": self.id, "op_id": st.op_id, "t_ns": t,
                                            "depth": d, "capacity": st.out.capacity})


class _Sampler:
    """The one thread sampling the output-queue depth of every pipeline iterated while a listener is
    subscribed, every ``config.get_monitor_sampling_interval()`` ms (``queue_sample`` events).

    It starts when a listener subscribes (``hooks.on_subscribe``: in the profiler's start, not in the first
    traced step), or else with the first such pipeline, and is shared by all of them: ``Model.train``
    iterates a new pipeline per epoch, which joins the running sampler instead of starting (and later
    joining) a thread of its own. It ends when nobody listens any more, or when no pipeline has been
    registered for ``IDLE_S`` seconds. It holds the pipelines by weak reference, and none while it sleeps,
    so it never keeps a pipeline (or what it references) alive."""

    IDLE_S = 0.5

    def __init__(self):
        self._lock = threading.Lock()
        self._pipes: list[weakref.ref] = []
        self.thread: threading.Thread | None = None

    def _live(self) -> list[_Pipeline]:
        """Under the lock: the registered pipelines still alive (dead references dropped)."""
        pipes = [r() for r in self._pipes]
        self._pipes = [r for r, p in zip(self._pipes, pipes) if p is not None]
        return [p for p in pipes if p is not None]

    def register(self, pipe: _Pipeline | None) -> None:
        """Sample ``pipe`` from now on (None: only start the thread, ahead of the first pipeline)."""
        with self._lock:
            if pipe is not None and not any(p is pipe for p in self._live()):
                self._pipes.append(weakref.ref(pipe))
            t = self.thread
            start = t is None
            if start:
                t = self.thread = threading.Thread(target=self._loop, daemon=True, name="dataset-sampler")
            if pipe is not None:
                pipe.sampler = t
        if start:
            t.start()

    def prestart(self) -> None:
        """On a new subscriber: start the thread now (in the profiler's start), not in the first traced step
        (Thread.start waits for the new thread to run, which on busy cores can take milliseconds)."""
        if self.thread is None:
            self.register(None)

    def unregister(self, pipe: _Pipeline) -> None:
        with pipe._sample_lock:
            with self._lock:
                self._pipes = [r for r in self._pipes if r() is not pipe and r() is not None]
                pipe.sampler = None

    def _stop_if(self, done) -> bool:
        """Under the lock: if ``done()``, forget every pipeline and end (a later register starts a new thread)."""
        with self._lock:
            if self.thread is not threading.current_thread():
                return True  # already ended
            if not done():
                return False
            for p in self._live():
                p.sampler = None
            self._pipes = []
            self.thread = None
            return True

    def _loop(self) -> None:
        idle_since = None
        try:
            while True:
                time.sleep(config.get_monitor_sampling_interval() / 1000)
                if not hooks.listening and self._stop_if(lambda: True):
                    return
                with self._lock:
                    pipes = self._live()
                if not pipes:
                    now = time.monotonic()
                    idle_since = idle_since or now
                    if now - idle_since >= self.IDLE_S and self._stop_if(lambda: not self._live()):
                        return
                    continue
                idle_since = None
                t = _now()
                for p in pipes:
                    p.sample(t)
                del pipes, p  # no strong reference while sleeping
        finally:
            self._stop_if(lambda: True)


_SAMPLER = _Sampler()
hooks.on_subscribe(_SAMPLER.prestart)


class DatasetIterator:
    """Iterates a dataset through a threaded pipeline; one pass (epoch) per ``for`` loop.

    After an epoch ends (``StopIteration``) iterating the same iterator again continues with the
    next epoch, up to ``num_epochs`` (-1: unbounded). The threads stop when the last epoch ends,
    on an error, on ``close()``, or when the iterator is garbage collected.
    """

    def __init__(self, dataset, num_epochs: int = -1, output: str = "tuple", columns=None):
        num_epochs = int(num_epochs)
        if num_epochs == 0 or num_epochs < -1:
            raise ValueError(f"create_iterator: num_epochs must be -1 or >= 1, got {num_epochs}")
        names = list(dataset.column_names)
        self._names = names
        self._select = None
        if columns is not None:
            columns = [columns] if isinstance(columns, str) else list(columns)
            missing = [c for c in columns if c not in names]
            if missing:
                raise ValueError(f"create_iterator: unknown columns {missing}; the dataset has {names}")
            self._select = [names.index(c) for c in columns]
            self._names = columns
        self._dict = output == "dict"
        iter_index = dataset._iterators_created
        dataset._iterators_created += 1
        self._pipe = _Pipeline(dataset, num_epochs, iter_index, config.get_prefetch_size(), config.get_seed())
        self._finalizer = weakref.finalize(self, self._pipe.close)
        self._pipe.start()

    @property
    def pipeline_id(self) -> int:
        return self._pipe.id

    @property
    def column_names(self) -> list[str]:
        return list(self._names)

    def __iter__(self):
        return self

    def __next__(self):
        pipe = self._pipe
        if pipe.closed:
            raise StopIteration
        if hooks.listening:
            if pipe.sampler is None:
                pipe.start_sampler()
            elif pipe._announced != hooks.generation:  # a listener that subscribed mid-iteration
                pipe.announce()
        try:
            item = pipe.root.out.get(pipe.consumer)
        except _Aborted:
            pipe.close()
            raise StopIteration from None
        if type(item) is tuple:
            if self._select is not None:
                item = tuple(item[i] for i in self._select)
            return dict(zip(self._names, item)) if self._dict else item
        if item is EOE:
            pipe.epoch_end()
            raise StopIteration
        if item is EOF:
            pipe.close()
            raise StopIteration
        pipe.close()
        raise item.to_error() from item.exc

    def stats(self) -> list[dict]:
        """Per-op statistics (cumulative since the iterator started), ordered by op_id (root first)."""
        return self._pipe.stats()

    def close(self) -> None:
        """Stop and join the pipeline's threads (idempotent)."""
        self._pipe.close()

    @property
    def closed(self) -> bool:
        return self._pipe.closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
