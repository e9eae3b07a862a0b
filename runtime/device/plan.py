"""Static memory planning for a step's activations: liveness intervals -> offsets with reuse.

Each buffer lives over [start, end] positions of the task order; the planner sweeps positions and
assigns each buffer the best-fitting hole among the offsets freed by buffers that died earlier
(buffers whose lifetimes overlap never overlap in memory). The planned peak is the highest
address used: what the step needs beyond the parameters.

With several streams the task order is not the time order: a hole freed by one stream is reused only
by buffers of the same stream (whose order is guaranteed), and buffers read across streams live to
the end of the step (the task compiler sets their ``end``).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from runtime.device.memory import align


@dataclass
class Buffer:
    key: int          # the node id owning the buffer
    size: int         # bytes, aligned
    start: int        # position where it is written
    end: int          # last position where it is read (>= start)
    name: str = ""
    op: str = ""
    shape: tuple = ()
    dtype: str = ""
    offset: int = -1
    stream: str = ""  # the stream that writes it and (unless it lives to the end of the step) frees it


@dataclass
class MemoryPlan:
    buffers: list[Buffer]
    peak: int                  # highest address used
    peak_position: int         # task position at which the live set is largest
    live_at_peak: list[Buffer]

    def total_naive(self) -> int:
        """Bytes needed without reuse (every buffer its own space)."""
        return sum(b.size for b in self.buffers)


def plan_memory(buffers: list[Buffer]) -> MemoryPlan:
    for b in buffers:
        b.size = align(b.size)
        if b.end < b.start:
            b.end = b.start
    order = sorted(buffers, key=lambda b: (b.start, -b.size, b.key))
    ends: list[tuple[int, int, int]] = []  # heap-like sorted list of (end, offset, size) for live buffers
    holes: dict[str, list[tuple[int, int]]] = {}  # per stream: holes (offset, size) sorted by offset
    top = 0
    live_bytes, best_live, best_pos = 0, -1, 0
    live: dict[int, Buffer] = {}
    best_set: list[Buffer] = []

    def release(upto: int):
        nonlocal live_bytes
        while ends and ends[0][0] < upto:
            _, off, size = ends.pop(0)
            b = live.pop(off)
            live_bytes -= b.size
            free = holes.setdefault(b.stream, [])
            k = bisect.bisect_left(free, (off, 0))
            o, s = off, size
            if k < len(free) and o + s == free[k][0]:
                s += free.pop(k)[1]
            if k > 0 and free[k - 1][0] + free[k - 1][1] == o:
                po, ps = free.pop(k - 1)
                o, s = po, ps + s
            free.insert(bisect.bisect_left(free, (o, 0)), (o, s))

    for b in order:
        release(b.start)  # buffers whose last read is before this write are dead
        free = holes.setdefault(b.stream, [])
        best = None
        for k, (off, sz) in enumerate(free):
            if sz >= b.size and (best is None or sz < free[best][1]):
                best = k
        if best is not None:
            off, sz = free.pop(best)
            if sz > b.size:
                free.insert(bisect.bisect_left(free, (off + b.size, 0)), (off + b.size, sz - b.size))
        elif free and free[-1][0] + free[-1][1] == top:  # grow the last hole at the top
            off, sz = free.pop()
            top = off + b.size
        else:
            off = top
            top += b.size
        b.offset = off
        live[off] = b
        bisect.insort(ends, (b.end, off, b.size))
        live_bytes += b.size
        if live_bytes > best_live:
            best_live, best_pos = live_bytes, b.start
            best_set = list(live.values())
    return MemoryPlan(buffers, top, best_pos, sorted(best_set, key=lambda x: -x.size))
