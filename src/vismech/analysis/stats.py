"""Small statistics used across the analyses: error bars, confidence intervals and multiple-comparison control.

What it is for: every figure in the paper is a mean with an error bar (accuracy, RSA r, CMA score, intervention
efficacy), and every head map is a family of many tests (layers x heads). This module holds the few generic
tools those need, so each analysis does not grow its own version:

- ``mean_se``: mean and standard error of the mean (ddof=1).
- ``bootstrap_ci``: percentile bootstrap interval for any statistic of a sample of trials.
- ``wilson_ci``: Wilson score interval for a proportion (accuracy, intervention efficacy); unlike the normal
  approximation it stays inside [0, 1] and behaves at k = 0 or k = n.
- ``empirical_pvalue``: p-value of observed values against a sampled null distribution, with the +1 correction
  (#null >= obs + 1) / (N + 1), so it is never 0 and is valid for a finite null sample.
- ``benjamini_hochberg`` (false discovery rate) and ``holm`` (family-wise error rate) corrections.

Assumptions: inputs are numpy arrays (or array-likes) of finite floats; NaNs propagate through ``mean_se`` and are
rejected by the corrections with a clear error rather than silently counted as "not significant". Only numpy and
scipy are needed.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import stats as _sps

__all__ = [
    "mean_se",
    "bootstrap_ci",
    "wilson_ci",
    "empirical_pvalue",
    "benjamini_hochberg",
    "holm",
    "rate",
    "paired_diff",
    "finite",
]


def mean_se(x, axis=0):
    """Mean and standard error of the mean (sample std with ddof=1, divided by sqrt(n)) along ``axis``.

    With a single sample along ``axis`` the standard error is NaN (undefined), without a warning.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[axis] if axis is not None else x.size
    mean = np.mean(x, axis=axis)
    if n < 2:
        return mean, np.full_like(mean, np.nan)
    se = np.std(x, axis=axis, ddof=1) / np.sqrt(n)
    return mean, se


def bootstrap_ci(x, statistic: Callable = np.mean, n_boot: int = 1000, ci: float = 0.95, seed: int = 0):
    """Percentile bootstrap interval for ``statistic`` of a sample (trials along axis 0): ``scipy.stats.bootstrap``
    resampling whole rows of ``x`` with replacement.

    Returns ``(point, lo, hi)`` where ``point = statistic(x)`` and ``lo, hi`` are the (1-ci)/2 and (1+ci)/2
    quantiles of ``statistic`` over ``n_boot`` resamples. The statistic may return a scalar or an array (then lo,
    hi have its shape). One sample gives the degenerate interval [point, point].
    """
    x = np.asarray(x)
    if x.shape[0] < 1:
        raise ValueError("bootstrap_ci needs at least one sample along axis 0")
    _check_ci(ci)
    point = np.asarray(statistic(x), dtype=np.float64)
    if x.shape[0] == 1:
        return point[()], point[()], point[()]
    res = _sps.bootstrap((np.arange(x.shape[0]),), lambda idx: statistic(x[idx]), n_resamples=n_boot,
                         confidence_level=ci, method="percentile", vectorized=False,
                         rng=np.random.default_rng(seed))
    lo, hi = np.asarray(res.confidence_interval.low), np.asarray(res.confidence_interval.high)
    return point[()], lo[()], hi[()]


def wilson_ci(k, n, ci: float = 0.95):
    """Wilson score interval for a proportion k / n (vectorised over k and n).

    lo, hi = (p + z^2/(2n) -+ z * sqrt(p(1-p)/n + z^2/(4n^2))) / (1 + z^2/n), with z the (1+ci)/2 normal quantile.
    """
    _check_ci(ci)
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    if np.any(n <= 0) or np.any(k < 0) or np.any(k > n):
        raise ValueError("wilson_ci needs 0 <= k <= n and n > 0")
    z = _sps.norm.ppf((1 + ci) / 2)
    p = k / n
    denom = 1 + z**2 / n
    center = (p + z**2 / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    lo = np.clip(center - half, 0.0, 1.0)
    hi = np.clip(center + half, 0.0, 1.0)
    return lo[()], hi[()]


def empirical_pvalue(observed, null, alternative: str = "greater"):
    """Empirical p-value of each observed value against a sample from the null distribution.

    ``alternative="greater"``: p = (#{null >= obs} + 1) / (N + 1); ``"less"``: p = (#{null <= obs} + 1) / (N + 1).
    Vectorised: ``observed`` may have any shape, ``null`` is flattened. The smallest attainable p is 1/(N+1).
    """
    null = np.sort(np.asarray(null, dtype=np.float64).ravel())
    if null.size == 0 or np.isnan(null).any():
        raise ValueError("empirical_pvalue needs a non-empty null sample without NaN")
    obs = np.asarray(observed, dtype=np.float64)
    n = null.size
    if alternative == "greater":
        count = n - np.searchsorted(null, obs, side="left")
    elif alternative == "less":
        count = np.searchsorted(null, obs, side="right")
    else:
        raise ValueError(f"alternative must be 'greater' or 'less', got {alternative!r}")
    p = (count + 1.0) / (n + 1.0)
    p = np.where(np.isnan(obs), np.nan, p)
    return p[()]


def benjamini_hochberg(pvals, q: float = 0.05):
    """Benjamini-Hochberg step-up procedure controlling the false discovery rate at ``q``
    (``scipy.stats.false_discovery_control``).

    Returns ``(reject, p_adjusted)``, both with the shape of ``pvals``: p_adjusted(i) = min_{j >= i} m p_(j) / j,
    capped at 1 (R's ``p.adjust(method="BH")``), and reject == p_adjusted <= q.
    """
    p, shape = _flat_pvals(pvals)
    adj = np.asarray(_sps.false_discovery_control(p, method="bh"), dtype=np.float64)
    return (adj <= q).reshape(shape), adj.reshape(shape)


def holm(pvals, alpha: float = 0.05):
    """Holm step-down procedure controlling the family-wise error rate at ``alpha``.

    Returns ``(reject, p_adjusted)``; p_adjusted(i) = max_{j <= i} min(1, (m - j + 1) p_(j)) on sorted p-values
    (R's ``p.adjust(method="holm")``), and reject == p_adjusted <= alpha.
    """
    p, shape = _flat_pvals(pvals)
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(p[order] * (m - np.arange(m)), 1.0)
    adj = np.empty(m)
    adj[order] = np.maximum.accumulate(scaled)
    return (adj <= alpha).reshape(shape), adj.reshape(shape)


def _flat_pvals(pvals):
    p = np.asarray(pvals, dtype=np.float64)
    if p.size == 0:
        raise ValueError("no p-values given")
    if np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError("p-values must lie in [0, 1] and contain no NaN; drop untested hypotheses first")
    return p.ravel(), p.shape


def _check_ci(ci):
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")


def rate(k: int, n: int) -> dict:
    """k successes out of n as ``{"n", "value", "ci_low", "ci_high"}``: the proportion with its Wilson 95% interval
    (NaN when n = 0). The one way every experiment reports a rate (accuracy, efficacy, repeat rate)."""
    if n == 0:
        return {"n": 0, "value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    lo, hi = wilson_ci(k, n)
    return {"n": int(n), "value": k / n, "ci_low": float(lo), "ci_high": float(hi)}


def paired_diff(after, before, seed: int = 0) -> dict:
    """Mean of after - before over the same trials, with a percentile bootstrap 95% interval."""
    d = np.asarray(after, float) - np.asarray(before, float)
    if d.size == 0:
        return {"n": 0, "value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    m, lo, hi = bootstrap_ci(d, np.mean, n_boot=1000, seed=seed)
    return {"n": int(d.size), "value": float(m), "ci_low": float(lo), "ci_high": float(hi)}


# -- the experiment ---------------------------------------------------------------------------------------------


def finite(x) -> float | None:
    """``x`` as a float, None when it is NaN or infinite (what JSON summaries and tables store for "undefined")."""
    x = float(x)
    return x if np.isfinite(x) else None
