"""Recycled, 64-byte aligned memory for large kernel outputs (GEMM prologues, fused kernels, ``uniform``).

``aligned_empty(shape, dtype, nbytes)`` hands out a view of a pooled buffer that no live array uses.
"""
from __future__ import annotations

import sys
import threading

import numpy as np


class BufferPool:
    """Recycles the memory of large kernel outputs (a caching allocator).

    A fresh multi-megabyte numpy array costs a page fault (and the kernel zeroing the page) per 4 KB on
    its first write -- often more than the kernel itself. Outputs are 64-byte aligned views of pooled
    buffers; a buffer is free again once nothing references it any more (its views are gone), which
    its reference count tells. The pool keeps at most ``limit`` bytes.
    """

    def __init__(self, limit: int = 1 << 30):
        self.limit = limit
        self.bytes = 0
        self.free_lists: dict[int, list] = {}
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
                bufs.append(buf)
                self.bytes += nbytes
            return self._view(buf, shape, dtype, nbytes)

    @staticmethod
    def _view(buf, shape, dtype, nbytes):
        off = (-buf.ctypes.data) % 64
        return buf[off:off + nbytes].view(dtype).reshape(shape)

    def clear(self):
        with self.lock:
            self.free_lists.clear()
            self.bytes = 0


_pool = BufferPool()


def aligned_empty(shape, dtype, nbytes: int):
    """A large output array: 64-byte aligned (whole vectors, streaming stores), memory recycled."""
    return _pool.empty(shape, dtype, nbytes)
