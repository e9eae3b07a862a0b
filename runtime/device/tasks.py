"""Compile a placed, stream-assigned Graph into a task list for the simulated device.

One task per kernel launch (task_id, stream, op name, op type, input and output slots), plus an
event-record task after a producer and an event-wait task before a consumer for every
cross-stream dependency (deduplicated: a stream that already waited for a later task of the same
producer stream does not wait again). Also builds the liveness-based memory plan of the step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from runtime.device.plan import Buffer, MemoryPlan, plan_memory
from runtime.ir.graph import Graph, Node
from runtime.ops.registry import get_primitive

LEAVES = ("input", "param", "const")
ALIAS_OPS = frozenset({"reshape", "expand_dims", "squeeze"})  # no new buffer on the device
STREAM_IDS = {"aicore0": 0, "aicore1": 1, "aicpu": 2, "comm": 3, "host": 4}


@dataclass(eq=False)
class Task:
    task_id: int
    kind: str              # kernel | memcpy_h2d | memcpy_d2h | event_record | event_wait
    stream: str
    node: Node | None = None
    kernel: object = None
    ins: list = field(default_factory=list)
    out: int = -1
    attrs: dict = field(default_factory=dict)
    frees: tuple = ()
    event: int = -1
    flops: int = 0
    nbytes: int = 0
    phase: str | None = None

    @property
    def stream_id(self) -> int:
        return STREAM_IDS[self.stream]

    @property
    def name(self) -> str:
        if self.node is not None:
            return self.node.name
        return f"{self.kind}_{self.event}"

    @property
    def op(self) -> str:
        return self.node.op if self.node is not None else self.kind


@dataclass
class TaskList:
    graph: Graph
    nodes: list[Node]                     # slot order
    slot: dict[int, int]
    streams: dict[str, list[Task]]        # per-stream task sequences, in order
    tasks: list[Task]                     # all tasks, in compile (global) order
    n_events: int
    plan: MemoryPlan
    device_params: list                   # Parameters that live on the device
    host_params: list
    host_bytes: int                       # host-side activations (not in the device plan)
    step_frees: tuple                     # slots freed only when the whole step is done

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for t in self.tasks:
            kinds[t.kind] = kinds.get(t.kind, 0) + 1
        per_stream = ", ".join(f"{s}: {len(ts)}" for s, ts in self.streams.items() if ts)
        return f"{len(self.tasks)} tasks ({kinds}); streams {per_stream}; planned peak {self.plan.peak} bytes"


def compile_tasks(graph: Graph) -> TaskList:
    nodes = list(graph.nodes)
    slot = {n.id: k for k, n in enumerate(nodes)}
    pos = slot
    users: dict[int, list[Node]] = {}  # data and control consumers
    for n in nodes:
        for i in list(n.inputs) + list(n.deps):
            users.setdefault(i.id, []).append(n)

    # -- tasks and events -----------------------------------------------------------------------
    streams: dict[str, list[Task]] = {}
    tasks: list[Task] = []
    stream_of: dict[int, str] = {}
    index_in_stream: dict[int, int] = {}
    record_event: dict[int, int] = {}      # producer node id -> event id
    waited: dict[tuple[str, str], int] = {}  # (consumer stream, producer stream) -> max index waited
    n_events = 0
    compute_tasks: list[tuple[Task, Node]] = []

    def add(task: Task) -> Task:
        streams.setdefault(task.stream, []).append(task)
        tasks.append(task)
        return task

    for n in nodes:
        if n.op in LEAVES:
            continue
        s = n.ann.get("stream", "aicore0")
        # waits for producers on other streams
        for p in list(n.inputs) + list(n.deps):
            if p.op in LEAVES:
                continue
            ps = stream_of[p.id]
            if ps == s:
                continue
            idx = index_in_stream[p.id]
            if waited.get((s, ps), -1) >= idx:
                continue
            ev = record_event.get(p.id)
            if ev is None:
                raise AssertionError("producer event missing")  # records are added right after producers
            add(Task(len(tasks), "event_wait", s, event=ev, phase=n.ann.get("phase")))
            waited[(s, ps)] = idx
        prim = get_primitive(n.op)
        kind = {"copy_h2d": "memcpy_h2d", "copy_d2h": "memcpy_d2h"}.get(n.op, "kernel")
        flops, nbytes = prim.cost(n)
        t = add(Task(len(tasks), kind, s, n, prim.kernel, [slot[i.id] for i in n.inputs], slot[n.id], n.attrs,
                     flops=flops, nbytes=nbytes, phase=n.ann.get("phase")))
        compute_tasks.append((t, n))
        stream_of[n.id] = s
        index_in_stream[n.id] = len(streams[s]) - 1
        if any(u.ann.get("stream", "aicore0") != s for u in users.get(n.id, ()) if u.op not in LEAVES):
            record_event[n.id] = n_events
            add(Task(len(tasks), "event_record", s, event=n_events, phase=n.ann.get("phase")))
            n_events += 1

    # drop records nobody waits for (their waits were covered by a later one) and renumber
    used = sorted({t.event for t in tasks if t.kind == "event_wait"})
    renum = {e: k for k, e in enumerate(used)}
    tasks = [t for t in tasks if t.kind != "event_record" or t.event in renum]
    kept = {id(t) for t in tasks}
    streams = {s: [t for t in ts if id(t) in kept] for s, ts in streams.items()}
    for k, t in enumerate(tasks):
        t.task_id = k
        if t.event >= 0:
            t.event = renum[t.event]
    n_events = len(used)

    # -- frees ------------------------------------------------------------------------------------
    keep = {n.id for n in graph.roots()}
    last_task: dict[int, Task] = {}
    consumer_streams: dict[int, set] = {}
    for t, n in compute_tasks:
        for i in n.inputs:
            if i.op in ("param", "const"):
                continue
            consumer_streams.setdefault(i.id, set()).add(t.stream)
            last_task[i.id] = t
    # a buffer is freed early by its last reader only when every reader is on one stream, the producer's
    # (inputs are bound before any stream starts); otherwise when the whole step is done
    cross = {nid for nid, ss in consumer_streams.items()
             if len(ss) > 1 or (nid in stream_of and stream_of[nid] not in ss)}
    frees: dict[int, list[int]] = {}
    step_frees = []
    for nid, t in last_task.items():
        if nid in keep:
            continue
        if nid in cross:
            step_frees.append(slot[nid])
        else:
            frees.setdefault(t.task_id, []).append(slot[nid])
    for t in tasks:
        t.frees = tuple(frees.get(t.task_id, ()))

    # -- memory plan (device activations) -------------------------------------------------------
    base: dict[int, int] = {}  # alias node -> node owning the buffer
    buffers: dict[int, Buffer] = {}
    last = len(nodes)
    host_bytes = 0
    for n in nodes:
        if n.op in ("param", "const"):
            continue
        if n.ann.get("placement") == "host":
            if n.op not in LEAVES and get_primitive(n.op).category != "effect":
                host_bytes += n.nbytes
            continue
        if n.op not in LEAVES and get_primitive(n.op).category == "effect":
            continue
        if n.op in ALIAS_OPS and n.inputs[0].id in buffers | base.keys():
            base[n.id] = base.get(n.inputs[0].id, n.inputs[0].id)
            continue
        buffers[n.id] = Buffer(n.id, n.nbytes, pos[n.id], pos[n.id], n.name, n.op, n.shape, n.dtype.name,
                               stream=stream_of.get(n.id, "input"))
    for n in nodes:
        for i in n.inputs:
            b = buffers.get(base.get(i.id, i.id))
            if b is not None:
                b.end = max(b.end, pos[n.id])
                if n.op not in LEAVES and stream_of.get(n.id) != b.stream:
                    b.stream = "*"  # read on another stream: freed when the step ends
    root_buffers = {base.get(r.id, r.id) for r in graph.roots()}
    for b in buffers.values():
        if b.stream == "*" or b.key in root_buffers:
            b.end = last
    plan = plan_memory(list(buffers.values()))

    params = [n for n in nodes if n.op == "param"]
    device_params = [n.attrs["_var"] for n in params if n.ann.get("placement", "device") != "host"]
    host_params = [n.attrs["_var"] for n in params if n.ann.get("placement") == "host"]
    return TaskList(graph, nodes, slot, streams, tasks, n_events, plan, device_params, host_params, host_bytes,
                    tuple(step_frees))
