"""The host->device data queue of data sink mode.

A host thread pulls batches from the dataset, copies them host->device (a real memcpy, timed) and
pushes them into a bounded queue; the step's GetNext task pops from it. Every push and pop records
the queue depth and how long it blocked (full on push, empty on pop).
"""
from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

from runtime import hooks
from runtime.device.memory import LiveTensor, get_device

clock = time.perf_counter_ns
_END = object()


class DeviceQueue:
    def __init__(self, capacity: int = 8):
        if capacity < 1:
            raise ValueError(f"DeviceQueue: capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self._items: deque = deque()
        self._blocks: deque = deque()  # the device block of each item (None for the end marker)
        self._cv = threading.Condition()
        self._closed = False
        self._error: BaseException | None = None
        self.pushes = self.pops = 0
        self.empty_pops = 0   # pops that found the queue empty and had to wait
        self.full_pushes = 0  # pushes that found the queue full and had to wait
        self.step = None

    def push(self, item, block=None) -> bool:
        """Blocks while full; returns False if the queue was closed. ``block``: the device memory the
        item occupies while it waits in the queue (freed when it is popped or the queue closes)."""
        t0 = clock()
        with self._cv:
            waited = False
            while len(self._items) >= self.capacity and not self._closed:
                waited = True
                self._cv.wait()
            if self._closed:
                if block is not None:
                    block._pool.free(block)
                return False
            self._items.append(item)
            self._blocks.append(block)
            depth = len(self._items)
            self.pushes += 1
            self.full_pushes += waited
            self._cv.notify_all()
        if hooks.listening:
            hooks.emit("device_queue", {"t_ns": clock(), "action": "push", "depth": depth, "capacity": self.capacity,
                                        "wait_ns": clock() - t0 if waited else 0, "step": self.step})
        return True

    def pop(self):
        """Blocks while empty; returns (item, t_start, t_end) or raises StopIteration at the end."""
        t0 = clock()
        with self._cv:
            waited = False
            while not self._items and not self._closed:
                waited = True
                self._cv.wait()
            if not self._items:
                if self._error is not None:
                    raise self._error
                raise StopIteration
            item = self._items.popleft()
            if item is _END:
                self._items.appendleft(item)
                raise StopIteration
            block = self._blocks.popleft()
            depth = len(self._items)
            self.pops += 1
            self.empty_pops += waited
            self._cv.notify_all()
        if block is not None:
            block._pool.free(block)  # the batch now belongs to the step's input buffers
        t1 = clock()
        if hooks.listening:
            hooks.emit("device_queue", {"t_ns": t1, "action": "pop", "depth": depth, "capacity": self.capacity,
                                        "wait_ns": t1 - t0 if waited else 0, "step": self.step})
        return item, t0, t1

    def peek(self):
        """The next item without removing it, or None if there is none yet (never blocks). Lets host
        work of the next step start early (EmbeddingLookup's prefetch of its ids)."""
        with self._cv:
            item = self._items[0] if self._items else None
        return None if item is _END else item

    def finish(self, error: BaseException | None = None) -> None:
        """The producer is done (or failed): consumers drain what is left, then stop."""
        with self._cv:
            self._error = error
            if error is None:
                self._items.append(_END)
                self._blocks.append(None)
            else:
                self._closed = True
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            blocks = [b for b in self._blocks if b is not None]
            self._blocks.clear()
            self._items.clear()
            self._cv.notify_all()
        for b in blocks:
            b._pool.free(b)


class SinkFeeder:
    """The host thread of sink mode: dataset -> H2D copy -> DeviceQueue, for ``epochs`` passes."""

    active: "DeviceQueue | None" = None  # the queue of the running sink loop (for prefetchers)

    def __init__(self, dataset, epochs: int, capacity: int = 8, to_arrays=None):
        self.queue = DeviceQueue(capacity)
        SinkFeeder.active = self.queue
        self._dataset = dataset
        self._epochs = epochs
        self._to_arrays = to_arrays or (lambda b: tuple(np.asarray(x) for x in b))
        self.thread = threading.Thread(target=self._run, name="sink-feeder", daemon=True)
        self.thread.start()

    def _run(self):
        pool = get_device().pool
        try:
            for _ in range(self._epochs):
                for k, batch in enumerate(self._dataset):
                    arrays = self._to_arrays(batch)
                    nbytes = int(sum(np.asarray(a).nbytes for a in arrays))
                    first = np.asarray(arrays[0])
                    block = pool.alloc(nbytes, LiveTensor(f"queue.batch{k}", nbytes, "TransferData", first.shape,
                                                          first.dtype.name), "queue", "while filling the data queue")
                    t0 = clock()
                    dev = tuple(np.array(a, copy=True, order="C") for a in arrays)  # the H2D copy
                    t1 = clock()
                    if hooks.listening:
                        hooks.emit("task", {"task_id": -2, "name": "TransferData", "op": "copy_h2d",
                                            "kind": "memcpy_h2d", "stream_id": 4, "stream": "host", "scope": "",
                                            "start_ns": t0, "end_ns": t1, "step": -1, "graph": "data_sink",
                                            "shape": "x".join(map(str, dev[0].shape)), "dtype": dev[0].dtype.name,
                                            "flops": 0,
                                            "bytes": int(sum(a.nbytes for a in dev)), "phase": "input"})
                    if not self.queue.push(dev, block):
                        return
            self.queue.finish()
        except BaseException as e:  # noqa: BLE001 - delivered to the consumer
            self.queue.finish(e)

    def close(self):
        if SinkFeeder.active is self.queue:
            SinkFeeder.active = None
        self.queue.close()
        self.thread.join(timeout=5)
