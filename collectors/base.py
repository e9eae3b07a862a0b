"""What every collector looks like to the Profiler and the writer.

A collector declares the tables it writes, the hook events it wants (``handlers``: time-series events,
dropped by the Profiler outside recorded steps; ``static_handlers``: structural events such as a
graph's task table, always taken), and ``drain(t0, final)``: the rows collected since the last drain
as Arrow tables (called from the writer thread only).
"""
from __future__ import annotations

from typing import Callable

import pyarrow as pa

Handler = Callable[[dict], None]


class Collector:
    tables: tuple[str, ...] = ()

    def handlers(self) -> dict[str, Handler]:
        return {}

    def static_handlers(self) -> dict[str, Handler]:
        return {}

    def drain(self, t0: int, final: bool = False) -> dict[str, pa.Table]:
        return {}


def take_all(lst: list) -> list:
    """Remove and return the items of a list other threads append to (slice + del are atomic under the GIL,
    and items appended meanwhile stay for the next drain)."""
    n = len(lst)
    items = lst[:n]
    del lst[:n]
    return items


def as_int(v, missing: int = -1) -> int:
    return missing if v is None else int(v)


def as_str(v) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, (tuple, list)):  # a shape given as a tuple
        return "x".join(map(str, v))
    return str(v)
