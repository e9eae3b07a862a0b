"""Two runs side by side: step-breakdown averages and per-op-type time (HTA's trace diff), with run-to-run noise.

Per op type, each run gives one sample per averaged step (the op type's summed time in that step; 0 when it did
not run). Run B's samples are first divided by the run-wide speed ratio ``run_factor`` (the median, over the op
types both runs have, of the ratio of their median per-step times): a machine busier during one run slows every
op type alike, and the step-time rows above already show that; an op type is flagged when it changed beyond
it. A difference then counts only when it is beyond noise: the Mann-Whitney U test of the two samples
(the normal approximation with tie correction, as scipy's; a permutation test for fewer than 8 steps) at ``ALPHA``, with a large effect (Vargha-Delaney
A = P(b > a) + P(b = a) / 2 at least ``LARGE_EFFECT`` or at most 1 - ``LARGE_EFFECT``), a 95 % interval of the
change of the median per step that excludes 0 (``ci_low_pct`` / ``ci_high_pct``, a seeded bootstrap over the
steps of each run), a change beyond ``rel_tol`` of the mean, and a median change (beyond ``run_factor``) outside
the run-to-run spread of all op types: more than ``SPREAD_K`` robust standard deviations (1.4826 x the median
absolute deviation of the op types' log changes) from no change.
Samples without any spread (synthetic traces) are exact: any difference counts. Two runs of the same seed
differ by machine noise only: their op types come out "same".
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from insight.analysis.ops import op_tasks, op_type_stats
from insight.analysis.steps import averaged_steps, step_breakdown, summarize
from insight.trace import Run, as_run

ALPHA = 0.01
LARGE_EFFECT = 0.71      # Vargha & Delaney's "large" effect size
BOOTSTRAP = 1000
SPREAD_K = 3.0           # an op type's change beyond the run factor must exceed 3 robust sigmas of all op types
SUMMARY_FIELDS = ("step_time_ms", "iteration_interval_ms", "fp_bp_ms", "tail_ms", "allreduce_ms",
                  "device_utilization", "input_share")


@dataclass
class RunComparison:
    a: str
    b: str
    steps: pd.DataFrame   # metric, a, b, diff (b - a), ratio (b / a)
    ops: pd.DataFrame     # op type: per-step time and calls in a and b, diff, diff_pct, p_value, effect,
    #                       ci_low_pct / ci_high_pct (of the change beyond run_factor), significant, status
    run_factor: float = 1.0  # run-wide speed ratio b / a the noise test takes out


def compare_runs(run_a: Run | str | os.PathLike, run_b: Run | str | os.PathLike, rel_tol: float = 0.05,
                 rank: int = 0) -> RunComparison:
    """Per op type the time is per recorded step (runs of different lengths compare); ``status`` is
    ``added`` (only in b), ``removed`` (only in a), ``faster`` / ``slower`` (by more than ``rel_tol`` and
    beyond run-to-run noise: ``significant``), else ``same``. Rows are ordered by the size of the change."""
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
    m["diff_pct"] = np.where(m["ms_per_step_a"] > 0, m["diff_ms"] / m["ms_per_step_a"].where(m["ms_per_step_a"] > 0)
                             * 100, np.nan)
    sa_, sb_ = step_samples(ra, rank), step_samples(rb, rank)
    factor = run_factor(sa_, sb_)
    noise = pd.DataFrame([_noise(sa_.get(op), None if op not in sb_ else sb_[op] / factor) for op in m["op"]],
                         index=m.index)
    m = pd.concat([m, noise], axis=1)
    # the run-to-run spread between op types: how far op types scatter around the run-wide change
    shift = np.log1p(m["median_change_pct"] / 100)
    spread = float(np.nanmedian(np.abs(shift - np.nanmedian(shift)))) if shift.notna().any() else 0.0
    m["beyond_spread"] = (np.abs(shift) > SPREAD_K * spread * 1.4826) | (spread == 0)
    m["significant"] = m["significant"] & m["beyond_spread"].fillna(False)
    m["significant"] = m["significant"] & (m["diff_ms"].abs() > rel_tol * m["ms_per_step_a"])
    beyond = m["significant"]
    status = np.select(
        [m["_merge"] == "right_only", m["_merge"] == "left_only", beyond & (m["diff_ms"] < 0),
         beyond & (m["diff_ms"] > 0)],
        ["added", "removed", "faster", "slower"], default="same")
    m["status"] = status
    m = m.drop(columns="_merge")
    m = m.reindex(m["diff_ms"].abs().sort_values(ascending=False, kind="stable").index).reset_index(drop=True)
    return RunComparison(ra.name, rb.name, steps, m, factor)


def step_samples(run: Run | str | os.PathLike, rank: int = 0) -> dict:
    """Per op type: its summed time (ms) in every averaged step (0 where it did not run)."""
    run = as_run(run)

    def build():
        steps = averaged_steps(step_breakdown(run, rank))["step"].to_numpy()
        t = op_tasks(run, rank=rank)
        t = t[t["step"].isin(steps)]
        per = (t.groupby(["op", "step"])["dur_ns"].sum() / 1e6).unstack("step", fill_value=0.0)
        per = per.reindex(columns=steps, fill_value=0.0)
        return {str(op): row.to_numpy(float) for op, row in per.iterrows()}

    return run.memo(("compare_step_samples", rank), build)


def run_factor(a: dict, b: dict) -> float:
    """The run-wide speed ratio b / a: the median over the op types both runs ran of the ratio of their
    median per-step times (1.0 when there is nothing to compare). One slowed op type does not move it."""
    ratios = []
    for op, x in a.items():
        y = b.get(op)
        if y is None or not len(x) or not len(y):
            continue
        mx, my = float(np.median(x)), float(np.median(y))
        if mx <= 0 or my <= 0:
            mx, my = float(np.mean(x)), float(np.mean(y))
        if mx > 0 and my > 0:
            ratios.append(my / mx)
    return float(np.median(ratios)) if ratios else 1.0


def _noise(a: np.ndarray | None, b: np.ndarray | None) -> dict:
    """Mann-Whitney p-value, Vargha-Delaney effect A = P(b > a), bootstrap 95 % interval of the change of the
    mean (%), and whether the difference is beyond noise."""
    out = {"p_value": np.nan, "effect": np.nan, "ci_low_pct": np.nan, "ci_high_pct": np.nan, "significant": False,
           "median_change_pct": np.nan,
           "samples_a": 0 if a is None else len(a), "samples_b": 0 if b is None else len(b)}
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return out
    ma, mb = float(np.median(a)), float(np.median(b))
    out["median_change_pct"] = (mb / ma - 1) * 100 if ma > 0 else np.nan
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # no step-to-step spread at all (a synthetic trace): exact
        same = a[0] == b[0]
        out.update(p_value=1.0 if same else 0.0, effect=0.5 if same else float(b[0] > a[0]),
                   ci_low_pct=(b[0] / a[0] - 1) * 100 if a[0] else np.nan,
                   ci_high_pct=(b[0] / a[0] - 1) * 100 if a[0] else np.nan, significant=not same)
        return out
    u, p = mann_whitney(a, b)
    effect = u / (len(a) * len(b))
    lo, hi = bootstrap_change(a, b)
    out.update(p_value=p, effect=effect, ci_low_pct=lo, ci_high_pct=hi,
               significant=bool(p < ALPHA and (effect >= LARGE_EFFECT or effect <= 1 - LARGE_EFFECT)
                                and (lo > 0 or hi < 0)))
    return out


def mann_whitney(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """U of b against a (b's count of wins, ties a half) and the two-sided p-value: the normal approximation
    with tie and continuity corrections (scipy.stats.mannwhitneyu's "asymptotic" method, without importing
    scipy: that alone takes a second) for samples of 8 or more, else a seeded permutation test."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    n1, n2 = len(a), len(b)
    if np.ptp(np.concatenate([a, b])) == 0:
        return n1 * n2 / 2, 1.0
    u = _u(a, b)
    centre = n1 * n2 / 2
    if min(n1, n2) >= 8:
        _, counts = np.unique(np.concatenate([a, b]), return_counts=True)
        n = n1 + n2
        var = n1 * n2 / 12 * ((n + 1) - float((counts ** 3 - counts).sum()) / (n * (n - 1)))
        if var <= 0:
            return u, 1.0
        z = (abs(u - centre) - 0.5) / math.sqrt(var)
        return u, float(min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2))))
    rng = np.random.default_rng(0)
    both = np.concatenate([a, b])
    far = 0
    for _ in range(BOOTSTRAP):
        rng.shuffle(both)
        far += abs(_u(both[:n1], both[n1:]) - centre) >= abs(u - centre)
    return u, (far + 1) / (BOOTSTRAP + 1)


def _u(a: np.ndarray, b: np.ndarray) -> float:
    ranks = pd.Series(np.concatenate([a, b])).rank().to_numpy()
    return float(ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2)


def bootstrap_change(a: np.ndarray, b: np.ndarray, n: int = BOOTSTRAP) -> tuple[float, float]:
    """95 % interval of (median b / median a - 1) * 100 by resampling the steps of each run (seeded). Medians,
    as the rank test: a few outlier steps (a busy machine) do not swing it."""
    rng = np.random.default_rng(0)
    ma = np.median(rng.choice(a, (n, len(a))), axis=1)
    mb = np.median(rng.choice(b, (n, len(b))), axis=1)
    ok = ma > 0
    if not ok.any():
        return float("nan"), float("nan")
    ch = (mb[ok] / ma[ok] - 1) * 100
    return float(np.percentile(ch, 2.5)), float(np.percentile(ch, 97.5))
