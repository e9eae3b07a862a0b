"""Runs a compiled training step on the simulated device.

``CompiledGraph(graph)`` compiles the (already placed and stream-assigned: see ``runtime.compiler.compile``, the one
entry point that runs the pass pipeline first) graph into a task list
(``runtime/device/tasks.py``), reserves device memory for the parameters and the step's planned
activation peak (raising ``DeviceOutOfMemoryError`` if they do not fit), and runs the tasks:

* one stream with work: every task runs in the calling thread, in order -- no synchronisation;
* several streams: the first compute stream runs in the calling thread and every other stream in
  its own worker thread, honouring event-record / event-wait tasks. Kernels release the GIL, so two
  streams really overlap on two cores.

With a hook subscriber, every task is timed and emitted (``task`` events) after the step, along with
the memory timeline of the step and the step markers (``last_markers``).
"""
from __future__ import annotations

import queue
import threading
import time
import weakref

import numpy as np

from runtime import _exec, hooks, host_memory
from runtime.device.memory import DeviceOutOfMemoryError, LiveTensor, fmt_bytes, get_device
from runtime.device.tasks import TaskList, compile_tasks
from runtime.ir.graph import Graph, Node, toposort
from runtime.ops.registry import get_primitive

clock = time.perf_counter_ns


class FeedError(ValueError):
    """A value fed to a graph input does not match what the graph was built for."""


class StepAborted(RuntimeError):
    pass


def live_nodes(graph: Graph) -> list[Node]:
    """Nodes the outputs and effects depend on, in a valid order (dead code dropped)."""
    keep = {n.id for n in toposort(graph.nodes, graph.roots())}
    return [n for n in graph.nodes if n.id in keep]


class _Worker:
    """A stream's thread: runs one job per step."""

    def __init__(self, name: str):
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=f"stream-{name}", daemon=True)
        self.thread.start()

    def _loop(self):
        host_memory.install()    # this thread only runs steps: its arrays come from the host-memory cache
        while True:
            job = self.inbox.get()
            if job is None:
                return
            job()

    def stop(self):
        self.inbox.put(None)


def _stop_workers(workers):
    for w in workers.values():
        w.stop()


class CompiledGraph:
    def __init__(self, graph: Graph, device=None):
        unassigned = [n for n in graph.nodes if n.op not in ("input", "param", "const") and "stream" not in n.ann]
        if unassigned:
            n = unassigned[0]
            raise ValueError(f"{graph.name}: %{n.id} ({n.op}) has no stream: the graph has not been through the "
                             "pass pipeline; compile it with runtime.compiler.compile(graph)")
        self.graph = graph
        self.tl: TaskList = compile_tasks(graph)
        self.nodes = self.tl.nodes
        self.device = device or get_device()
        self._reserve_memory()
        slot = self.tl.slot
        self.inputs: dict[str, Node] = {n.attrs["name"]: n for n in self.nodes if n.op == "input"}
        self.input_slots = [(slot[n.id], n) for n in self.inputs.values()]
        self.out_slots = {name: slot[n.id] for name, n in graph.outputs.items()}
        self._template: list = [None] * len(self.nodes)
        for n in self.nodes:
            if n.op == "param":
                self._template[slot[n.id]] = n.attrs["_var"].data
            elif n.op == "const":
                self._template[slot[n.id]] = n.attrs["value"]
        active = [s for s, ts in self.tl.streams.items() if ts]
        self.main_stream = next((s for s in ("aicore0", "aicore1", "aicpu", "host", "comm") if s in active),
                                None)
        self.other_streams = [s for s in active if s != self.main_stream]
        # the multi-stream path: per stream its Task objects (read at run time), their kinds and ids
        codes = {"event_wait": _exec.EVENT_WAIT, "event_record": _exec.EVENT_RECORD}
        self._stream_tasks = {s: (list(ts), np.array([codes.get(t.kind, _exec.KERNEL) for t in ts], np.int8),
                                  np.array([t.task_id for t in ts], np.int32))
                              for s, ts in self.tl.streams.items() if ts}
        self._workers: dict[str, _Worker] = {}
        # the single-stream fast path: (out, kernel, ins, attrs, frees) tuples
        self._flat = [(t.out, t.kernel, tuple(t.ins), t.attrs, tuple(t.frees)) for t in self.tl.tasks
                      if t.kind not in ("event_record", "event_wait")]
        self.steps = self._flat  # kernel launches per step (len() is the task count)
        self.last_markers: dict | None = None
        self._table_generation = -1
        kern = [t.kind in ("kernel", "memcpy_h2d", "memcpy_d2h") for t in self.tl.tasks]
        self._phase_masks = (np.array([k and t.phase == "forward" for k, t in zip(kern, self.tl.tasks)], bool),
                             np.array([k and t.phase == "backward" for k, t in zip(kern, self.tl.tasks)], bool))
        # the one-stream traced path: task ids in run order and where the markers fall, fixed at compile time
        flat_tasks = [t for t in self.tl.tasks if t.kind not in ("event_record", "event_wait")]
        self._flat_ids = np.array([t.task_id for t in flat_tasks], np.int32)
        fw = [k for k, t in enumerate(flat_tasks) if self._phase_masks[0][t.task_id]]
        bw = [k for k, t in enumerate(flat_tasks) if self._phase_masks[1][t.task_id]]
        self._flat_markers = (fw[0] if fw else -1, bw[-1] if bw else -1)
        self._flat_marker_ops = (flat_tasks[fw[0]].name if fw else "", flat_tasks[bw[-1]].name if bw else "")
        # the per-step host->device input copy, described once: each traced step's step_tasks event carries it
        # with the copy's two times (no task event of its own: one event per step less on the traced path)
        self._input_task = {"task_id": -1, "name": "feed_inputs", "op": "copy_h2d", "kind": "memcpy_h2d",
                            "stream_id": 4, "stream": "host", "scope": "", "shape": "", "dtype": "", "flops": 0,
                            "bytes": sum(n.nbytes for _, n in self.input_slots), "phase": "input"}
        self._task_table_cols: dict | None = None  # task_table(), built on first use (static per graph)

    # -- memory --------------------------------------------------------------------------------
    def _reserve_memory(self):
        dev = self.device
        plan = self.tl.plan
        what = f"while compiling {self.graph.name!r}"
        try:
            dev.make_resident(self.tl.device_params, what)
        except DeviceOutOfMemoryError as e:
            raise DeviceOutOfMemoryError(e.capacity, e.in_use, e.requested, e.largest,
                                         f"{what} (placing the parameters on the device)", e.for_tensor) from None
        if plan.peak:
            largest = [LiveTensor(b.name, b.size, b.op, b.shape, b.dtype) for b in plan.live_at_peak[:5]]
            try:
                self.workspace = dev.pool.alloc(plan.peak, LiveTensor(f"{self.graph.name}.activations", plan.peak,
                                                                      "planned peak"), "activation_reserve", what)
            except DeviceOutOfMemoryError as e:
                params = [b.tensor for b in dev.pool.live_blocks() if b.kind == "parameter"]
                params.sort(key=lambda t: -t.size)
                raise DeviceOutOfMemoryError(
                    e.capacity, e.in_use, e.requested, sorted(largest + params[:3], key=lambda t: -t.size)[:6],
                    f"{what} (the step's activations need {fmt_bytes(plan.peak)} at their peak)",
                    f"{self.graph.name}.activations") from None
            weakref.finalize(self, dev.pool.free, self.workspace)
        else:
            self.workspace = None

    def memory_summary(self) -> dict:
        return {"planned_peak": self.tl.plan.peak, "naive_total": self.tl.plan.total_naive(),
                "parameters": sum(p.data.nbytes for p in self.tl.device_params),
                "host_parameters": sum(p.data.nbytes for p in self.tl.host_params)}

    # -- running ----------------------------------------------------------------------------------
    def _bind_inputs(self, env, feeds, copy: bool):
        for k, n in self.input_slots:
            name = n.attrs["name"]
            if name not in feeds:
                raise FeedError(f"{self.graph.name}: no value fed for input {name!r}")
            v = feeds[name]
            if not isinstance(v, np.ndarray) or v.shape != n.shape or v.dtype != n.dtype:
                v = np.asarray(v)
                raise FeedError(f"{self.graph.name}: input {name!r} expects {n.shape} {n.dtype}, "
                                f"got {v.shape} {v.dtype}")
            env[k] = np.array(v, copy=True) if copy else v

    def __call__(self, feeds: dict, step: int | None = None, get_next: tuple | None = None) -> dict:
        """Run one step. ``get_next=(t0, t1)``: the inputs were dequeued from the device queue
        (data sink mode) during [t0, t1] and are already on the device; otherwise they are copied
        host->device first."""
        old_alloc = host_memory.install()    # the step's numpy arrays reuse cached memory (runtime/host_memory.py)
        try:
            return self._call(feeds, step, get_next)
        finally:
            host_memory.restore(old_alloc)

    def _call(self, feeds: dict, step: int | None, get_next: tuple | None) -> dict:
        tracing = hooks.listening
        t_begin = clock()
        env = list(self._template)
        c0 = clock() if tracing else 0
        self._bind_inputs(env, feeds, copy=get_next is None)
        c1 = clock() if tracing else 0
        if not self.other_streams:
            if tracing:  # the same compiled loop, stamping each task into preallocated arrays
                n = len(self._flat)
                records = (np.empty(n, np.int64), np.empty(n, np.int64))
                _exec.run_flat(self._flat, env, *records)
            else:
                _exec.run_flat(self._flat, env)
                records = None
        else:
            records = self._run_streams(env, tracing)
        result = {name: env[k] for name, k in self.out_slots.items()}
        if tracing:
            self.device.pool.announce()  # a listener that subscribed since: the live blocks first
            self._emit(records, step, t_begin, (c0, c1), get_next)
        return result

    def _run_stream(self, stream: str, env, events, abort, records):
        """One stream's tasks in compiled code (``_exec.run_stream``); with ``records`` (a dict) the stream's
        (task ids, starts, ends) of the tasks that ran go into ``records[stream]``."""
        tasks, codes, ids = self._stream_tasks[stream]
        if records is None:
            _exec.run_stream(tasks, codes, env, events, abort)
            return
        n = len(tasks)
        starts, ends = np.empty(n, np.int64), np.empty(n, np.int64)
        done = _exec.run_stream(tasks, codes, env, events, abort, starts, ends)
        records[stream] = (ids[:done], starts[:done], ends[:done])

    def _run_streams(self, env, tracing: bool):
        records: dict | None = {} if tracing else None
        if not self.other_streams:
            self._run_stream(self.main_stream, env, None, [], records)
            return records
        events = [threading.Event() for _ in range(self.tl.n_events)]
        abort: list = []
        errors: list = []
        done = []

        def job(stream):
            finished = threading.Event()
            done.append(finished)

            def run():
                try:
                    self._run_stream(stream, env, events, abort, records)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                    errors.append((stream, e))
                    abort.append(True)
                    for ev in events:
                        ev.set()
                finally:
                    finished.set()
            return run

        for s in self.other_streams:
            w = self._workers.get(s)
            if w is None:
                if not self._workers:
                    weakref.finalize(self, _stop_workers, self._workers)
                w = self._workers[s] = _Worker(s)
            w.inbox.put(job(s))
        try:
            self._run_stream(self.main_stream, env, events, abort, records)
        except BaseException as e:  # noqa: BLE001
            errors.append((self.main_stream, e))
            abort.append(True)
            for ev in events:
                ev.set()
        for f in done:
            # once a stream failed, do not wait for one blocked in a collective whose peers will never come
            # (their step is waiting for this rank's AllReduce): raise, so the job ends instead of hanging
            while not f.wait(0.05):
                if errors:
                    break
        if errors:
            stream, err = errors[0]
            raise err
        for f in self.tl.step_frees:
            env[f] = None
        return records

    # -- events ------------------------------------------------------------------------------------
    def task_table(self) -> dict:
        """Static description of every task and planned buffer (columns of equal length)."""
        tasks = self.tl.tasks
        plan = {b.key: b for b in self.tl.plan.buffers}
        free_task: dict[int, int] = {}
        for t in tasks:
            for f in t.frees:
                free_task[f] = t.task_id
        cols = {k: [] for k in ("task_id", "name", "op", "kind", "stream", "stream_id", "scope", "shape", "dtype",
                                "flops", "bytes", "phase", "fused_ops", "out_size", "out_offset", "free_task_id")}
        for t in tasks:
            n = t.node
            b = plan.get(n.id) if n is not None else None
            cols["task_id"].append(t.task_id)
            cols["name"].append(t.name)
            cols["op"].append(t.op)
            cols["kind"].append(t.kind)
            cols["stream"].append(t.stream)
            cols["stream_id"].append(t.stream_id)
            cols["scope"].append(n.scope if n is not None else "")
            cols["shape"].append("x".join(map(str, n.shape)) if n is not None else "")
            cols["dtype"].append(n.dtype.name if n is not None else "")
            cols["flops"].append(int(t.flops))
            cols["bytes"].append(int(t.nbytes))
            cols["phase"].append(t.phase or "")
            cols["fused_ops"].append(",".join(n.ann.get("fused_ops", ())) if n is not None else "")
            cols["out_size"].append(b.size if b is not None else 0)
            cols["out_offset"].append(b.offset if b is not None else -1)
            cols["free_task_id"].append(free_task.get(t.out, -1) if b is not None else -1)
        return cols

    def _emit(self, records, step, t_begin, copy_times, get_next):
        emit = hooks.emit
        gname = self.graph.name
        if self._table_generation != hooks.generation:  # a new listener has not seen this graph yet
            self._table_generation = hooks.generation
            if self._task_table_cols is None:  # the table is static: built once per graph, not per listener
                self._task_table_cols = self.task_table()
            emit("task_table", {"graph": gname, "graph_id": id(self), "planned_peak": self.tl.plan.peak,
                                "parameter_bytes": self.device.parameter_bytes(),
                                "capacity": self.device.pool.capacity,
                                "columns": {k: list(v) for k, v in self._task_table_cols.items()}})
        if get_next is not None:
            emit("task", {"task_id": -1, "name": "GetNext", "op": "get_next", "kind": "get_next", "stream_id": 0,
                          "stream": "aicore0", "scope": "", "start_ns": get_next[0], "end_ns": get_next[1],
                          "step": step, "graph": gname, "shape": "", "dtype": "", "flops": 0, "bytes": 0,
                          "phase": "input"})
        if isinstance(records, tuple):  # one stream: tasks ran in task order, ids are fixed
            ids = self._flat_ids
            starts, ends = records
            fi, bi = self._flat_markers
            fp_start = int(starts[fi]) if fi >= 0 else t_begin
            bp_end = int(ends[bi]) if bi >= 0 else fp_start
            fp_op, bp_op = self._flat_marker_ops
            t_end = int(ends[-1]) if len(ends) else clock()  # in order on one stream: the last end is the latest
        else:  # several streams: their tasks merged in start order (streams in a fixed order at ties)
            parts = [records[s] for s in [self.main_stream] + self.other_streams if s in records]
            starts = np.concatenate([p[1] for p in parts])
            order = np.argsort(starts, kind="stable")
            ids = np.concatenate([p[0] for p in parts])[order]
            starts = starts[order]
            ends = np.concatenate([p[2] for p in parts])[order]
            fwd, bwd = self._phase_masks
            fw = fwd[ids]
            bw = bwd[ids]
            fp_start = int(starts[fw].min()) if fw.any() else t_begin
            bp_end = int(ends[bw].max()) if bw.any() else fp_start
            fp_op = self.tl.tasks[int(ids[fw][np.argmin(starts[fw])])].name if fw.any() else ""
            bp_op = self.tl.tasks[int(ids[bw][np.argmax(ends[bw])])].name if bw.any() else ""
            t_end = int(ends.max()) if len(ends) else clock()
        ev = {"graph": gname, "graph_id": id(self), "step": step, "task_id": ids, "start_ns": starts, "end_ns": ends}
        if get_next is None:
            ev["input_task"], ev["input_ns"] = self._input_task, copy_times
        emit("step_tasks", ev)
        self.last_markers = {
            "start_ns": get_next[0] if get_next is not None else t_begin,
            "get_next_start_ns": get_next[0] if get_next else copy_times[0],
            "get_next_end_ns": get_next[1] if get_next else copy_times[1],
            "fp_start_ns": fp_start, "bp_end_ns": bp_end, "end_ns": t_end, "fp_start_op": fp_op, "bp_end_op": bp_op}


def evaluate(nodes: list[Node], values: dict[int, np.ndarray], targets: list[Node]) -> dict[int, np.ndarray]:
    """Eagerly run ``nodes`` (in order) needed for ``targets``, reading leaves from ``values``."""
    need = {t.id for t in targets}
    for n in reversed(nodes):
        if n.id in need:
            need.update(i.id for i in n.inputs)
    out = dict(values)
    for n in nodes:
        if n.id not in need or n.id in out:
            continue
        if n.op == "const":
            out[n.id] = n.attrs["value"]
        elif n.op == "param":
            out[n.id] = n.attrs["_var"].data
        else:
            out[n.id] = get_primitive(n.op).kernel(*[out[i.id] for i in n.inputs], **n.attrs)
    return out
