"""BLAS thread policy of the runtime's GEMMs (matmul, batch_matmul, conv2d and its gradients).

The policy, from measurements on this project's 2-core machines (``benchmarks/README.md``, "BLAS threads"):

* a GEMM below ``MIN_PARALLEL_FLOPS`` (2*m*n*k = 32 MFLOP) runs on ONE BLAS thread. On an idle machine a
  second thread gains little there (conv2 of the digits CNN, 9.4 MFLOP: 158 -> 116 us; a 64x256x256
  dense layer: 88 -> 78 us), while with another process on the cores a multi-threaded OpenBLAS call
  waits for a descheduled worker: medians of 31 ms instead of 0.3 ms (33.6 MFLOP), 90th percentiles of
  40-60 ms even at 8 MFLOP;
* a larger GEMM uses every BLAS thread (the library's count at import, e.g. OPENBLAS_NUM_THREADS) while
  the machine has idle cores, and one thread while other processes keep at least half a core busy
  (measured from /proc/stat minus this process's own CPU time, re-read at most every
  ``SAMPLE_SECONDS``): there the second thread gains 1.4-2x on an idle machine (134 MFLOP: 1.36 -> 0.95 ms)
  and loses 20x on a shared one (1.4 -> 25 ms median).

``INSIGHT_BLAS_THREADS=N`` pins every runtime GEMM to N threads (no measurement). Only the main thread
changes the count (GEMMs on a stream's worker thread run with the count it last set). The count is set
through threadpoolctl's handle on the BLAS library (about 3 us per change, made only when the wanted
count differs from the current one), so numpy code outside the runtime runs with whatever count the
runtime's last GEMM set. OpenMP (the Cython kernels) is not changed here: those kernels go parallel only
above a work threshold (``_nt`` in ``runtime/_kernels.pyx``).
"""
from __future__ import annotations

import os
import threading
import time

from threadpoolctl import ThreadpoolController

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


class BlasThreads:
    """Chooses and sets the BLAS thread count per GEMM size (see the module docstring)."""

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

    def for_gemm(self, m: int, n: int, k: int) -> None:
        """Set the thread count for a (m, k) x (k, n) product (batched products: m counts the batch).
        Only the main thread changes it: a stream's worker thread must not resize the BLAS pool while
        another thread is inside a BLAS call (it runs with the count the main thread last set)."""
        if threading.current_thread() is not _MAIN:
            return
        want = self.want(2.0 * m * n * k)
        if want != self.current and self._libs:
            for c in self._libs:
                c.set_num_threads(want)
            self.current = want


blas = BlasThreads()
