"""Host-memory policy of the runtime's steps: numpy arrays made while a step runs get recycled memory.

Every kernel of an unfused step that is a numpy expression (``a * b``, ``np.exp(x)``, ...) allocates its
output. glibc serves a block of a few megabytes with a fresh ``mmap`` and unmaps it again when the array
dies, so the next step pays a page fault and the kernel zeroing the page per 4 KB of every such output:
the unfused BERT-small step (``benchmarks/bench_fusion.py``) took about 33,000 page faults and 55-100 ms of
system time per step, a fifth of the step. Caching allocators (PyTorch's, MindSpore's memory pool) exist
for this; the fused kernels' large outputs already come from ``codegen.buffers``.

While a step runs (``step_memory()``: ``CompiledGraph.__call__``, ``Model.train_step`` and eval, a
stream's worker thread), numpy allocates through ``runtime._host_memory``: a block of 64 KB or more that
numpy frees is kept by its size (rounded up to pages) and handed out again, up to a limit; smaller
blocks and arrays made outside steps use numpy's default allocator. An array keeps the allocator that
made it, so one returned to the caller is freed into the cache whenever it dies.

``INSIGHT_HOST_CACHE_MB``: the cache's limit in MB (default 1024, at most an eighth of the machine's
memory); ``0`` turns the policy off (the step uses numpy's default allocator); anything that is not a number
gives one warning and the default. ``release()`` frees the
cached blocks; ``stats()`` counts hits and misses.
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

from runtime import _host_memory

DEFAULT_MB = 1024


def _default_limit() -> int:
    raw = os.environ.get("INSIGHT_HOST_CACHE_MB", "").strip()
    try:
        mb = float(raw) if raw else DEFAULT_MB
        if mb != mb:
            raise ValueError(raw)
    except ValueError:
        warnings.warn(f"INSIGHT_HOST_CACHE_MB must be a number of megabytes, got {raw!r}: using the default "
                      f"({DEFAULT_MB} MB, at most an eighth of the memory)", RuntimeWarning, stacklevel=2)
        raw, mb = "", DEFAULT_MB
    limit = max(0, int(min(mb, 2**40) * 2**20))
    if not raw:
        try:
            limit = min(limit, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8)
        except (ValueError, OSError):
            pass
    return limit


LIMIT = _default_limit()
ENABLED = LIMIT > 0
_host_memory.set_limit(LIMIT)
install = _host_memory.install if ENABLED else (lambda: None)
restore = _host_memory.restore if ENABLED else (lambda old: None)


@contextmanager
def step_memory():
    """numpy allocations in this block (this thread) go through the cache."""
    old = install()
    try:
        yield
    finally:
        restore(old)


def release() -> int:
    """Free every cached block (e.g. after training); returns the bytes released."""
    return _host_memory.release()


def stats() -> dict:
    return dict(_host_memory.stats(), enabled=ENABLED)
