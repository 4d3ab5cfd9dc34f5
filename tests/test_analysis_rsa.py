"""RSA: model/target RSMs, the lower-triangle Pearson score, layerwise scores and the trial bootstrap."""

import warnings

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from scipy.stats import pearsonr

from vismech.analysis import (
    bootstrap_indices,
    cosine_rsm,
    feature_rsm,
    identity_rsm,
    layerwise_rsa,
    position_rsm,
    rsa_bootstrap,
    rsa_score,
    rsa_score_resampled,
)


def lower(M):
    """Strictly-lower triangle built with explicit loops (independent of np.tril_indices)."""
    return np.array([M[i, j] for i in range(M.shape[0]) for j in range(i)])


def scene_labels(rng, n):
    coords = rng.integers(0, 3, size=(n, 2))
    return coords, rng.integers(0, 3, n), rng.integers(0, 3, n)


def position_acts(coords, rng, noise=0.01):
    """Activations that encode position only: Gaussian bumps over a fine grid centred on (row, col)."""
    g = np.linspace(-1, 3, 25)
    centres = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    E = np.exp(-((coords[:, None, :] - centres[None]) ** 2).sum(-1) / 2.0)
    return E + noise * rng.normal(size=E.shape)


def feature_acts(colors, shapes, rng, noise=0.05):
    """Activations that encode colour and shape only (one-hot codes in random orthonormal directions)."""
    basis = np.linalg.qr(rng.normal(size=(40, 6)))[0].T
    codes = np.concatenate([np.eye(3)[colors], np.eye(3)[shapes]], 1)
    return codes @ basis + noise * rng.normal(size=(colors.size, 40))


def test_cosine_rsm_matches_scipy_and_handles_zero_rows():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 7))
    np.testing.assert_allclose(cosine_rsm(X), 1 - cdist(X, X, "cosine"), atol=1e-12)
    X[3] = 0
    S = cosine_rsm(X)
    assert S.dtype == np.float64 and not np.isnan(S).any()
    assert np.all(S[3] == 0) and np.all(S[:, 3] == 0)
    # leading batch dims
    Xb = rng.normal(size=(2, 3, 10, 4))
    np.testing.assert_allclose(cosine_rsm(Xb)[1, 2], cosine_rsm(Xb[1, 2]))


def test_target_rsms():
    coords = np.array([[0, 0], [0, 2], [2, 2]])
    P = position_rsm(coords)
    dmax = np.sqrt(8)
    np.testing.assert_allclose(P, [[1, 1 - 2 / dmax, 0], [1 - 2 / dmax, 1, 1 - 2 / dmax], [0, 1 - 2 / dmax, 1]])
    np.testing.assert_array_equal(position_rsm([[1, 1], [1, 1]]), np.ones((2, 2)))
    np.testing.assert_array_equal(identity_rsm(["r", "g", "r"]), [[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    F = feature_rsm(["r", "g", "r"], ["sq", "sq", "ci"])
    np.testing.assert_array_equal(F, [[1, 0.5, 0.5], [0.5, 1, 0], [0.5, 0, 1]])


def test_rsa_score_matches_pearsonr_on_lower_triangles():
    rng = np.random.default_rng(1)
    M, T = cosine_rsm(rng.normal(size=(15, 6))), feature_rsm(rng.integers(0, 3, 15), rng.integers(0, 3, 15))
    assert rsa_score(M, T) == pytest.approx(pearsonr(lower(M), lower(T))[0], abs=1e-12)
    # comma tokens: one pair per described object, lower triangles concatenated
    M2, T2 = cosine_rsm(rng.normal(size=(15, 6))), position_rsm(rng.integers(0, 3, (15, 2)))
    expected = pearsonr(np.r_[lower(M), lower(M2)], np.r_[lower(T), lower(T2)])[0]
    assert rsa_score([M, M2], [T, T2]) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="target RSM"):
        rsa_score([M, M2], [T])


def test_constant_target_gives_nan_quietly():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(3, 12, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isnan(rsa_score(cosine_rsm(X[0]), np.full((12, 12), 0.1)))
        assert np.isnan(layerwise_rsa(X, {"c": np.ones((12, 12))})["c"]).all()
        r, lo, hi = rsa_bootstrap(X[0], np.ones((12, 12)), n_boot=20)
        assert np.isnan([r, lo, hi]).all()


def test_golden_position_only_and_feature_only():
    rng = np.random.default_rng(3)
    coords, colors, shapes = scene_labels(rng, 300)
    P, F = position_rsm(coords), feature_rsm(colors, shapes)
    pos = layerwise_rsa(position_acts(coords, rng)[None], {"position": P, "feature": F})
    assert pos["position"][0] > 0.9 and abs(pos["feature"][0]) < 0.1
    feat = layerwise_rsa(feature_acts(colors, shapes, rng)[None], {"position": P, "feature": F})
    assert feat["feature"][0] > 0.9 and abs(feat["position"][0]) < 0.1


def test_layerwise_any_batch_shape_and_groups():
    rng = np.random.default_rng(4)
    coords, colors, shapes = scene_labels(rng, 40)
    P, F = position_rsm(coords), feature_rsm(colors, shapes)
    acts = rng.normal(size=(3, 2, 40, 5))  # [L, H, n, d_head]
    out = layerwise_rsa(acts, {"p": P, "f": F})
    assert out["p"].shape == (3, 2)
    assert out["f"][2, 1] == pytest.approx(rsa_score(cosine_rsm(acts[2, 1]), F), abs=1e-12)
    acts2 = rng.normal(size=(3, 40, 5))
    grouped = layerwise_rsa([acts[:, 0], acts2], {"p": [P, F]})
    assert grouped["p"][1] == pytest.approx(rsa_score([cosine_rsm(acts[1, 0]), cosine_rsm(acts2[1])], [P, F]))


def test_duplicate_pairs_excluded_hand_example():
    # 4 trials; the resample draws trial 0 twice, trials 1 and 2 once. The two copies of trial 0 are no pair.
    M = np.array([[1.0, 0.8, 0.1, 0.4], [0.8, 1.0, 0.3, 0.2], [0.1, 0.3, 1.0, 0.6], [0.4, 0.2, 0.6, 1.0]])
    T = np.array([[1.0, 1.0, 0.0, 0.5], [1.0, 1.0, 0.5, 0.0], [0.0, 0.5, 1.0, 1.0], [0.5, 0.0, 1.0, 1.0]])
    idx = np.array([0, 0, 1, 2])
    # real pairs of draws: (1,0) twice, (2,0) twice, (2,1) once
    x = [0.8, 0.8, 0.1, 0.1, 0.3]
    y = [1.0, 1.0, 0.0, 0.0, 0.5]
    assert rsa_score_resampled(M, T, idx) == pytest.approx(pearsonr(x, y)[0], abs=1e-12)
    with_self_pair = pearsonr(x + [1.0], y + [1.0])[0]  # what a naive M[idx][:, idx] would give
    assert abs(rsa_score_resampled(M, T, idx) - with_self_pair) > 1e-3


def test_bootstrap_fast_path_equals_explicit_resampling():
    rng = np.random.default_rng(5)
    coords, colors, shapes = scene_labels(rng, 30)
    X = [feature_acts(colors, shapes, rng, noise=1.0), rng.normal(size=(30, 8))]
    targets = [feature_rsm(colors, shapes), position_rsm(coords)]
    r, lo, hi, samples = rsa_bootstrap(X, targets, n_boot=40, seed=7, return_samples=True)
    rsms = [cosine_rsm(x) for x in X]
    assert r == pytest.approx(rsa_score(rsms, targets), abs=1e-10)
    slow = [rsa_score_resampled(rsms, targets, i) for i in bootstrap_indices(30, 40, seed=7)]
    np.testing.assert_allclose(samples, slow, atol=1e-10)
    # precomputed RSMs and a batch of layers give the same numbers
    r2, lo2, hi2 = rsa_bootstrap(rsms, targets, n_boot=40, seed=7, precomputed=True)
    assert (r2, lo2, hi2) == pytest.approx((r, lo, hi), abs=1e-10)
    rb, _, _ = rsa_bootstrap([np.stack([x, x]) for x in X], targets, n_boot=40, seed=7)
    np.testing.assert_allclose(rb, [r, r], atol=1e-10)


def test_bootstrap_interval_contains_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(6)
    widths = []
    for n in (60, 480):
        coords, colors, shapes = scene_labels(rng, n)
        X = feature_acts(colors, shapes, rng, noise=1.5)
        out = rsa_bootstrap(X, {"feature": feature_rsm(colors, shapes), "position": position_rsm(coords)},
                            n_boot=200, seed=0)
        r, lo, hi = out["feature"]
        assert lo <= r <= hi
        widths.append(hi - lo)
    assert widths[1] < 0.6 * widths[0]
