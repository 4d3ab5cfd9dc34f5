"""Error bars, intervals and multiple-comparison corrections against hand-computed values."""

import numpy as np
import pytest

from vismech.analysis import benjamini_hochberg, bootstrap_ci, empirical_pvalue, holm, mean_se, wilson_ci

# Benjamini & Hochberg (1995), section 4: 15 p-values; BH at q = 0.05 rejects the 4 smallest,
# and the Bonferroni-type step-down (Holm) rejects 3.
BH95 = [0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262, 0.5719,
        0.6528, 0.7590, 1.0000]


def test_mean_se():
    m, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5
    assert se == pytest.approx(np.sqrt(5 / 3) / 2)  # sd = sqrt(5/3), n = 4
    m, se = mean_se(np.array([[1.0, 3.0], [2.0, 6.0]]), axis=1)
    np.testing.assert_allclose(m, [2.0, 4.0])
    np.testing.assert_allclose(se, [1.0, 2.0])


def test_wilson_hand_values():
    # k=5, n=10, z=1.959964: z^2 = 3.841459; denom = 1 + z^2/10 = 1.3841459; centre = (0.5 + 0.1920729)/denom = 0.5
    # half = z/denom * sqrt(0.25/10 + z^2/400) = 1.4160 * sqrt(0.0346036) = 0.263405
    lo, hi = wilson_ci(5, 10)
    assert lo == pytest.approx(0.5 - 0.263405, abs=1e-5)
    assert hi == pytest.approx(0.5 + 0.263405, abs=1e-5)
    # k = 0: lower bound 0, upper = z^2/n / (1 + z^2/n) = 3.841459/23.841459 for n = 20
    lo, hi = wilson_ci(0, 20)
    assert lo == 0.0 and hi == pytest.approx(3.841459 / 23.841459, abs=1e-6)
    lo, hi = wilson_ci(np.array([1, 9]), 10)
    assert lo.shape == (2,) and lo[0] == pytest.approx(1 - hi[1])


def test_bootstrap_ci_normal_mean():
    x = np.random.default_rng(0).normal(size=400)
    point, lo, hi = bootstrap_ci(x, n_boot=2000, seed=1)
    assert point == pytest.approx(x.mean())
    half = 1.96 * x.std(ddof=1) / 20
    assert lo == pytest.approx(point - half, abs=0.25 * half)
    assert hi == pytest.approx(point + half, abs=0.25 * half)


def test_benjamini_hochberg_textbook():
    reject, adj = benjamini_hochberg(BH95, q=0.05)
    assert reject.sum() == 4 and reject[:4].all()
    # hand: sorted [.005, .01, .03, .04] * 4 / rank = [.02, .02, .04, .04], then running min from the top
    reject, adj = benjamini_hochberg(np.array([0.01, 0.04, 0.03, 0.005]), q=0.03)
    np.testing.assert_allclose(adj, [0.02, 0.04, 0.04, 0.02])
    np.testing.assert_array_equal(reject, [True, False, False, True])
    with pytest.raises(ValueError):
        benjamini_hochberg([0.1, np.nan])


def test_holm_textbook():
    reject, _ = holm(BH95, alpha=0.05)
    assert reject.sum() == 3
    # hand: sorted [.005, .01, .03, .04] * [4, 3, 2, 1] = [.02, .03, .06, .04], running max = [.02, .03, .06, .06]
    reject, adj = holm(np.array([0.01, 0.04, 0.03, 0.005]), alpha=0.05)
    np.testing.assert_allclose(adj, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_array_equal(reject, [True, False, False, True])


def test_empirical_pvalue():
    null = np.arange(1, 10)  # 1..9, N = 9
    p = empirical_pvalue(np.array([[5, 10], [0, 9]]), null)
    np.testing.assert_allclose(p, [[6 / 10, 1 / 10], [10 / 10, 2 / 10]])
    assert empirical_pvalue(1, null, alternative="less") == pytest.approx(2 / 10)


def test_benjamini_hochberg_and_bootstrap_agree_with_scipy():
    """The thin wrappers give scipy's numbers: BH-adjusted p-values equal ``false_discovery_control``'s, the
    bootstrap interval equals ``scipy.stats.bootstrap``'s percentile interval under the same generator."""
    from scipy import stats

    p = np.random.default_rng(3).uniform(0, 0.2, size=(6, 7))
    reject, adj = benjamini_hochberg(p, q=0.1)
    np.testing.assert_allclose(adj.ravel(), stats.false_discovery_control(p.ravel(), method="bh"))
    np.testing.assert_array_equal(reject, adj <= 0.1)
    x = np.random.default_rng(4).normal(size=50)
    point, lo, hi = bootstrap_ci(x, np.median, n_boot=300, ci=0.9, seed=7)
    ref = stats.bootstrap((x,), np.median, n_resamples=300, confidence_level=0.9, method="percentile",
                          rng=np.random.default_rng(7)).confidence_interval
    assert (point, lo, hi) == (np.median(x), pytest.approx(ref.low), pytest.approx(ref.high))
    X = np.random.default_rng(5).normal(size=(40, 3))  # rows resampled together: a vector statistic
    _, lo3, hi3 = bootstrap_ci(X, lambda a: a.mean(0), n_boot=200, seed=1)
    assert lo3.shape == (3,) and np.all(lo3 < X.mean(0)) and np.all(X.mean(0) < hi3)
    assert bootstrap_ci(np.array([2.5]))[1:] == (2.5, 2.5)


def test_rate_is_the_wilson_interval_and_nan_without_trials():
    from vismech.analysis.stats import rate

    r = rate(0, 20)  # hand: z^2 / (n + z^2) with z = 1.959964
    assert r == {"n": 20, "value": 0.0, "ci_low": 0.0, "ci_high": pytest.approx(3.841459 / 23.841459, abs=1e-6)}
    assert rate(7, 10)["value"] == 0.7 and np.isnan(rate(0, 0)["value"]) and rate(0, 0)["n"] == 0
