"""PCA, streaming PCA, silhouette and the linear probe."""

import numpy as np
import pytest

from vismech.analysis import StreamingMoments, chance_accuracy, pca, probe_accuracy, silhouette


def anisotropic(rng, n=400, d=12, offset=0.0):
    scales = np.linspace(5.0, 0.5, d)
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return (rng.normal(size=(n, d)) * scales) @ Q.T + offset


def test_pca_matches_numpy_svd():
    rng = np.random.default_rng(0)
    X = anisotropic(rng)
    scores, comps, ratio = pca(X, k=3)
    Xc = X - X.mean(0)
    U, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    np.testing.assert_allclose(np.abs(comps), np.abs(Vt[:3]), atol=1e-10)
    np.testing.assert_allclose(np.abs(scores), np.abs(U[:, :3] * S[:3]), atol=1e-8)
    np.testing.assert_allclose(ratio, S[:3] ** 2 / (S**2).sum(), atol=1e-12)
    np.testing.assert_allclose(scores, Xc @ comps.T, atol=1e-10)
    # deterministic sign: largest-|loading| entry positive, also after flipping the data
    for c in comps:
        assert c[np.argmax(np.abs(c))] > 0
    np.testing.assert_allclose(pca(-X, k=3)[1], comps, atol=1e-10)


def test_streaming_equals_batch():
    rng = np.random.default_rng(1)
    X = anisotropic(rng, n=1000, offset=300.0)  # large common offset, as in residual streams
    m = StreamingMoments()
    for chunk in np.array_split(X, 7):
        m.update(chunk)
    comps, mean, ratio = m.pca(k=3)
    scores, bcomps, bratio = pca(X, k=3)
    np.testing.assert_allclose(mean, X.mean(0), atol=1e-8)
    np.testing.assert_allclose(comps, bcomps, atol=1e-8)
    np.testing.assert_allclose(ratio, bratio, atol=1e-8)
    np.testing.assert_allclose(np.concatenate([m.project(c) for c in np.array_split(X, 3)]), scores, atol=1e-8)
    np.testing.assert_allclose(m.covariance(), np.cov(X.T), atol=1e-8)


def brute_silhouette(X, y):
    n = len(y)
    s = []
    for i in range(n):
        same = [j for j in range(n) if y[j] == y[i] and j != i]
        if not same:
            s.append(0.0)
            continue
        a = np.mean([np.linalg.norm(X[i] - X[j]) for j in same])
        b = min(np.mean([np.linalg.norm(X[i] - X[j]) for j in range(n) if y[j] == c]) for c in set(y) if c != y[i])
        s.append((b - a) / max(a, b))
    return np.mean(s)


def test_silhouette_vs_brute_force():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 60)
    X = rng.normal(size=(60, 2)) + 2.0 * np.c_[y, y % 2]
    y_with_singleton = np.r_[y, 9]
    X_with_singleton = np.r_[X, [[10.0, 10.0]]]
    assert silhouette(X, y) == pytest.approx(brute_silhouette(X, y), abs=1e-12)
    assert silhouette(X_with_singleton, y_with_singleton, block=7) == pytest.approx(
        brute_silhouette(X_with_singleton, y_with_singleton), abs=1e-12)
    with pytest.raises(ValueError):
        silhouette(X, np.zeros(60))


def test_probe_accuracy_separable_and_shuffled():
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(4), 75)
    means = rng.normal(size=(4, 10)) * 4
    X = means[y] + rng.normal(size=(300, 10))
    acc, se = probe_accuracy(X, y, folds=5, seed=0)
    assert acc > 0.98 and se >= 0
    shuffled = rng.permutation(y)
    acc0, _ = probe_accuracy(X, shuffled, folds=5, seed=0)
    assert chance_accuracy(shuffled) == 0.25
    assert abs(acc0 - 0.25) < 0.1
    assert probe_accuracy(X, y, folds=5, seed=0) == (acc, se)  # deterministic under a seed


def test_chance_accuracy():
    assert chance_accuracy(["a", "a", "b", "c"]) == 0.5


def test_probe_fitted_in_the_row_span_equals_the_full_fit():
    import importlib

    P = importlib.import_module("vismech.analysis.pca")
    rng = np.random.default_rng(3)
    n, d, K = 60, 400, 4
    y = rng.integers(0, K, n)
    X = rng.normal(size=(n, d)) + 0.4 * np.eye(K)[y] @ rng.normal(size=(K, d))
    X = (X - X.mean(0)) / X.std(0)
    # a few iterations: the iterates agree to rounding (L-BFGS sees the same problem in the smaller space)
    W_full, b_full = P._fit_logreg(X, y, K, 1e-3, 5)
    W_span, b_span = P._fit_in_row_span(X, y, K, 1e-3, 5)
    assert np.abs(W_full - W_span).max() < 1e-9 and np.abs(b_full - b_span).max() < 1e-9

    def objective(W, b):
        Z = X @ W + b
        lse = np.log(np.exp(Z - Z.max(1, keepdims=True)).sum(1)) + Z.max(1)
        return (lse - Z[np.arange(n), y]).mean() + 0.5e-3 * (W * W).sum()

    # to convergence: L-BFGS-B stops on the largest gradient coordinate, which a rotation changes, so the two stop
    # at slightly different points of the same optimum
    W_full, b_full = P._fit_logreg(X, y, K, 1e-3, 200)
    W_span, b_span = P._fit_in_row_span(X, y, K, 1e-3, 200)
    assert abs(objective(W_full, b_full) - objective(W_span, b_span)) < 1e-5
    Xt = rng.normal(size=(200, d)) + 0.4 * np.eye(K)[rng.integers(0, K, 200)] @ rng.normal(size=(K, d))
    agree = np.mean((Xt @ W_full + b_full).argmax(1) == (Xt @ W_span + b_span).argmax(1))
    assert agree >= 0.97


def test_the_row_basis_spans_the_rows_orthonormally_and_falls_back_to_the_svd():
    import importlib

    P = importlib.import_module("vismech.analysis.pca")
    rng = np.random.default_rng(5)
    X = rng.normal(size=(40, 300))
    X = (X - X.mean(0)) / X.std(0)  # centred: rank 39
    V = P._row_basis(X)
    _, s, vt = np.linalg.svd(X, full_matrices=False)
    V0 = vt[s > s[0] * 300 * np.finfo(float).eps].T
    assert V.shape == V0.shape == (300, 39)
    assert np.abs(V.T @ V - np.eye(39)).max() < 1e-10
    assert np.abs(V @ V.T - V0 @ V0.T).max() < 1e-10  # the same subspace
    # a direction far below the rest (singular value 1e-6 of the largest): the Gram matrix cannot resolve it
    # orthonormally, so the SVD answers, and keeps it
    U, _, Vt = np.linalg.svd(rng.normal(size=(5, 300)), full_matrices=False)
    Y = U @ np.diag([1.0, 1.0, 1.0, 1.0, 1e-6]) @ Vt
    W = P._row_basis(Y)
    assert W.shape == (300, 5) and np.abs(W.T @ W - np.eye(5)).max() < 1e-10


def test_pca_by_the_gram_matrix_equals_the_svd():
    rng = np.random.default_rng(7)
    X = rng.normal(size=(50, 400)) * np.linspace(3, 0.1, 400) + rng.normal(size=(50, 1)) * rng.normal(size=400)
    scores, comps, ratio = pca(X, 3)
    Xc = X - X.mean(0)
    _, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    signs = np.sign(Vt[np.arange(3), np.abs(Vt[:3]).argmax(1)])
    np.testing.assert_allclose(comps, Vt[:3] * signs[:, None], atol=1e-10)
    np.testing.assert_allclose(ratio, S[:3] ** 2 / (S ** 2).sum(), rtol=1e-10)
    np.testing.assert_allclose(scores, Xc @ comps.T, atol=1e-10)
