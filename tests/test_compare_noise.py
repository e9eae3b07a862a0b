"""The noise model of ``insight.analysis.compare``: the Mann-Whitney test against scipy's, what a run-wide
slowdown, contention spikes or a single slowed op type do to the verdicts (synthetic per-step samples, seeded),
and that the per-step times and the noise samples cover the same steps (warm-up step 0 excluded)."""
from __future__ import annotations

import numpy as np
import pytest

from insight import analysis
from insight.analysis.compare import MIN_RATIO, _noise, bootstrap_change, mann_whitney, run_factor
from synthetic_runs import training_run


@pytest.mark.parametrize("n1,n2,shift", [(88, 176, 0.1), (30, 40, 0.0), (100, 100, 0.5), (9, 12, 1.0)])
def test_mann_whitney_equals_scipys_asymptotic_test(n1, n2, shift):
    from scipy import stats  # scikit-learn, a dependency, brings SciPy: the reference implementation
    rng = np.random.default_rng(n1)
    a = np.round(rng.lognormal(0, 0.5, n1), 2)  # rounded: ties, as measured times have
    b = np.round(rng.lognormal(shift, 0.5, n2), 2)
    r = stats.mannwhitneyu(b, a, alternative="two-sided", method="asymptotic")
    u, p = mann_whitney(a, b)
    assert u == r.statistic and p == pytest.approx(r.pvalue, rel=1e-9)


def test_small_samples_use_a_permutation_test():
    u, p = mann_whitney(np.array([1.0, 2, 3]), np.array([4.0, 5, 6]))
    assert u == 9 and 0.05 < p < 0.2  # 2 of the 20 splits are this extreme: p = 0.1


def test_a_uniform_slowdown_is_the_run_factor_and_one_slowed_op_is_not():
    rng = np.random.default_rng(0)
    a = {f"op{i}": rng.lognormal(i * 0.1, 0.3, 80) for i in range(12)}
    b = {k: v * 1.3 * rng.lognormal(0, 0.05, 80) for k, v in a.items()}
    assert run_factor(a, b) == pytest.approx(1.3, rel=0.03)
    b["op3"] = b["op3"] * 2
    assert run_factor(a, b) == pytest.approx(1.3, rel=0.03)  # one op type does not move the median


def test_noise_verdicts_for_same_and_shifted_samples():
    rng = np.random.default_rng(1)
    a = rng.lognormal(0, 0.4, 100)
    same = _noise(a, rng.lognormal(0, 0.4, 100))
    assert not same["significant"] and same["ci_low_pct"] < 0 < same["ci_high_pct"]
    slow = _noise(a, rng.lognormal(np.log(2), 0.4, 100))
    assert slow["significant"] and slow["effect"] > 0.71 and slow["ci_low_pct"] > (MIN_RATIO - 1) * 100
    lo, hi = bootstrap_change(a, a * 1.5)
    assert lo <= 50 <= hi


def test_contention_spikes_are_within_noise_and_a_2x_op_is_not():
    """Other processes only ADD time, in bursts: a rerun whose op waited behind them in a third of its steps
    (3x there) has a much higher median and mean, yet the same lower quartile -- within noise; the same op
    really 2x slower (spikes and all) is significant."""
    rng = np.random.default_rng(2)
    a = rng.lognormal(np.log(0.3), 0.1, 80)
    b = rng.lognormal(np.log(0.3), 0.1, 80)
    hit = rng.random(80) < 0.55
    b[hit] *= 3
    assert np.median(b) > 1.3 * np.median(a)  # the median test flagged exactly this kind of rerun
    rerun = _noise(a, b)
    assert rerun["p_value"] < 0.01 and not rerun["significant"], rerun
    slow = _noise(a, 2 * b)
    assert slow["significant"] and slow["ci_low_pct"] > (MIN_RATIO - 1) * 100, slow
    assert not _noise(a, 1.2 * a * rng.lognormal(0, 0.02, 80))["significant"]  # a clear 20 % is below 1.4x


def test_time_per_step_and_noise_samples_exclude_the_warm_up_step(tmp_path):
    """Step 0's long GetNext (5 ms interval instead of 1 ms) and the feeder's TransferData outside any step are
    in neither the time per step nor the noise samples: both are over the averaged steps."""
    a = training_run(tmp_path, "a", n_steps=6, first_interval_us=5000, interval_us=1000)
    b = training_run(tmp_path, "b", n_steps=6, first_interval_us=9000, interval_us=1000)
    c = analysis.compare_runs(a.path, b.path)
    ops = c.ops.set_index("op")
    assert ops.loc["get_next", "ms_per_step_a"] == pytest.approx(0.5)   # half the 1 ms interval, steps 1..5
    assert ops.loc["get_next", "diff_pct"] == pytest.approx(0.0) and ops.loc["get_next", "status"] == "same"
    assert ops.loc["get_next", "calls_per_step_a"] == pytest.approx(1.0)
    assert "copy_h2d" not in ops.index  # the feeder's copies belong to no step
    samples = analysis.compare.step_samples(a.path)
    assert len(samples["get_next"]) == 5 and np.allclose(samples["get_next"], 0.5)
