"""Device memory: the in-use curve and what was alive at the peak (MindInsight / XProf memory views)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from insight.trace import NS_PER_MS, Run, as_run, capacity_bytes, read

MEM_COLUMNS = {"t_ns": -1, "action": "", "device": "device", "kind": "", "tensor": "", "op": "", "scope": "",
               "size": 0, "offset": -1, "in_use": 0, "capacity": -1, "step": -1, "shape": "", "dtype": ""}
DISPLAY_POINTS = 2000


def _events(run: Run, device: str, rank: int) -> pd.DataFrame:
    return run.memo(("memory_events", device, rank), lambda: _read_events(run, device, rank))


def _read_events(run: Run, device: str, rank: int) -> pd.DataFrame:
    m = read(run, "memory", MEM_COLUMNS, required=("t_ns", "action", "size", "in_use"), rank=rank)
    m = m[m["device"] == device]
    return m.sort_values("t_ns", kind="stable").reset_index(drop=True)


def memory_timeline(run: Run | str | os.PathLike, max_points: int = DISPLAY_POINTS, device: str = "device",
                    rank: int = 0) -> pd.DataFrame:
    """``t_ns, t_ms, in_use, in_use_mb, step, action`` in time order, downsampled to about
    ``max_points`` rows by keeping the lowest and highest point of each bucket -- so the peak (and every
    bucket's extremes) survive exactly."""
    m = _events(as_run(run), device, rank)
    return downsample(m, max_points)[["t_ns", "t_ms", "in_use", "in_use_mb", "step", "action"]]


def downsample(m: pd.DataFrame, max_points: int = DISPLAY_POINTS) -> pd.DataFrame:
    m = m.assign(t_ms=m["t_ns"] / NS_PER_MS, in_use_mb=m["in_use"] / 2**20)
    n = len(m)
    if n <= max_points:
        return m.reset_index(drop=True)
    buckets = max(1, max_points // 2)
    b = np.arange(n) * buckets // n
    v = m["in_use"].to_numpy()
    g = pd.Series(v).groupby(b)
    keep = np.unique(np.concatenate([g.idxmax().to_numpy(), g.idxmin().to_numpy(), [0, n - 1]]))
    return m.iloc[keep].reset_index(drop=True)


@dataclass
class MemoryPeak:
    peak_bytes: int = 0
    t_ns: int | None = None
    step: int | None = None
    capacity: int = 0
    share_of_capacity: float = float("nan")
    fragmentation: float | None = None   # 1 - largest free block / total free, when every live block is known
    allocations: int = 0
    frees: int = 0
    live: pd.DataFrame = field(default_factory=pd.DataFrame)  # tensors alive at the peak, largest first

    @property
    def live_bytes(self) -> int:
        return int(self.live["size"].sum()) if len(self.live) else 0

    @property
    def untracked_bytes(self) -> int:
        """In use at the peak but allocated before recording began (e.g. parameters placed earlier)."""
        return max(0, self.peak_bytes - self.live_bytes)


def memory_peak(run: Run | str | os.PathLike, device: str = "device", rank: int = 0) -> MemoryPeak:
    run = as_run(run)
    return run.memo(("memory_peak", device, rank), lambda: _memory_peak(run, device, rank))


def _memory_peak(run: Run, device: str, rank: int) -> MemoryPeak:
    m = _events(run, device, rank)
    cap = int(m["capacity"].max()) if len(m) and m["capacity"].max() > 0 else capacity_bytes(run)
    live_cols = ["name", "op", "kind", "size", "shape", "dtype", "scope", "offset", "allocated_ns", "step"]
    if m.empty:
        return MemoryPeak(capacity=cap, live=pd.DataFrame({c: [] for c in live_cols}))
    i = int(m["in_use"].to_numpy().argmax())   # the first time the peak is reached
    row = m.iloc[i]
    upto = m.iloc[: i + 1]
    key = upto["tensor"].where(upto["tensor"] != "", "@" + upto["offset"].astype(str))
    alloc = upto["action"] == "alloc"
    free = upto["action"] == "free"
    balance = alloc.astype(int).groupby(key).sum() - free.astype(int).groupby(key).sum()
    alive = balance[balance > 0]
    a = upto[alloc].assign(key=key[alloc])
    a = a[a["key"].isin(alive.index)]
    # the last ``balance`` allocations of each key are the live ones
    a = a.assign(rank=a.groupby("key").cumcount(ascending=False))
    a = a[a["rank"] < a["key"].map(alive)]
    live = pd.DataFrame({"name": a["tensor"], "op": a["op"], "kind": a["kind"], "size": a["size"], "shape": a["shape"],
                         "dtype": a["dtype"], "scope": a["scope"], "offset": a["offset"], "allocated_ns": a["t_ns"],
                         "step": a["step"]}).sort_values("size", ascending=False, kind="stable").reset_index(drop=True)
    peak = int(row["in_use"])
    # holes are only known to be free when every byte in use is a block we saw allocated
    known = int(live["size"].sum()) >= peak
    return MemoryPeak(peak_bytes=peak, t_ns=int(row["t_ns"]), step=int(row["step"]), capacity=cap,
                      share_of_capacity=peak / cap if cap > 0 else float("nan"),
                      fragmentation=_fragmentation(live, cap) if known else None,
                      allocations=int((m["action"] == "alloc").sum()),
                      frees=int((m["action"] == "free").sum()), live=live)


def _fragmentation(live: pd.DataFrame, cap: int) -> float | None:
    """XProf's fragmentation at the peak from the live blocks' offsets; None when any offset is unknown."""
    if cap <= 0 or live.empty or (live["offset"] < 0).any():
        return None
    iv = live[["offset", "size"]].sort_values("offset").to_numpy()
    largest, free, cursor = 0, 0, 0
    for off, size in iv:  # union of the (possibly nested) live intervals, and the holes between them
        if off > cursor:
            largest = max(largest, off - cursor)
            free += off - cursor
        cursor = max(cursor, off + size)
    if cap > cursor:
        largest = max(largest, cap - cursor)
        free += cap - cursor
    return 0.0 if free <= 0 else float(1 - largest / free)
