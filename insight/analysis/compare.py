"""Two runs side by side: step-breakdown averages and per-op-type time (HTA's trace diff), with run-to-run noise.

Per op type, each run gives one sample per averaged step (the op type's summed time in that step; 0 when it did
not run): step 0 (warm-up) and tasks outside any step are left out of everything here -- the time and calls per
step shown (``ms_per_step_*``, ``calls_per_step_*``, ``diff_ms``, ``diff_pct``) and the noise test use the same
steps, those the step-breakdown averages use.

Why a rerun is not a copy: on a shared machine other processes take the cores for a while, and every op that
runs then takes longer. That noise only ever ADDS time and it hits op types unequally (a compute-bound GEMM
sharing its core loses more than a tiny op dominated by Python overhead), so two runs of the same seed trained a
minute apart differ by 30-100 % in the median per-step time of some op type (measured: 55 pairs of 11 same-seed
``insight demo`` runs on this project's shared 2-core machine at load 1-6), while their LOWER QUARTILES -- what
the op takes when nothing interferes -- move less (point estimates within +74 / -46 %, the largest between a run
on a quiet machine and one at load 5). So the noise test compares lower quartiles (``QUANTILE``):

* ``run_factor``: the run-wide speed ratio B / A (median over the op types both runs ran of the ratio of their
  lower quartiles) is taken out first: B's samples are divided by it (a slower machine slows every op type);
* an op type is ``significant`` -- beyond run-to-run noise -- when all three hold:
  1. statistically: the Mann-Whitney U test of A's and B's per-step samples at ``ALPHA`` (0.01);
  2. a large effect: the seeded bootstrap 95 % interval of the lower-quartile change (``ci_low_pct`` ..
     ``ci_high_pct``) lies entirely beyond the pair's ``noise_ratio``: ``MIN_RATIO`` (1.4x slower, or 1/1.4
     faster), widened for a noisy pair to ``SPREAD_K`` (3) robust standard deviations of how all op types'
     lower quartiles moved (1.4826 x the median absolute deviation of their log changes: two runs on a busy
     machine scatter every op type, and then one op type's 1.5x says little). On those 55 pairs no op type was
     flagged (the robust deviation was 0.09 in the median pair, 0.22 at most; 1.4x alone still flagged conv2d
     twice, a quiet-machine run against a busy one), while a 2x slowdown of the top kernel op type was flagged
     in 6 of 6 runs (intervals from +40..199 % to +68..155 %). On a noisier day of the same VM (per-step conv2d
     times with a robust CV of 0.6-1.0) a doubled conv2d in 44-step runs was missed 4 times in 4 (intervals down
     to +21..234 %), found with 88 steps -- where two same-seed runs were then flagged now and then (2 of 16): the
     rule trades power on short runs for few false alarms, and its power grows with the steps compared;
  3. practically: the op type's mean time per step moves by at least ``MIN_STEP_SHARE`` (1 %) of run A's
     average step (a few microseconds of a tiny op do not change a step, however significant).
* Samples without any step-to-step spread (synthetic traces) are exact: any change beyond ``rel_tol`` counts.

``status``: ``added`` (only in B), ``removed`` (only in A), ``faster`` / ``slower`` (significant), else ``same``.
The Vargha-Delaney effect A = P(b > a) + P(b = a) / 2 is reported beside (``effect``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from insight.analysis.ops import op_tasks
from insight.analysis.steps import averaged_steps, step_breakdown, summarize
from insight.trace import Run, as_run

ALPHA = 0.01
QUANTILE = 0.25          # the lower quartile of the per-step times: the op's time when the machine leaves it alone
MIN_RATIO = 1.4          # the lower quartile's 95 % interval must lie beyond 1.4x (or below 1/1.4) ...
MIN_STEP_SHARE = 0.01    # ... and the mean per step move by 1 % of run A's step time
SPREAD_K = 3.0           # a noisy pair widens 1.4x to 3 robust sigmas of all op types' log lower-quartile changes
BOOTSTRAP = 1000
SUMMARY_FIELDS = ("step_time_ms", "iteration_interval_ms", "fp_bp_ms", "tail_ms", "allreduce_ms",
                  "device_utilization", "input_share")


@dataclass
class RunComparison:
    a: str
    b: str
    steps: pd.DataFrame   # metric, a, b, diff (b - a), ratio (b / a)
    ops: pd.DataFrame     # op type: per-step time and calls in a and b (averaged steps), diff, diff_pct, p_value,
    #                       effect, q_change_pct and its interval ci_low_pct / ci_high_pct (beyond run_factor),
    #                       significant, status
    run_factor: float = 1.0  # run-wide speed ratio b / a the noise test takes out
    noise_ratio: float = MIN_RATIO  # a lower quartile's interval must lie beyond this ratio (or its inverse)


def compare_runs(run_a: Run | str | os.PathLike, run_b: Run | str | os.PathLike, rel_tol: float = 0.05,
                 rank: int = 0) -> RunComparison:
    """Per op type the time and calls are per averaged step (step 0 and tasks outside steps excluded; runs of
    different lengths compare); see the module docstring for ``significant`` and ``status``. Rows are ordered by
    the size of the change."""
    ra, rb = as_run(run_a), as_run(run_b)
    sa, sb = summarize(step_breakdown(ra, rank)), summarize(step_breakdown(rb, rank))
    rows = []
    for f in SUMMARY_FIELDS:
        va, vb = float(getattr(sa, f)), float(getattr(sb, f))
        rows.append({"metric": f, "a": va, "b": vb, "diff": vb - va, "ratio": vb / va if va else np.nan})
    steps = pd.DataFrame(rows)

    ta, tb = _per_step(ra, rank), _per_step(rb, rank)
    m = ta["table"].merge(tb["table"], on="op", how="outer", suffixes=("_a", "_b"), indicator=True)
    for c in ("ms_per_step_a", "ms_per_step_b", "calls_per_step_a", "calls_per_step_b"):
        m[c] = m[c].astype(float).fillna(0.0)
    m["diff_ms"] = m["ms_per_step_b"] - m["ms_per_step_a"]
    base = m["ms_per_step_a"].where(m["ms_per_step_a"] > 0)
    m["ratio"] = m["ms_per_step_b"] / base
    m["diff_pct"] = m["diff_ms"] / base * 100
    xa, xb = ta["samples"], tb["samples"]
    factor = run_factor(xa, xb)
    noise = pd.DataFrame([_noise(xa.get(op), None if op not in xb else xb[op] / factor, rel_tol) for op in m["op"]],
                         index=m.index, columns=list(_noise(None, None)))
    m = pd.concat([m, noise], axis=1)
    # the pair's noise: how far all op types' lower quartiles scattered (beyond the run factor)
    moves = np.log1p(m.loc[~m["exact"].astype(bool), "q_change_pct"].astype(float) / 100)
    moves = moves[np.isfinite(moves)]
    sigma = 1.4826 * float(np.median(np.abs(moves - np.median(moves)))) if len(moves) else 0.0
    limit = max(math.log(MIN_RATIO), SPREAD_K * sigma)
    lo, hi = np.log1p(m["ci_low_pct"].astype(float) / 100), np.log1p(m["ci_high_pct"].astype(float) / 100)
    m["significant"] = m["significant"].astype(bool) & (m["exact"].astype(bool) | (lo > limit) | (hi < -limit))
    step_ms = float(sa.step_time_ms) if np.isfinite(sa.step_time_ms) else 0.0
    # practical size: the mean per step (B's beyond the run-wide factor) moves by MIN_STEP_SHARE of A's step
    moved = (m["ms_per_step_b"] / factor - m["ms_per_step_a"]).abs()
    m["significant"] = m["significant"].astype(bool) & (m["exact"].astype(bool) | (moved >= MIN_STEP_SHARE * step_ms))
    beyond = m["significant"]
    m["status"] = np.select(
        [m["_merge"] == "right_only", m["_merge"] == "left_only", beyond & (m["diff_ms"] < 0),
         beyond & (m["diff_ms"] > 0)],
        ["added", "removed", "faster", "slower"], default="same")
    m = m.drop(columns=["_merge", "exact"])
    m = m.reindex(m["diff_ms"].abs().sort_values(ascending=False, kind="stable").index).reset_index(drop=True)
    return RunComparison(ra.name, rb.name, steps, m, factor, math.exp(limit))


def _per_step(run: Run, rank: int) -> dict:
    """The averaged steps' per-op-type samples (``samples``: op -> time in ms per step, 0 where it did not run)
    and their means (``table``: op, ms_per_step, calls_per_step)."""
    def build():
        steps = averaged_steps(step_breakdown(run, rank))["step"].to_numpy()
        t = op_tasks(run, rank=rank)
        t = t[t["step"].isin(steps)]
        g = t.groupby(["op", "step"])
        per = (g["dur_ns"].sum() / 1e6).unstack("step", fill_value=0.0).reindex(columns=steps, fill_value=0.0)
        calls = g.size().unstack("step", fill_value=0).reindex(columns=steps, fill_value=0)
        n = max(len(steps), 1)
        table = pd.DataFrame({"op": [str(o) for o in per.index], "ms_per_step": per.sum(axis=1).to_numpy() / n,
                              "calls_per_step": calls.reindex(per.index).sum(axis=1).to_numpy() / n})
        return {"samples": {str(op): row.to_numpy(float) for op, row in per.iterrows()}, "table": table}

    return run.memo(("compare_per_step", rank), build)


def step_samples(run: Run | str | os.PathLike, rank: int = 0) -> dict:
    """Per op type: its summed time (ms) in every averaged step (0 where it did not run)."""
    return _per_step(as_run(run), rank)["samples"]


def _low(x: np.ndarray) -> float:
    return float(np.quantile(x, QUANTILE))


def run_factor(a: dict, b: dict) -> float:
    """The run-wide speed ratio b / a: the median over the op types both runs ran of the ratio of their lower
    quartiles per step (means where a quartile is 0; 1.0 when there is nothing to compare). One slowed op type
    does not move it."""
    ratios = []
    for op, x in a.items():
        y = b.get(op)
        if y is None or not len(x) or not len(y):
            continue
        mx, my = _low(x), _low(y)
        if mx <= 0 or my <= 0:
            mx, my = float(np.mean(x)), float(np.mean(y))
        if mx > 0 and my > 0:
            ratios.append(my / mx)
    return float(np.median(ratios)) if ratios else 1.0


def _noise(a: np.ndarray | None, b: np.ndarray | None, rel_tol: float = 0.05) -> dict:
    """Mann-Whitney p-value, Vargha-Delaney effect A = P(b > a), the change of the lower quartile (%) with its
    bootstrap 95 % interval, and whether the difference is beyond noise (tests 1 and 2 of the module docstring;
    ``exact``: samples without spread, where any change beyond ``rel_tol`` counts)."""
    out = {"p_value": np.nan, "effect": np.nan, "q_change_pct": np.nan, "ci_low_pct": np.nan, "ci_high_pct": np.nan,
           "significant": False, "exact": False,
           "samples_a": 0 if a is None else len(a), "samples_b": 0 if b is None else len(b)}
    if a is None or b is None or len(a) < 2 or len(b) < 2:
        return out
    qa, qb = _low(a), _low(b)
    out["q_change_pct"] = (qb / qa - 1) * 100 if qa > 0 else np.nan
    if np.ptp(a) == 0 and np.ptp(b) == 0:  # no step-to-step spread at all (a synthetic trace): exact
        same = a[0] == b[0]
        change = (b[0] / a[0] - 1) * 100 if a[0] else np.nan
        out.update(p_value=1.0 if same else 0.0, effect=0.5 if same else float(b[0] > a[0]), q_change_pct=change,
                   ci_low_pct=change, ci_high_pct=change, exact=True,
                   significant=bool(not same and (not a[0] or abs(b[0] - a[0]) > rel_tol * abs(a[0]))))
        return out
    u, p = mann_whitney(a, b)
    lo, hi = bootstrap_change(a, b)
    up, down = (MIN_RATIO - 1) * 100, (1 / MIN_RATIO - 1) * 100
    out.update(p_value=p, effect=u / (len(a) * len(b)), ci_low_pct=lo, ci_high_pct=hi,
               significant=bool(p < ALPHA and (lo > up or hi < down)))
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
    """95 % interval of (lower quartile of b / lower quartile of a - 1) * 100 by resampling the steps of each run
    (seeded). The lower quartile: steps slowed by other processes on the machine (noise only adds time) do not
    swing it."""
    rng = np.random.default_rng(0)
    ma = np.quantile(rng.choice(a, (n, len(a))), QUANTILE, axis=1)
    mb = np.quantile(rng.choice(b, (n, len(b))), QUANTILE, axis=1)
    ok = ma > 0
    if not ok.any():
        return float("nan"), float("nan")
    ch = (mb[ok] / ma[ok] - 1) * 100
    return float(np.percentile(ch, 2.5)), float(np.percentile(ch, 97.5))
