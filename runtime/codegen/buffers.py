"""Recycled, 64-byte aligned memory for large kernel outputs (GEMM prologues, fused kernels, ``uniform``).

``aligned_empty(shape, dtype, nbytes)`` hands out a view of a pooled buffer that no live array uses.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

from runtime.device.memory import DeviceOutOfMemoryError, LiveTensor, get_device


class BufferPool:
    """Recycles the memory of large kernel outputs (a caching allocator).

    A fresh multi-megabyte numpy array costs a page fault (and the kernel zeroing the page) per 4 KB on
    its first write -- often more than the kernel itself. Outputs are 64-byte aligned views of pooled
    buffers; a buffer is free again once nothing references it any more (its views are gone), which
    its reference count tells. The pool keeps at most ``limit`` bytes.

    A cached buffer is device memory held between steps, so it takes a ``kernel_pool`` block in the
    device's MemoryPool (and is a memory event like any allocation); when the device has no room for it,
    the buffer is handed out uncached instead.
    """

    def __init__(self, limit: int = 1 << 30):
        self.limit = limit
        self.bytes = 0
        self.free_lists: dict[int, list] = {}
        self.blocks: list = []  # the device blocks of the cached buffers
        self.lock = threading.Lock()
        # references a buffer has when only the pool holds it, measured through the same code path
        probe = [np.empty(1, np.uint8)]
        self.free_refs = [sys.getrefcount(b) for b in probe][0]

    def empty(self, shape, dtype, nbytes: int):
        with self.lock:
            bufs = self.free_lists.setdefault(nbytes, [])
            for buf in bufs:
                if sys.getrefcount(buf) == self.free_refs:   # no view of it is alive any more
                    return self._view(buf, shape, dtype, nbytes)
            buf = np.empty(nbytes + 64, np.uint8)
            if self.bytes + nbytes <= self.limit:
                view = self._view(buf, shape, dtype, nbytes)
                try:
                    blk = get_device().pool.alloc(nbytes, LiveTensor(f"kernel_pool[{len(self.blocks)}]", nbytes,
                                                                     "fused kernel output", view.shape,
                                                                     view.dtype.name), "kernel_pool")
                except DeviceOutOfMemoryError:
                    return view  # no room to keep it: an uncached buffer
                bufs.append(buf)
                self.blocks.append(blk)
                self.bytes += nbytes
                return view
            return self._view(buf, shape, dtype, nbytes)

    @staticmethod
    def _view(buf, shape, dtype, nbytes):
        off = (-buf.ctypes.data) % 64
        return buf[off:off + nbytes].view(dtype).reshape(shape)

    def clear(self):
        with self.lock:
            self.free_lists.clear()
            blocks, self.blocks = self.blocks, []
            self.bytes = 0
        for blk in blocks:
            blk._pool.free(blk)


_pool = BufferPool()


def aligned_empty(shape, dtype, nbytes: int):
    """A large output array: 64-byte aligned (whole vectors, streaming stores), memory recycled."""
    return _pool.empty(shape, dtype, nbytes)
