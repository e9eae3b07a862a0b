"""Operator performance: per op (name) and per op type, MindInsight/torch ``key_averages``-style.

By default every task except the event record/wait markers counts (kernels, copies, GetNext); pass
``kinds=("kernel",)`` for kernels only. The table's ``total_ms`` sums to the summed durations of those
tasks and ``share`` sums to 1.
"""
from __future__ import annotations

import os

import numpy as np
import pandas as pd

from insight.trace import NS_PER_MS, Run, as_run, read, task_columns

OP_COLUMNS = task_columns("step", "graph", "task_id", "name", "op", "kind", "stream", "scope", "start_ns", "end_ns",
                          "flops", "shape", "dtype", "fused_ops")
SYNC_KINDS = ("event_record", "event_wait")
MAX_LISTED = 6  # distinct shapes / dtypes / scopes listed in one cell


def op_tasks(run: Run | str | os.PathLike, kinds=None, graph: str | None = None, rank: int = 0) -> pd.DataFrame:
    """The task rows the op tables aggregate, with ``dur_ns`` (= end_ns - start_ns)."""
    run = as_run(run)
    kinds = None if kinds is None else tuple(kinds)
    return run.memo(("op_tasks", kinds, graph, rank), lambda: _op_tasks(run, kinds, graph, rank))


def _op_tasks(run: Run, kinds, graph, rank) -> pd.DataFrame:
    t = read(run, "tasks", OP_COLUMNS, required=("name", "op", "start_ns", "end_ns"), rank=rank)
    keep = ~t["kind"].isin(SYNC_KINDS) if kinds is None else t["kind"].isin(kinds)
    if graph is not None:
        keep &= t["graph"] == graph
    t = t[keep].copy()
    t["dur_ns"] = t["end_ns"] - t["start_ns"]
    return t


def _join_unique(s: pd.Series) -> str:
    vals = [v for v in dict.fromkeys(s) if v != ""]
    more = len(vals) - MAX_LISTED
    return ";".join(vals[:MAX_LISTED]) + (f";(+{more} more)" if more > 0 else "")


def _aggregate(t: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    if t.empty:
        cols = keys + ["calls", "total_ms", "avg_ms", "min_ms", "max_ms", "share", "flops", "flops_per_call",
                       "flop_per_s", "shapes", "dtypes", "stream", "scope", "fused_ops"]
        return pd.DataFrame({c: pd.Series([], dtype=object) for c in cols})
    g = t.groupby(keys, sort=False, dropna=False)
    flops = t["flops"].clip(lower=0)
    out = pd.DataFrame({
        "calls": g.size(),
        "total_ns": g["dur_ns"].sum(),
        "min_ns": g["dur_ns"].min(),
        "max_ns": g["dur_ns"].max(),
        "flops": flops.groupby([t[k] for k in keys], sort=False, dropna=False).sum(),
    })
    for c, col in (("shapes", "shape"), ("dtypes", "dtype"), ("stream", "stream"), ("scope", "scope"),
                   ("fused_ops", "fused_ops")):
        u = t[keys + [col]].drop_duplicates()
        out[c] = u.groupby(keys, sort=False, dropna=False)[col].agg(_join_unique)
    out = out.reset_index()
    total = out["total_ns"].sum()
    out["total_ms"] = out["total_ns"] / NS_PER_MS
    out["avg_ms"] = out["total_ms"] / out["calls"]
    out["min_ms"] = out["min_ns"] / NS_PER_MS
    out["max_ms"] = out["max_ns"] / NS_PER_MS
    out["share"] = out["total_ns"] / total if total > 0 else 0.0
    out["flops_per_call"] = out["flops"] / out["calls"]
    out["flop_per_s"] = np.where(out["total_ns"] > 0, out["flops"] / (out["total_ns"].clip(lower=1) / 1e9), 0.0)
    out = out.sort_values(["total_ns"] + keys, ascending=[False] + [True] * len(keys), kind="stable")
    cols = keys + ["calls", "total_ms", "avg_ms", "min_ms", "max_ms", "share", "flops", "flops_per_call",
                   "flop_per_s", "shapes", "dtypes", "stream", "scope", "fused_ops", "total_ns"]
    return out[cols].reset_index(drop=True)


def op_stats(run: Run | str | os.PathLike, kinds=None, graph: str | None = None, rank: int = 0) -> pd.DataFrame:
    """Per op (graph, name): op type, calls, total/avg/min/max ms, share, FLOPs, achieved FLOP/s, shapes,
    dtypes, stream, scope, fused_ops; sorted by total time, largest first. FLOPs are the cost model's
    estimates from shapes, so ``flop_per_s`` is an estimated rate."""
    run = as_run(run)
    kinds = None if kinds is None else tuple(kinds)
    return run.memo(("op_stats", kinds, graph, rank), lambda: _op_stats(run, kinds, graph, rank))


def _op_stats(run: Run, kinds, graph, rank) -> pd.DataFrame:
    t = op_tasks(run, kinds, graph, rank)
    # an op's name is unique in its graph, so op type and kind come along with the key
    out = _aggregate(t, ["graph", "name"])
    if len(out):
        first = t.drop_duplicates(["graph", "name"]).set_index(["graph", "name"])
        idx = pd.MultiIndex.from_frame(out[["graph", "name"]])
        out.insert(2, "op", first["op"].reindex(idx).to_numpy())
        out.insert(3, "kind", first["kind"].reindex(idx).to_numpy())
    else:
        out.insert(2, "op", pd.Series([], dtype=str))
        out.insert(3, "kind", pd.Series([], dtype=str))
    return out


def op_type_stats(run: Run | str | os.PathLike, kinds=None, graph: str | None = None, rank: int = 0) -> pd.DataFrame:
    """Per op type: the same columns as ``op_stats`` plus ``ops`` (distinct op names of the type)."""
    run = as_run(run)
    kinds = None if kinds is None else tuple(kinds)
    return run.memo(("op_type_stats", kinds, graph, rank), lambda: _op_type_stats(run, kinds, graph, rank))


def _op_type_stats(run: Run, kinds, graph, rank) -> pd.DataFrame:
    t = op_tasks(run, kinds, graph, rank)
    out = _aggregate(t, ["op"])
    names = t.groupby("op")["name"].nunique() if len(t) else pd.Series(dtype=np.int64)
    out.insert(1, "ops", out["op"].map(names).fillna(0).astype(np.int64) if len(out) else pd.Series([], dtype=np.int64))
    return out


def op_time_per_step(run: Run | str | os.PathLike, name: str, by: str = "name", rank: int = 0) -> pd.DataFrame:
    """Calls and time of one op (``by="name"``) or op type (``by="op"``) in every step."""
    if by not in ("name", "op"):
        raise ValueError(f"op_time_per_step: by must be 'name' or 'op', got {by!r}")
    t = op_tasks(run, rank=rank)
    t = t[t[by] == name]
    g = t.groupby("step")
    out = pd.DataFrame({"calls": g.size(), "total_ns": g["dur_ns"].sum()}).reset_index()
    out["total_ms"] = out["total_ns"] / NS_PER_MS
    out["avg_ms"] = out["total_ms"] / out["calls"].clip(lower=1)
    return out[["step", "calls", "total_ms", "avg_ms", "total_ns"]]


def top_n(table: pd.DataFrame, n: int = 20, by: str = "total_ms", other: bool = False,
          label_column: str | None = None) -> pd.DataFrame:
    """The ``n`` largest rows by ``by``; with ``other=True`` the rest folded into one ``(other)`` row
    (summing calls/total/share), so a pie of the result still adds up to the whole."""
    ranked = table.sort_values(by, ascending=False, kind="stable")
    head = ranked.head(n)
    if not other or len(ranked) <= n:
        return head.reset_index(drop=True)
    rest = ranked.iloc[n:]
    row = {c: None for c in table.columns}
    label = label_column or next((c for c in ("name", "op") if c in table.columns), table.columns[0])
    row[label] = "(other)"
    for c in ("calls", "total_ms", "share", "flops", "total_ns"):
        if c in table.columns:
            row[c] = rest[c].sum()
    if "calls" in table.columns and "total_ms" in table.columns:
        row["avg_ms"] = row["total_ms"] / max(row["calls"], 1)
    return pd.concat([head, pd.DataFrame([row])], ignore_index=True)
