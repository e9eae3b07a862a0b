"""BLAS thread policy of the runtime's GEMMs (matmul, batch_matmul, conv2d and its gradients).

The GEMMs run on the OpenMP threads of the runtime's own kernels, not on the BLAS library's thread pool:
``matmul`` below splits a product into batch items or row / column panels, one per OpenMP thread, each a
single-threaded ``cblas_?gemm`` call of the library numpy loaded (``runtime/_gemm.pyx``), and the
library's own pool is set to one thread. The reason, measured on this project's 2-core machines: an
OpenBLAS worker that finished a GEMM spins (``sched_yield`` in a loop) for about 2^28 cycles before it
sleeps, so with two pools on two cores the BLAS workers took the cores from the fused kernels' OpenMP
threads between the GEMMs of every step: the fused BERT-small step without its GEMMs took 150-170 ms on
two threads against 125 ms of one thread's CPU time, and the flash-attention kernels ran slower than
the unfused ops they replace (0.95x); with OPENBLAS_THREAD_TIMEOUT=4 (the shortest spin, which can only be
set before numpy is imported) the same step took 98 ms. One pool gives that without the environment
variable (``benchmarks/bench_fusion.py --part bert``; ``benchmarks/README.md``, "One thread pool").

How many threads a GEMM gets (``BlasThreads.want``):

* a GEMM below ``MIN_PARALLEL_FLOPS`` (2*m*n*k = 32 MFLOP) runs on ONE thread. On an idle machine a
  second thread gains little there (conv2 of the digits CNN, 9.4 MFLOP: 158 -> 116 us; a 64x256x256
  dense layer: 88 -> 78 us), while with another process on the cores a multi-threaded call
  waits for a descheduled worker: medians of 31 ms instead of 0.3 ms (33.6 MFLOP), 90th percentiles of
  40-60 ms even at 8 MFLOP;
* a larger GEMM uses ``max_threads`` (the BLAS library's thread count at import, e.g. OPENBLAS_NUM_THREADS)
  while the machine has idle cores, and one thread while other processes keep at least half a core busy
  (measured from /proc/stat minus this process's own CPU time, re-read at most every
  ``SAMPLE_SECONDS``): there the second thread gains 1.4-2x on an idle machine (134 MFLOP: 1.36 -> 0.95 ms)
  and loses 20x on a shared one (1.4 -> 25 ms median).

``INSIGHT_BLAS_THREADS=N`` pins every runtime GEMM to N threads (no measurement). A GEMM on a stream's
worker thread (not the main thread) runs on one thread: the streams already run side by side. Where the
library's ``cblas_sgemm`` / ``cblas_dgemm`` cannot be found (a BLAS other than the OpenBLAS and MKL
builds numpy ships with), or ``INSIGHT_GEMM_OPENMP=0``, the GEMM is ``np.matmul`` with the library's
thread count set through threadpoolctl to the same policy, as before; an operand BLAS cannot take (an
integer dtype, another byte order, no unit stride) is ``np.matmul`` on one library thread. numpy code outside the
runtime runs with the library's count the runtime last set (one thread once a runtime GEMM ran).
"""
from __future__ import annotations

import ctypes
import os
import threading
import time

import numpy as np
from threadpoolctl import ThreadpoolController

from runtime import _gemm

MIN_PARALLEL_FLOPS = 32e6
SAMPLE_SECONDS = 0.5
FOREIGN_BUSY_CORES = 0.5   # other processes using at least this many cores: the machine is shared
_MAIN = threading.main_thread()


def _cpu_jiffies() -> tuple[float, float] | None:
    """(busy, total) CPU time of the whole machine in seconds, from /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    vals = [int(v) for v in fields[:8]]
    idle = vals[3] + vals[4]  # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(vals) - idle) / hz, sum(vals) / hz


def _find_cblas(libs) -> tuple[int, int, bool] | None:
    """Addresses of the library's cblas_sgemm / cblas_dgemm and whether its integers are 64-bit."""
    for c in libs:
        try:
            lib = ctypes.CDLL(c.filepath)
        except OSError:
            continue
        for pre, suf, i64 in (("scipy_cblas_", "64_", True), ("cblas_", "64_", True), ("scipy_cblas_", "", False),
                              ("cblas_", "", False)):
            try:
                fs, fd = getattr(lib, f"{pre}sgemm{suf}"), getattr(lib, f"{pre}dgemm{suf}")
            except AttributeError:
                continue
            return (ctypes.cast(fs, ctypes.c_void_p).value, ctypes.cast(fd, ctypes.c_void_p).value, i64)
    return None


class BlasThreads:
    """Chooses the thread count per GEMM size and runs the runtime's GEMMs (see the module docstring)."""

    def __init__(self):
        try:
            self._libs = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
        except Exception:  # noqa: BLE001 - an unusual BLAS build: leave its threads alone
            self._libs = []
        self.max_threads = max((c.num_threads for c in self._libs), default=1)
        pinned = os.environ.get("INSIGHT_BLAS_THREADS")
        self.pinned = max(1, int(pinned)) if pinned else None
        self.current: int | None = None
        self.shared = False
        self._next_sample = 0.0
        self._last = None
        found = _find_cblas(self._libs) if self._libs else None
        self.own_threads = found is not None and os.environ.get("INSIGHT_GEMM_OPENMP", "1") != "0"
        if self.own_threads:
            _gemm.set_blas(*found)

    def _sample(self, now: float) -> None:
        cur = _cpu_jiffies()
        own = sum(os.times()[:2])
        if cur is not None and self._last is not None:
            (busy0, total0), own0 = self._last
            dt_total = cur[1] - total0
            if dt_total > 0:
                ncpu = os.cpu_count() or 1
                foreign_cores = (cur[0] - busy0 - (own - own0)) / dt_total * ncpu
                self.shared = foreign_cores >= FOREIGN_BUSY_CORES
        self._last = (cur, own) if cur is not None else None
        self._next_sample = now + SAMPLE_SECONDS

    def want(self, flops: float) -> int:
        if self.pinned is not None:
            return self.pinned
        if flops < MIN_PARALLEL_FLOPS or self.max_threads <= 1:
            return 1
        now = time.monotonic()
        if now >= self._next_sample:
            self._sample(now)
        return 1 if self.shared else self.max_threads

    def _set_library(self, want: int) -> None:
        if want != self.current and self._libs:
            for c in self._libs:
                c.set_num_threads(want)
            self.current = want

    def for_gemm(self, m: int, n: int, k: int) -> int:
        """The thread count for a (m, k) x (k, n) product (batched products: m counts the batch); where the
        library runs the GEMM itself (``own_threads`` off) its pool is set to it. Only the main thread
        changes the library's count: a stream's worker thread must not resize the pool while another
        thread is inside a BLAS call."""
        if threading.current_thread() is not _MAIN:
            return 1
        want = self.want(2.0 * m * n * k)
        self._set_library(1 if self.own_threads else want)
        return want

    def matmul(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``np.matmul(a, b, out=out)`` on the runtime's threads (``out``, when given, is C-contiguous; one that
        overlaps an operand goes to numpy, which copies first)."""
        sa, sb = a.shape, b.shape
        nt = self.for_gemm(a.size // max(sa[-1], 1), sb[-1], sa[-1])
        if self.own_threads and len(sa) >= 2 and len(sb) >= 2 and a.dtype is b.dtype:
            if out is None:      # batch axes: equal, or one operand 2-d (anything else: numpy's broadcasting)
                batch = sa[:-2] if len(sa) >= len(sb) else sb[:-2]
                c = np.empty(batch + (sa[-2], sb[-1]), a.dtype)
            elif np.may_share_memory(out, a) or np.may_share_memory(out, b):
                c = None         # an output over an operand: numpy's matmul handles the overlap
            else:
                c = out
            if c is not None and _gemm.gemm(a, b, c, nt):
                return c
        # a dtype or layout BLAS cannot take: numpy runs it (on one thread when the runtime runs its GEMMs
        # itself: waking the library's pool would set its workers spinning against the OpenMP threads)
        return np.matmul(a, b) if out is None else np.matmul(a, b, out=out)


blas = BlasThreads()
