"""Dataset engine configuration (``runtime.dataset.config``), MindSpore ``dataset.config``-shaped."""
from __future__ import annotations

from runtime import random as _random

_DEFAULT_PREFETCH = 16
_DEFAULT_MONITOR_MS = 10


class _Config:
    def __init__(self):
        self._prefetch = _DEFAULT_PREFETCH
        self._seed: int | None = None
        self._monitor_ms = _DEFAULT_MONITOR_MS

    def set_monitor_sampling_interval(self, interval: int) -> None:
        """Milliseconds between two samples of the pipeline's queue depths while a profiler listens
        (``queue_sample`` events); default 10."""
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"config.set_monitor_sampling_interval: interval must be an integer >= 1 (ms), "
                             f"got {interval!r}")
        self._monitor_ms = interval

    def get_monitor_sampling_interval(self) -> int:
        return self._monitor_ms

    def set_prefetch_size(self, size: int) -> None:
        """Capacity of every connector queue between two ops (read when an iterator is created)."""
        size = int(size)
        if size < 1:
            raise ValueError(f"config.set_prefetch_size: size must be >= 1, got {size}")
        self._prefetch = size

    def get_prefetch_size(self) -> int:
        return self._prefetch

    def set_seed(self, seed: int | None) -> None:
        """Seed for shuffles that have no seed of their own. ``None`` (the default) follows the
        global seed of ``runtime.random`` (``context.set_context(seed=...)``)."""
        self._seed = None if seed is None else int(seed)

    def get_seed(self) -> int:
        return _random.get_seed() if self._seed is None else self._seed

    def reset(self) -> None:
        self._prefetch = _DEFAULT_PREFETCH
        self._seed = None
        self._monitor_ms = _DEFAULT_MONITOR_MS


config = _Config()
