"""Simulated device memory: a pool of fixed capacity with alignment, best-fit reuse and peak tracking.

The pool manages an address space [0, capacity): blocks have real offsets and sizes, freed blocks
are coalesced and reused best-fit, and going past capacity raises DeviceOutOfMemoryError. The bytes
themselves live in host RAM (numpy arrays); what is simulated is the device's limited address space.
"""
from __future__ import annotations

import bisect
import time
import threading
import weakref
from dataclasses import dataclass, field

from runtime import context, hooks
from runtime.units import fmt_bytes, parse_size  # noqa: F401  (re-exported)

ALIGN = 512  # Ascend's allocation granularity

def align(n: int) -> int:
    return max(ALIGN, (int(n) + ALIGN - 1) // ALIGN * ALIGN)


@dataclass
class LiveTensor:
    name: str
    size: int
    op: str = ""
    shape: tuple = ()
    dtype: str = ""

    def describe(self) -> str:
        shape = "x".join(map(str, self.shape)) or "scalar"
        by = f" produced by {self.op}" if self.op else ""
        return f"{fmt_bytes(self.size)} {self.dtype}[{shape}] {self.name!r}{by}"


class DeviceOutOfMemoryError(MemoryError):
    """Raised when an allocation does not fit the device's capacity."""

    def __init__(self, capacity: int, in_use: int, requested: int, largest: list[LiveTensor], what: str = "",
                 for_tensor: str = ""):
        self.capacity, self.in_use, self.requested, self.largest = capacity, in_use, requested, largest
        self.what, self.for_tensor = what, for_tensor
        target = f" for {for_tensor!r}" if for_tensor else ""
        lines = [f"device out of memory{(' ' + what) if what else ''}: capacity {fmt_bytes(capacity)}, "
                 f"in use {fmt_bytes(in_use)}, requested {fmt_bytes(requested)}{target} "
                 f"(short by {fmt_bytes(in_use + requested - capacity)})."]
        if largest:
            lines.append("Largest live tensors:")
            lines += [f"  {k + 1}. {t.describe()}" for k, t in enumerate(largest)]
        lines.append("Reduce the batch size or model, raise context.set_context(device_memory=...), or place "
                     "the largest ops on the host with primitive_target='CPU'.")
        super().__init__("\n".join(lines))


@dataclass
class Block:
    offset: int
    size: int
    tensor: LiveTensor
    kind: str = "parameter"
    _pool: "MemoryPool | None" = field(default=None, repr=False)


class MemoryPool:
    """Best-fit allocator over [0, capacity) with coalescing free lists.

    Every alloc and free is a ``memory`` event (``source: "pool"``) while a listener is subscribed; a
    listener that subscribes later first gets the blocks already live as allocations (``announce``), so
    a profiler started mid-training still sees the parameters. Block kinds: ``parameter``,
    ``activation_reserve`` (a compiled step's planned activation peak), ``workspace``, ``queue`` (batches
    in the data-sink queue), ``kernel_pool`` (the fused kernels' cached output buffers).
    """

    def __init__(self, capacity, name: str = "device"):
        self.capacity = parse_size(capacity)
        self.name = name
        self._free: list[tuple[int, int]] = [(0, self.capacity)]  # (offset, size) sorted by offset
        self._live: dict[int, Block] = {}
        self.in_use = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._announced = -1  # the hooks.generation whose listeners have seen the live blocks
        self.retired = False  # a replaced device's pool: its blocks drain silently (not the device's memory)

    # -- events --------------------------------------------------------------------------------------
    def _event(self, action: str, blk: Block, in_use: int, t_ns: int) -> dict:
        """``size`` is what was asked for (the tensor's bytes); ``in_use`` counts the aligned blocks."""
        t = blk.tensor
        return {"t_ns": t_ns, "action": action, "device": self.name, "kind": blk.kind, "tensor": t.name,
                "op": t.op, "size": t.size, "offset": blk.offset, "in_use": in_use, "capacity": self.capacity,
                "step": -1, "shape": "x".join(map(str, t.shape)), "dtype": t.dtype, "source": "pool"}

    def _notify(self, action: str, blk: Block, in_use: int) -> None:
        if self.retired:
            return
        if self._announced != hooks.generation:
            self.announce()  # the new listener gets the live blocks, this change included
        else:
            hooks.emit("memory", self._event(action, blk, in_use, time.perf_counter_ns()))

    def announce(self) -> None:
        """Tell listeners that subscribed since the last call which blocks are live (one alloc each)."""
        if not hooks.listening or self._announced == hooks.generation or self.retired:
            return
        with self._lock:
            self._announced = hooks.generation
            blocks = sorted(self._live.values(), key=lambda b: b.offset)
            t_ns = time.perf_counter_ns()
            in_use, events = 0, []
            for b in blocks:
                in_use += b.size
                events.append(self._event("alloc", b, in_use, t_ns))
        for ev in events:
            hooks.emit("memory", ev)

    # -- allocation ----------------------------------------------------------------------------
    def alloc(self, nbytes: int, tensor: LiveTensor, kind: str = "parameter", what: str = "") -> Block:
        size = align(nbytes)
        with self._lock:
            best = None
            for k, (off, sz) in enumerate(self._free):
                if sz >= size and (best is None or sz < self._free[best][1]):
                    best = k
            if best is None:
                raise DeviceOutOfMemoryError(self.capacity, self.in_use, size, self.largest_live(5), what,
                                             tensor.name)
            off, sz = self._free.pop(best)
            if sz > size:
                bisect.insort(self._free, (off + size, sz - size))
            blk = Block(off, size, tensor, kind, self)
            self._live[off] = blk
            self.in_use += size
            self.peak = max(self.peak, self.in_use)
            in_use = self.in_use
        if hooks.listening:
            self._notify("alloc", blk, in_use)
        return blk

    def free(self, blk: Block) -> None:
        with self._lock:
            if self._live.get(blk.offset) is not blk:
                return  # already freed (e.g. by reset)
            del self._live[blk.offset]
            self.in_use -= blk.size
            k = bisect.bisect_left(self._free, (blk.offset, 0))
            off, size = blk.offset, blk.size
            if k < len(self._free) and off + size == self._free[k][0]:  # merge with the next hole
                size += self._free.pop(k)[1]
            if k > 0 and self._free[k - 1][0] + self._free[k - 1][1] == off:  # and the previous
                poff, psz = self._free.pop(k - 1)
                off, size = poff, psz + size
            bisect.insort(self._free, (off, size))
            in_use = self.in_use
        if hooks.listening:
            self._notify("free", blk, in_use)

    # -- queries -------------------------------------------------------------------------------------
    def largest_live(self, n: int = 5) -> list[LiveTensor]:
        return [b.tensor for b in sorted(self._live.values(), key=lambda b: -b.tensor.size)[:n]]

    def live_blocks(self) -> list[Block]:
        return sorted(self._live.values(), key=lambda b: b.offset)

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.in_use

    def largest_free_block(self) -> int:
        return max((s for _, s in self._free), default=0)

    def fragmentation(self) -> float:
        """1 - largest free block / total free (XProf's definition)."""
        free = self.free_bytes
        return 0.0 if free == 0 else 1.0 - self.largest_free_block() / free


class Device:
    """The simulated Ascend device: a device memory pool plus host-memory accounting.

    Parameters placed on the device hold a block for as long as the Parameter lives.
    """

    def __init__(self, capacity):
        self.pool = MemoryPool(capacity, "device")
        self.host_in_use = 0
        self._resident: dict[int, Block] = {}

    def resident_block(self, param) -> Block | None:
        return self._resident.get(id(param))

    def make_resident(self, params: list, what: str = "") -> list[Block]:
        """Allocate device blocks for parameters not yet resident; all or nothing."""
        new = []
        try:
            for p in params:
                if id(p) in self._resident:
                    continue
                blk = self.pool.alloc(p.data.nbytes, LiveTensor(p.name, p.data.nbytes, "parameter", p.shape,
                                                                p.dtype.name), "parameter", what)
                self._resident[id(p)] = blk
                new.append((p, blk))
        except DeviceOutOfMemoryError:
            for p, blk in new:
                self.pool.free(blk)
                del self._resident[id(p)]
            raise
        for p, blk in new:
            weakref.finalize(p, self._release, id(p), blk)
        return [b for _, b in new]

    def _release(self, key: int, blk: Block) -> None:
        if self._resident.get(key) is blk:
            del self._resident[key]
            self.pool.free(blk)

    def parameter_bytes(self) -> int:
        return sum(b.size for b in self._resident.values())


_device: Device | None = None
_device_capacity = None

DEFAULT_CAPACITY = "8GB"


def get_device() -> Device:
    """The process's device, (re)created when context's device_memory changes."""
    global _device, _device_capacity
    cap = context.get_context("device_memory") or DEFAULT_CAPACITY
    if _device is None or cap != _device_capacity:
        if _device is not None:
            # Parameters of models built before the change still free their blocks on the old pool when
            # they die; that is no longer the device's memory, so it reports nothing (a profiler would
            # otherwise get the old pool's whole live set announced into its memory table).
            _device.pool.retired = True
        _device = Device(cap)
        _device_capacity = cap
    return _device
