"""CMA scoring: the logit-difference score, head summaries, significance against a null, top-K and the map."""

import numpy as np
import pytest

from vismech.analysis import head_significance, logit_diff, logit_diff_score, stage_map, top_k_heads

CLEAN = np.array([[1.0, 2.0, 3.0], [0.0, 5.0, 1.0]])
PATCHED = np.array([[4.0, 0.0, 1.0], [2.0, 2.0, 7.0]])
A1, A1_STAR = np.array([0, 1]), np.array([2, 2])


def test_logit_diff_score_hand_example():
    # clean:   pair 0: 3 - 1 = 2;  pair 1: 1 - 5 = -4
    # patched: pair 0: 1 - 4 = -3; pair 1: 7 - 2 = 5
    np.testing.assert_array_equal(logit_diff(CLEAN, A1, A1_STAR), [2.0, -4.0])
    np.testing.assert_array_equal(logit_diff_score(CLEAN, PATCHED, A1, A1_STAR), [-5.0, 9.0])
    # leading [layers, heads] dims on the patched logits
    stack = np.stack([np.stack([CLEAN, PATCHED, PATCHED])] * 2)  # [2, 3, 2, 3]
    s = logit_diff_score(CLEAN, stack, A1, A1_STAR)
    assert s.shape == (2, 3, 2)
    np.testing.assert_array_equal(s[1, 0], [0.0, 0.0])
    np.testing.assert_array_equal(s[0, 2], [-5.0, 9.0])


def test_identical_logits_score_exactly_zero():
    logits = np.random.default_rng(0).normal(size=(5, 4, 8, 50)).astype(np.float32)
    clean = logits[0, 0]
    s = logit_diff_score(clean, np.broadcast_to(clean, logits.shape), np.arange(8), np.arange(8)[::-1])
    assert np.all(s == 0.0)


def test_bad_token_ids_raise():
    with pytest.raises(ValueError, match="vocabulary"):
        logit_diff(CLEAN, np.array([0, 3]), A1_STAR)
    with pytest.raises(ValueError, match="one token id per pair"):
        logit_diff(CLEAN, np.array([0]), A1_STAR)


def test_planted_heads_found():
    rng = np.random.default_rng(1)
    L, H, n_pairs = 12, 8, 50
    scores = rng.normal(size=(L, H, n_pairs))
    planted = [(3, 1), (5, 5), (9, 0), (11, 7), (6, 2)]
    for lh in planted:
        scores[lh] += 1.5
    null = rng.normal(size=(5000, n_pairs)).mean(1)  # mean scores of no-effect control patches
    res = head_significance(scores, null, q=0.05, method="bh")
    found = set(zip(*np.nonzero(res["mask"])))
    assert set(planted) <= found and len(found - set(planted)) <= 1
    assert res["count"] == len(found)
    assert res["threshold"] == pytest.approx(np.quantile(null, 0.95))
    assert res["pvalues"].shape == (L, H) and res["pvalues"].min() == pytest.approx(1 / 5001)
    assert top_k_heads(res["mean"], 5) == sorted(planted, key=lambda lh: -res["mean"][lh])
    holm_res = head_significance(scores, null, method="holm")
    assert set(zip(*np.nonzero(holm_res["mask"]))) == set(planted)


def test_false_positive_rate_on_pure_null():
    rng = np.random.default_rng(2)
    n_rep, L, H, q, se_mean = 300, 8, 8, 0.05, 0.14
    any_bh, frac_threshold = [], []
    for _ in range(n_rep):
        null = rng.normal(scale=se_mean, size=2000)
        heads = rng.normal(scale=se_mean, size=(L, H))
        any_bh.append(head_significance(heads, null, q=q, method="bh")["count"] > 0)
        frac_threshold.append(head_significance(heads, null, q=q, method="threshold")["mask"].mean())
    # BH under the global null: family-wise rate = FDR <= q (3 binomial SEs of slack)
    assert np.mean(any_bh) <= q + 3 * np.sqrt(q * (1 - q) / n_rep)
    # Yang et al.'s uncorrected threshold: about q of null heads pass
    assert np.mean(frac_threshold) == pytest.approx(q, abs=0.01)


def test_holm_warns_when_null_too_small():
    with pytest.warns(UserWarning, match="no head can pass"):
        head_significance(np.zeros((28, 28)), np.zeros(5000), method="holm")


def test_top_k_ties_and_nan():
    m = np.array([[1.0, 3.0, np.nan], [3.0, 2.0, 3.0]])
    assert top_k_heads(m, 4) == [(0, 1), (1, 0), (1, 2), (1, 1)]
    assert top_k_heads(m, 10)[-1] == (0, 2)


def test_stage_map():
    a = np.array([[0.0, 2.0], [-1.0, 1.0]])
    b = np.array([[0.1, 0.0], [0.0, 0.05]])
    rgb = stage_map({"id_retrieval": a, "id_selection": b, "feature_retrieval": -np.ones((2, 2))})
    assert rgb.shape == (2, 2, 3) and rgb.min() >= 0 and rgb.max() <= 1
    np.testing.assert_allclose(rgb[..., 0], [[0, 1], [0, 0.5]])
    np.testing.assert_allclose(rgb[..., 1], [[1, 0], [0, 0.5]])
    assert np.all(rgb[..., 2] == 0)
    np.testing.assert_allclose(stage_map(np.stack([a, b])), rgb)


def test_paired_significance_is_an_exact_sign_flip_test_for_few_pairs():
    """With 2^n <= n_perm every sign pattern is used: p is the share of patterns whose mean is at least the observed
    one (counted here by brute force); BH over heads; the floor removes heads whose mean score is not above it;
    with many pairs the sampled test is seeded and its p at least 1 / (n_perm + 1)."""
    import itertools

    from vismech.analysis.cma import paired_significance
    from vismech.analysis.stats import benjamini_hochberg

    scores = np.array([[[1.0, 2.0, 3.0, 4.0], [0.5, -0.5, 0.4, -0.6]], [[2.0, 2.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0]]])
    null = np.array([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.5], [0.0, 0.0, 0.0, 0.0]]])
    got = paired_significance(scores, null, q=0.2, n_perm=64)
    d = scores - null
    want = np.zeros((2, 2))
    for i, j in itertools.product(range(2), range(2)):
        means = [np.mean(np.array(sg) * d[i, j]) for sg in itertools.product([1, -1], repeat=4)]
        want[i, j] = np.mean([m >= d[i, j].mean() - 1e-12 for m in means])
    assert np.allclose(got["pvalues"], want) and want[0, 0] == 1 / 16
    mask, adj = benjamini_hochberg(want, 0.2)
    assert np.array_equal(got["mask"], mask) and np.allclose(got["p_adjusted"], adj)
    assert np.allclose(got["effect"], d.mean(-1)) and np.allclose(got["mean"], scores.mean(-1))
    floored = paired_significance(scores, null, q=0.2, n_perm=64, floor=2.0)
    assert np.array_equal(floored["mask"], mask & (scores.mean(-1) > 2.0))
    rng = np.random.default_rng(0)
    big, big_null = rng.normal(0, 1, (2, 2, 30)), rng.normal(0, 1, (2, 2, 30))
    a, b = paired_significance(big, big_null, seed=3), paired_significance(big, big_null, seed=3)
    assert np.array_equal(a["pvalues"], b["pvalues"]) and a["pvalues"].min() >= 1 / 2001 == a["min_pvalue"]
