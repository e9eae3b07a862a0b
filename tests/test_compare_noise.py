"""The noise model of ``insight.analysis.compare``: the Mann-Whitney test against scipy's, and what a run-wide
slowdown or a single slowed op type does to the verdicts (synthetic per-step samples, seeded)."""
from __future__ import annotations

import numpy as np
import pytest

from insight.analysis.compare import _noise, bootstrap_change, mann_whitney, run_factor


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
    assert slow["significant"] and slow["effect"] > 0.71 and slow["ci_low_pct"] > 0
    lo, hi = bootstrap_change(a, a * 1.5)
    assert lo <= 50 <= hi
