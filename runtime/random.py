"""Seeded random streams. Every consumer (an initializer, a Dropout cell) draws from its own
generator derived from the global seed and a stable key, so results do not depend on the order
in which unrelated objects were created."""
from __future__ import annotations

import zlib

import numpy as np

_global_seed = 0
_counter = 0


def set_seed(seed: int) -> None:
    global _global_seed, _counter
    _global_seed = int(seed)
    _counter = 0


def get_seed() -> int:
    return _global_seed


def next_seed() -> int:
    """A fresh per-object seed; deterministic for a given global seed and creation order."""
    global _counter
    _counter += 1
    return (_global_seed * 1_000_003 + _counter) & 0x7FFFFFFF


def generator(seed: int | None = None, key: str = "") -> np.random.Generator:
    s = next_seed() if seed is None else int(seed)
    return np.random.default_rng([s, zlib.crc32(key.encode())])
