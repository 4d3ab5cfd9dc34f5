"""PCA of token representations and how well they separate by a label (paper §3.3, Fig. 1b).

What it is for: the paper projects the last-token hidden state onto its top-2 principal components and colours the
points by target position or by target features (position separates at the ID-selection layers, features at the
feature-retrieval layers). This module gives that projection and turns "separates" into numbers per layer:

- ``pca``: batch PCA by SVD of the centred data, with a deterministic sign per component (its largest-|loading|
  entry is positive), so plots do not flip between runs or machines.
- ``StreamingMoments``: the same PCA when the trials do not fit in memory at once: accumulate count, sum and
  X^T X over chunks (first pass), take the top eigenvectors of the covariance, then ``project`` each chunk
  (second pass). Sums are taken about the first chunk's mean, which keeps X^T X - n mu mu^T accurate when the
  activations have a large common offset (as residual streams do).
- ``silhouette``: mean silhouette coefficient of labelled points (e.g. the 2-D PCA scores), computed in row
  blocks so n of several thousand fits in memory.
- ``probe_accuracy``: stratified k-fold accuracy of an L2-regularised multinomial logistic-regression probe, a
  stronger separability measure that does not depend on the top-2 PCs. The paper itself runs no probes
  (paper-notes §4.8); this is an addition. ``chance_accuracy`` is the majority-class rate to compare against.
- ``fit_probe``: the same probe fitted on all of the data, returning a predictor, for applying it to trials of
  another condition (e.g. fit on high-entropy, decode low-entropy trials).

Assumptions: X is [n, d] (one row per trial) of finite floats, labels are [n] hashable values; arithmetic is
float64; numpy and scipy only.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.spatial.distance import cdist
from scipy.special import logsumexp

__all__ = ["pca", "StreamingMoments", "silhouette", "probe_accuracy", "fit_probe", "chance_accuracy"]


def _fix_signs(components):
    """Flip each row so that its largest-|loading| entry is positive."""
    idx = np.argmax(np.abs(components), axis=1)
    s = np.sign(components[np.arange(len(components)), idx])
    s[s == 0] = 1.0
    return components * s[:, None]


def pca(X, k: int = 2):
    """Top-k PCA of X [n, d]: returns (scores [n, k], components [k, d], explained_variance_ratio [k]).

    Scores are the centred data projected on the components; the ratio is each component's share of the total
    variance. Signs are fixed so that each component's largest-|loading| entry is positive. With fewer rows than
    columns the components come from the n x n Gram matrix (the SVD's components to rounding, much faster at
    d = 3584), unless a kept component's variance is below 1e-8 of the first's.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"pca needs X of shape [n >= 2, d], got {X.shape}")
    if not 1 <= k <= min(X.shape):
        raise ValueError(f"k must be between 1 and min(n, d) = {min(X.shape)}, got {k}")
    Xc = X - X.mean(0)
    total = float((Xc * Xc).sum())
    if Xc.shape[0] < Xc.shape[1] and total > 0:  # fewer trials than units: the top of the n x n Gram matrix
        lam, U = np.linalg.eigh(Xc @ Xc.T)
        lam, U = lam[::-1][:k].clip(min=0), U[:, ::-1][:, :k]
        if lam[-1] > lam[0] * 1e-8:  # resolved well above the Gram matrix's rounding
            comps = _fix_signs((Xc.T @ (U / np.sqrt(lam))).T)
            return Xc @ comps.T, comps, lam / total
    _, S, Vt = np.linalg.svd(Xc, full_matrices=False)
    comps = _fix_signs(Vt[:k])
    ratio = S[:k] ** 2 / total if total > 0 else np.zeros(k)
    return Xc @ comps.T, comps, ratio


class StreamingMoments:
    """First and second moments of rows accumulated over chunks, for PCA of data seen one chunk at a time.

    >>> m = StreamingMoments()
    >>> for chunk in chunks: m.update(chunk)          # pass 1
    >>> components, mean, ratio = m.pca(k=2)
    >>> scores = np.concatenate([m.project(c) for c in chunks])   # pass 2
    """

    def __init__(self):
        self.count = 0
        self.shift = None  # first chunk's mean; sums are about it
        self.sum = None
        self.xtx = None
        self.components = self.mean = self.explained_variance_ratio = None

    def update(self, chunk) -> "StreamingMoments":
        X = np.asarray(chunk, dtype=np.float64)
        if X.ndim != 2:
            raise ValueError(f"chunks must be [m, d], got {X.shape}")
        if X.shape[0] == 0:
            return self
        if self.shift is None:
            self.shift = X.mean(0)
            self.sum = np.zeros(X.shape[1])
            self.xtx = np.zeros((X.shape[1], X.shape[1]))
        elif X.shape[1] != self.shift.size:
            raise ValueError(f"chunk has d={X.shape[1]}, earlier chunks had d={self.shift.size}")
        Y = X - self.shift
        self.count += X.shape[0]
        self.sum += Y.sum(0)
        self.xtx += Y.T @ Y
        return self

    def covariance(self) -> np.ndarray:
        """Sample covariance (ddof=1) of everything seen so far."""
        if self.count < 2:
            raise ValueError("need at least 2 rows before computing a covariance")
        mu = self.sum / self.count
        return (self.xtx - self.count * np.outer(mu, mu)) / (self.count - 1)

    def pca(self, k: int = 2):
        """Top-k eigenvectors of the covariance: returns (components [k, d], mean [d], explained_ratio [k])."""
        cov = self.covariance()
        if not 1 <= k <= cov.shape[0]:
            raise ValueError(f"k must be between 1 and d = {cov.shape[0]}, got {k}")
        evals, evecs = np.linalg.eigh(cov)
        evals, evecs = evals[::-1], evecs[:, ::-1]
        total = np.clip(evals, 0, None).sum()
        self.components = _fix_signs(evecs[:, :k].T)
        self.mean = self.shift + self.sum / self.count
        self.explained_variance_ratio = np.clip(evals[:k], 0, None) / total if total > 0 else np.zeros(k)
        return self.components, self.mean, self.explained_variance_ratio

    def project(self, X) -> np.ndarray:
        """Scores of rows X [m, d] on the components from the last ``pca`` call."""
        if self.components is None:
            raise RuntimeError("call .pca(k) before .project(X)")
        return (np.asarray(X, dtype=np.float64) - self.mean) @ self.components.T


def silhouette(X2d, labels, block: int = 1024) -> float:
    """Mean silhouette coefficient (Euclidean) of points X [n, d] with cluster labels [n].

    s(i) = (b - a) / max(a, b), a = mean distance to the other members of i's cluster, b = the smallest mean
    distance to another cluster; s(i) = 0 for a point alone in its cluster (the usual convention).
    """
    X = np.asarray(X2d, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    _, y = np.unique(np.asarray(labels), return_inverse=True)
    K = y.max() + 1 if y.size else 0
    if X.shape[0] != y.size:
        raise ValueError(f"{X.shape[0]} points but {y.size} labels")
    if not 2 <= K <= y.size - 1:
        raise ValueError(f"silhouette needs 2 <= number of clusters <= n - 1, got {K} clusters for {y.size} points")
    onehot = np.eye(K)[y]
    sizes = onehot.sum(0)
    s = np.empty(y.size)
    for start in range(0, y.size, block):
        sl = slice(start, start + block)
        D = cdist(X[sl], X)
        sums = D @ onehot  # [block, K]
        own = y[sl]
        rows = np.arange(D.shape[0])
        own_size = sizes[own]
        with np.errstate(invalid="ignore", divide="ignore"):
            a = sums[rows, own] / (own_size - 1)
            other = sums / sizes
        other[rows, own] = np.inf
        b = other.min(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            si = (b - a) / np.maximum(a, b)
        s[sl] = np.where((own_size > 1) & (np.maximum(a, b) > 0), si, 0.0)
    return float(s.mean())


def chance_accuracy(labels) -> float:
    """Accuracy of always answering the most frequent label."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    return float(counts.max() / counts.sum())


def _stratified_folds(y, folds, rng):
    """Fold id per sample: each class shuffled, then dealt round-robin from a random starting fold."""
    fold = np.empty(y.size, dtype=int)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (np.arange(idx.size) + rng.integers(folds)) % folds
    return fold


def _fit_logreg(X, y, K, l2, max_iter):
    """Multinomial logistic regression, mean cross-entropy + l2/2 ||W||^2 (bias unpenalised), by L-BFGS."""
    n, d = X.shape
    Y = np.eye(K)[y]

    def f(theta):
        W, b = theta[: d * K].reshape(d, K), theta[d * K:]
        Z = X @ W + b
        lse = logsumexp(Z, axis=1, keepdims=True)
        P = np.exp(Z - lse)
        loss = (lse[:, 0] - (Z * Y).sum(1)).mean() + 0.5 * l2 * (W * W).sum()
        G = (P - Y) / n
        return loss, np.concatenate([(X.T @ G + l2 * W).ravel(), G.sum(0)])

    res = minimize(f, np.zeros(d * K + K), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    return res.x[: d * K].reshape(d, K), res.x[d * K:]


def _fit_in_row_span(X, y, K, l2, max_iter):
    """``_fit_logreg`` for X [n, d] with d > n, solved in the n-dimensional span of X's rows (an orthonormal basis V
    from the SVD) and mapped back, W = V W'. The same problem, not an approximation: the loss's gradient in W is
    X^T G, so every L-BFGS iterate started at 0, and the optimum, lie in that span; ||V W'|| = ||W'|| keeps the
    penalty; and L-BFGS's updates use only inner products and function values, so the iterates agree to rounding.
    Only the stopping rule differs (L-BFGS-B stops on the largest gradient coordinate, which the rotation changes):
    both stop at the same optimum to the solver's tolerance (tested). An iteration costs O(n r K) instead of
    O(n d K), r <= n (``benchmarks/probe.py``)."""
    V = _row_basis(X)
    W, b = _fit_logreg(X @ V, y, K, l2, max_iter)
    return V @ W, b


def _row_basis(X) -> np.ndarray:
    """An orthonormal basis [d, r] of the span of the rows of X [n, d] (n < d), r its numerical rank: from the
    eigenvectors of the n x n Gram matrix X X^T (V = X^T U diag(lambda)^-1/2), an order of magnitude faster than
    the SVD of X at n = 115, d = 3584 (``benchmarks/probe.py``); the SVD where the Gram matrix is too ill-conditioned
    for V to come out orthonormal to 1e-8."""
    lam, U = np.linalg.eigh(X @ X.T)
    keep = lam > lam[-1] * max(X.shape) * np.finfo(X.dtype).eps
    V = X.T @ (U[:, keep] / np.sqrt(lam[keep]))
    if np.abs(V.T @ V - np.eye(V.shape[1])).max() <= 1e-8:
        return V
    _, s, vt = np.linalg.svd(X, full_matrices=False)
    return vt[s > s[0] * max(X.shape) * np.finfo(X.dtype).eps].T


def _probe_inputs(X, labels, who: str):
    """X as float64 [n, d], the sorted classes and each label's class index; clear errors for bad shapes."""
    X = np.asarray(X, dtype=np.float64)
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    if X.ndim != 2 or X.shape[0] != y.size:
        raise ValueError(f"{who} needs X [n, d] and labels [n]; got {X.shape} and {y.size} labels")
    if classes.size < 2:
        raise ValueError(f"{who} needs at least 2 distinct labels")
    return X, classes, y


def probe_accuracy(X, labels, folds: int = 5, seed: int = 0, l2: float = 1e-3, max_iter: int = 200):
    """Stratified k-fold accuracy of a linear probe (multinomial logistic regression) on X [n, d].

    Features are standardised with training-fold statistics. Returns (mean accuracy, standard error over folds).
    Compare with ``chance_accuracy(labels)``.
    """
    X, classes, y = _probe_inputs(X, labels, "probe_accuracy")
    if not 2 <= folds <= y.size:
        raise ValueError(f"folds must be between 2 and n = {y.size}, got {folds}")
    fold = _stratified_folds(y, folds, np.random.default_rng(seed))
    accs = []
    for f in range(folds):
        tr, te = fold != f, fold == f
        if not te.any():
            continue
        predict = fit_probe(X[tr], y[tr], l2, max_iter)
        accs.append(np.mean(predict(X[te]) == y[te]))
    accs = np.asarray(accs)
    se = accs.std(ddof=1) / np.sqrt(accs.size) if accs.size > 1 else np.nan
    return float(accs.mean()), float(se)


def fit_probe(X, labels, l2: float = 1e-3, max_iter: int = 200):
    """Fit the probe of ``probe_accuracy`` on all of X [n, d] (same standardisation and loss); returns
    ``predict(X_new) -> labels`` for applying it to held-out data (e.g. another condition)."""
    X, classes, y = _probe_inputs(X, labels, "fit_probe")
    mu, sd = X.mean(0), X.std(0)
    sd[sd == 0] = 1.0
    Xs = (X - mu) / sd
    if Xs.shape[1] > Xs.shape[0]:  # more dimensions than trials: fit in the span of the training rows
        W, b = _fit_in_row_span(Xs, y, classes.size, l2, max_iter)
    else:
        W, b = _fit_logreg(Xs, y, classes.size, l2, max_iter)

    def predict(Xn):
        return classes[np.argmax(((np.asarray(Xn, dtype=np.float64) - mu) / sd) @ W + b, axis=1)]

    return predict
