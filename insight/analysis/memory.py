"""Device memory: the in-use curve, usage by kind and what was alive at the peak (MindInsight / XProf
memory views).

The ``memory`` table holds two sources of rows (docs/trace-format.md):

* ``planned`` -- the static memory plan's activation liveness replayed at the measured task times
  (MindSpore's graph-mode model); ``in_use`` = the graph's parameter bytes + the live planned activations.
  Runs written before the ``source`` column existed are all planned.
* ``pool`` -- the device MemoryPool's real allocations and frees: ``parameter``, ``activation_reserve``
  (the block holding a step's planned activations), ``workspace``, ``queue`` (data-sink batches),
  ``kernel_pool`` (fused kernels' buffers); ``in_use`` = the pool's bytes in use.

The two are never added: the planned activations live inside the pool's activation reserve. Every
function takes ``source``: None means the pool when the run has pool rows (what the device really
held), else the planned rows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from insight.trace import NS_PER_MS, Run, as_run, capacity_bytes, read

MEM_COLUMNS = {"t_ns": -1, "action": "", "device": "device", "kind": "", "tensor": "", "op": "", "scope": "",
               "size": 0, "offset": -1, "in_use": 0, "capacity": -1, "step": -1, "shape": "", "dtype": "",
               "source": ""}
DISPLAY_POINTS = 2000
SOURCES = ("pool", "planned")
KINDS = ("parameter", "activation", "activation_reserve", "workspace", "queue", "kernel_pool")
UNTRACKED = "untracked"  # in use with no recorded block (e.g. parameters placed before recording)


def _all_events(run: Run, device: str, rank: int) -> pd.DataFrame:
    def build():
        m = read(run, "memory", MEM_COLUMNS, required=("t_ns", "action", "size", "in_use"), rank=rank)
        m = m[m["device"] == device]
        m = m.assign(source=m["source"].where(m["source"] != "", "planned"))
        return m.sort_values("t_ns", kind="stable").reset_index(drop=True)

    return run.memo(("memory_events", device, rank), build)


def memory_sources(run: Run | str | os.PathLike, device: str = "device", rank: int = 0) -> list[str]:
    """The sources of the run's memory rows, the pool first."""
    m = _all_events(as_run(run), device, rank)
    present = set(m["source"].unique())
    return [s for s in SOURCES if s in present] + sorted(present - set(SOURCES))


def default_source(run: Run, device: str = "device", rank: int = 0) -> str:
    """The pool when the run recorded pool events (what the device really held), else the plan."""
    src = memory_sources(run, device, rank)
    return src[0] if src else "planned"


def _events(run: Run, device: str, rank: int, source: str | None = None) -> pd.DataFrame:
    source = source or default_source(run, device, rank)

    def build():
        m = _all_events(run, device, rank)
        return m[m["source"] == source].reset_index(drop=True)

    return run.memo(("memory_source_events", device, rank, source), build)


def memory_timeline(run: Run | str | os.PathLike, max_points: int = DISPLAY_POINTS, device: str = "device",
                    rank: int = 0, source: str | None = None) -> pd.DataFrame:
    """``t_ns, t_ms, in_use, in_use_mb, step, action`` of one source in time order, downsampled to about
    ``max_points`` rows by keeping the lowest and highest point of each bucket -- so the peak (and every
    bucket's extremes) survive exactly."""
    m = _events(as_run(run), device, rank, source)
    return downsample(m, max_points)[["t_ns", "t_ms", "in_use", "in_use_mb", "step", "action"]]


def downsample(m: pd.DataFrame, max_points: int = DISPLAY_POINTS, by: str = "in_use") -> pd.DataFrame:
    m = m.assign(t_ms=m["t_ns"] / NS_PER_MS, in_use_mb=m["in_use"] / 2**20) if "in_use" in m else \
        m.assign(t_ms=m["t_ns"] / NS_PER_MS)
    n = len(m)
    if n <= max_points:
        return m.reset_index(drop=True)
    buckets = max(1, max_points // 2)
    b = np.arange(n) * buckets // n
    v = m[by].to_numpy()
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
    source: str = "planned"              # which rows: "pool" (the real pool) or "planned" (the plan's liveness)

    @property
    def live_bytes(self) -> int:
        return int(self.live["size"].sum()) if len(self.live) else 0

    @property
    def untracked_bytes(self) -> int:
        """In use at the peak but allocated before recording began (e.g. parameters placed earlier)."""
        return max(0, self.peak_bytes - self.live_bytes)


def memory_peak(run: Run | str | os.PathLike, device: str = "device", rank: int = 0,
                source: str | None = None) -> MemoryPeak:
    """The first time the source's ``in_use`` is highest and the blocks alive then (see the module docstring
    for ``source``)."""
    run = as_run(run)
    source = source or default_source(run, device, rank)
    return run.memo(("memory_peak", device, rank, source), lambda: _memory_peak(run, device, rank, source))


def _memory_peak(run: Run, device: str, rank: int, source: str) -> MemoryPeak:
    m = _events(run, device, rank, source)
    cap = int(m["capacity"].max()) if len(m) and m["capacity"].max() > 0 else capacity_bytes(run)
    live_cols = ["name", "op", "kind", "size", "shape", "dtype", "scope", "offset", "allocated_ns", "step"]
    if m.empty:
        return MemoryPeak(capacity=cap, live=pd.DataFrame({c: [] for c in live_cols}), source=source)
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
    step = int(row["step"])
    if step < 0:  # pool events carry no step: the step whose time range holds the peak
        step = _step_at(run, rank, int(row["t_ns"]), step)
    return MemoryPeak(peak_bytes=peak, t_ns=int(row["t_ns"]), step=step, capacity=cap, source=source,
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


def _step_at(run: Run, rank: int, t_ns: int, default: int) -> int:
    from insight.analysis.steps import step_times

    st = step_times(run, rank)
    hit = st[(st["start_ns"] <= t_ns) & (t_ns < st["end_ns"])]
    return int(hit["step"].iloc[0]) if len(hit) else default


def memory_usage(run: Run | str | os.PathLike, source: str | None = None, device: str = "device", rank: int = 0,
                 max_points: int = DISPLAY_POINTS) -> pd.DataFrame:
    """Bytes in use by kind after every event of one source: ``t_ns, t_ms``, one column per kind present
    (in ``KINDS`` order, then others), ``untracked`` (``in_use`` beyond the recorded blocks: blocks allocated
    before recording, alignment) and ``in_use``; downsampled like ``memory_timeline`` (extremes of
    ``in_use`` kept). Stacked, the kind columns and ``untracked`` add up to ``in_use``."""
    run = as_run(run)
    m = _events(run, device, rank, source)
    if m.empty:
        return pd.DataFrame({c: pd.Series([], dtype=float) for c in ("t_ns", "t_ms", UNTRACKED, "in_use")})
    kinds = [k for k in KINDS if k in set(m["kind"])] + sorted(set(m["kind"]) - set(KINDS) - {""})
    kind = m["kind"].where(m["kind"] != "", "other")
    if (kind == "other").any() and "other" not in kinds:
        kinds.append("other")
    sign = np.where(m["action"] == "alloc", 1, np.where(m["action"] == "free", -1, 0))
    delta = m["size"].to_numpy(np.int64) * sign
    out = pd.DataFrame({"t_ns": m["t_ns"].to_numpy()})
    tracked = np.zeros(len(m), np.int64)
    for k in kinds:
        col = np.cumsum(np.where(kind.to_numpy() == k, delta, 0)).clip(min=0)
        out[k] = col
        tracked += col
    out[UNTRACKED] = (m["in_use"].to_numpy(np.int64) - tracked).clip(min=0)
    out["in_use"] = m["in_use"].to_numpy(np.int64)
    return downsample(out, max_points)[["t_ns", "t_ms", *kinds, UNTRACKED, "in_use"]]


@dataclass
class Lifetimes:
    """Every allocation of one source with its lifetime (``intervals``: ``name, op, kind, size, shape, dtype,
    scope, offset, step, alloc_ns, free_ns``, ``free_ns`` = -1 when never freed) and the exact in-use curve
    (``t_ns``, ``in_use`` of every event)."""
    intervals: pd.DataFrame
    t_ns: np.ndarray
    in_use: np.ndarray
    source: str = "planned"


def memory_intervals(run: Run | str | os.PathLike, device: str = "device", rank: int = 0,
                     source: str | None = None) -> Lifetimes:
    """The allocations of ``device`` memory and their lifetimes, from the run's memory events.

    A tensor's allocations and frees pair up in order (the n-th free of a name ends its n-th allocation);
    tensors without a name are keyed by offset, as ``memory_peak`` does."""
    run = as_run(run)
    source = source or default_source(run, device, rank)
    m = _events(run, device, rank, source)
    key = m["tensor"].where(m["tensor"] != "", "@" + m["offset"].astype(str))
    m = m.assign(key=key)
    a = m[m["action"] == "alloc"].copy()
    f = m[m["action"] == "free"].copy()
    a["n"] = a.groupby("key").cumcount()
    f["n"] = f.groupby("key").cumcount()
    ends = f[["key", "n", "t_ns"]].rename(columns={"t_ns": "free_ns"})
    out = a.merge(ends, on=["key", "n"], how="left")
    out["free_ns"] = out["free_ns"].fillna(-1).astype(np.int64)
    out = out.rename(columns={"tensor": "name", "t_ns": "alloc_ns"})
    out = out[["name", "op", "kind", "size", "shape", "dtype", "scope", "offset", "step", "alloc_ns", "free_ns"]]
    return Lifetimes(out, m["t_ns"].to_numpy(), m["in_use"].to_numpy(), source)


def live_at(lt: Lifetimes, t_ns: int) -> pd.DataFrame:
    """The allocations alive at ``t_ns``: allocated at or before it and not freed by then, largest first."""
    iv = lt.intervals
    alive = (iv["alloc_ns"] <= t_ns) & ((iv["free_ns"] < 0) | (iv["free_ns"] > t_ns))
    return iv[alive].sort_values(["size", "alloc_ns"], ascending=[False, True], kind="stable").reset_index(drop=True)


def in_use_at(lt: Lifetimes, t_ns: int) -> int | None:
    """Device bytes in use after the last event at or before ``t_ns`` (parameters included)."""
    i = int(np.searchsorted(lt.t_ns, t_ns, side="right")) - 1
    return int(lt.in_use[i]) if i >= 0 else None


def event_at_or_before(lt: Lifetimes, t_ns: int) -> int | None:
    """The time of the last memory event at or before ``t_ns`` (what the step-shaped curve shows there);
    None before the first event."""
    i = int(np.searchsorted(lt.t_ns, t_ns, side="right")) - 1
    return int(lt.t_ns[i]) if i >= 0 else None


def step_peaks(lt: Lifetimes, steps: pd.DataFrame) -> pd.DataFrame:
    """Per step of ``steps`` (a step breakdown: ``step, start_ns, end_ns``): the peak bytes in use inside it
    (the level carried in from before the step counts), when it was reached and the step's bounds."""
    t, use = np.asarray(lt.t_ns, np.int64), np.asarray(lt.in_use, np.int64)
    rows = []
    for s, a, b in zip(steps["step"].to_numpy(), steps["start_ns"].to_numpy(), steps["end_ns"].to_numpy()):
        i0 = int(np.searchsorted(t, a, side="right")) - 1  # the level at the step's start
        i1 = int(np.searchsorted(t, b, side="right"))
        lo = max(i0, 0)
        if i1 <= lo and i0 < 0:
            rows.append((int(s), 0, -1, int(a), int(b)))
            continue
        j = lo + int(np.argmax(use[lo:i1])) if i1 > lo else lo
        rows.append((int(s), int(use[j]), int(max(t[j], a)), int(a), int(b)))
    out = pd.DataFrame(rows, columns=["step", "peak_bytes", "t_ns", "start_ns", "end_ns"])
    out["peak_mb"] = out["peak_bytes"] / 2 ** 20
    return out
