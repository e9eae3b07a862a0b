"""Two runs side by side: step-breakdown averages and per-op-type time (HTA's trace diff)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from insight.analysis.ops import op_type_stats
from insight.analysis.steps import step_breakdown, summarize
from insight.trace import Run, as_run

SUMMARY_FIELDS = ("step_time_ms", "iteration_interval_ms", "fp_bp_ms", "tail_ms", "allreduce_ms",
                  "device_utilization", "input_share")


@dataclass
class RunComparison:
    a: str
    b: str
    steps: pd.DataFrame   # metric, a, b, diff (b - a), ratio (b / a)
    ops: pd.DataFrame     # op type: per-step time and calls in a and b, diff, status


def compare_runs(run_a: Run | str | os.PathLike, run_b: Run | str | os.PathLike, rel_tol: float = 0.05,
                 rank: int = 0) -> RunComparison:
    """Per op type the time is per recorded step (runs of different lengths compare); ``status`` is
    ``added`` (only in b), ``removed`` (only in a), ``faster`` / ``slower`` (by more than ``rel_tol``),
    else ``same``. Rows are ordered by the size of the change."""
    ra, rb = as_run(run_a), as_run(run_b)
    sa, sb = summarize(step_breakdown(ra, rank)), summarize(step_breakdown(rb, rank))
    rows = []
    for f in SUMMARY_FIELDS:
        va, vb = float(getattr(sa, f)), float(getattr(sb, f))
        rows.append({"metric": f, "a": va, "b": vb, "diff": vb - va, "ratio": vb / va if va else np.nan})
    steps = pd.DataFrame(rows)

    def per_step(run, s):
        t = op_type_stats(run, rank=rank)
        n = max(s.steps, 1)
        return pd.DataFrame({"op": t["op"], "ms_per_step": t["total_ms"] / n, "calls_per_step": t["calls"] / n})

    ta, tb = per_step(ra, sa), per_step(rb, sb)
    m = ta.merge(tb, on="op", how="outer", suffixes=("_a", "_b"), indicator=True)
    for c in ("ms_per_step_a", "ms_per_step_b", "calls_per_step_a", "calls_per_step_b"):
        m[c] = m[c].fillna(0.0)
    m["diff_ms"] = m["ms_per_step_b"] - m["ms_per_step_a"]
    m["ratio"] = np.where(m["ms_per_step_a"] > 0, m["ms_per_step_b"] / m["ms_per_step_a"].where(m["ms_per_step_a"] > 0),
                          np.nan)
    status = np.select(
        [m["_merge"] == "right_only", m["_merge"] == "left_only",
         m["diff_ms"] < -rel_tol * m["ms_per_step_a"], m["diff_ms"] > rel_tol * m["ms_per_step_a"]],
        ["added", "removed", "faster", "slower"], default="same")
    m["status"] = status
    m = m.drop(columns="_merge")
    m = m.reindex(m["diff_ms"].abs().sort_values(ascending=False, kind="stable").index).reset_index(drop=True)
    return RunComparison(ra.name, rb.name, steps, m)
