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
