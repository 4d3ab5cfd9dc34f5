"""Scoring side of causal mediation analysis over attention heads (paper §3.4, App. A.3; Fig. 1d, Figs. 10-12).

What it is for: the patching itself (copy one head's output from context c2 into the run on c1, giving c1*) is done
by the hooks and experiments layers. Given the logits those runs produce, this module computes the paper's score
(Wang et al. 2022's logit-difference change)

    s = (M(c1*)[a1*] - M(c1*)[a1]) - (M(c1)[a1*] - M(c1)[a1]),

averages it over counterfactual pairs per head, decides which heads matter, and draws the Fig. 1d map:

- ``logit_diff`` / ``logit_diff_score``: the score for every pair, vectorised over any leading dims of the patched
  logits (e.g. [layers, heads, n_pairs, vocab]), so a whole layer x head sweep is scored in one call.
- ``null_mean_scores``: the null distribution of mean scores, resampled from the per-pair null scores.
- ``head_significance``: one-sided empirical test of each head's mean score against a null distribution of mean
  scores from control patches that should have no effect (Yang et al. 2025 use 5,000 null trials and report the
  null's 95th percentile as the threshold), with Benjamini-Hochberg or Holm correction over heads.
- ``top_k_heads``: the paper's own selection rule (top-K by score, no threshold).
- ``stage_map``: one RGB channel per condition (ID retrieval, ID selection, feature retrieval).

Assumptions: logits are float arrays whose last axis is the vocabulary; a1 and a1_star are integer token ids, one
per pair (the first answer token). The null scores must be means over the same number of pairs as the head
scores, or the test compares unlike spreads.
"""

from __future__ import annotations

import warnings

import numpy as np

from .stats import benjamini_hochberg, empirical_pvalue, holm

__all__ = [
    "logit_diff",
    "logit_diff_score",
    "null_mean_scores",
    "head_significance",
    "top_k_heads",
    "stage_map",
]


def _token_ids(a, n_pairs, vocab, name):
    a = np.asarray(a)
    if a.shape != (n_pairs,):
        raise ValueError(f"{name} must hold one token id per pair, shape ({n_pairs},); got {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be integer token ids, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= vocab):
        raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab})")
    return a


def logit_diff(logits, a1, a1_star):
    """logits[..., i, a1_star[i]] - logits[..., i, a1[i]]: logits [..., n_pairs, vocab] -> [..., n_pairs]."""
    logits = np.asarray(logits)
    if logits.ndim < 2:
        raise ValueError(f"logits must be [..., n_pairs, vocab], got shape {logits.shape}")
    n, v = logits.shape[-2:]
    a1 = _token_ids(a1, n, v, "a1")
    a1_star = _token_ids(a1_star, n, v, "a1_star")
    rows = np.arange(n)
    return logits[..., rows, a1_star].astype(np.float64) - logits[..., rows, a1].astype(np.float64)


def logit_diff_score(clean_logits, patched_logits, a1, a1_star):
    """CMA score s per pair: logit_diff(patched) - logit_diff(clean).

    clean_logits [n_pairs, vocab] (the run on c1); patched_logits [..., n_pairs, vocab] (runs on c1*, any leading
    dims such as [layers, heads]). Returns [..., n_pairs]. Identical clean and patched logits give exactly 0.
    """
    return logit_diff(patched_logits, a1, a1_star) - logit_diff(clean_logits, a1, a1_star)


def head_significance(scores, null_scores, q: float = 0.05, method: str = "bh") -> dict:
    """One-sided test that each head's mean score exceeds the null of no-effect control patches.

    ``scores``: per-pair scores [L, H, n_pairs] (averaged over the last axis) or mean scores [L, H].
    ``null_scores``: [n_null] mean scores of control patches. p = (#null >= mean + 1) / (n_null + 1) per head.
    ``method``: ``"bh"`` (false discovery rate q over all heads), ``"holm"`` (family-wise error rate q), or
    ``"threshold"`` (Yang et al.'s rule: mean above the null's 1-q quantile, no correction for many heads).

    Returns a dict: ``mean`` [L, H], ``pvalues`` [L, H], ``p_adjusted`` [L, H] (equal to pvalues for
    "threshold"), ``mask`` [L, H] bool, ``threshold`` (the null's 1-q quantile), ``count`` (heads in the mask),
    ``method``, ``q`` and ``min_pvalue`` = 1/(n_null+1), the smallest p a finite null can give.
    """
    scores = np.asarray(scores, dtype=np.float64)
    mean = scores.mean(-1) if scores.ndim == 3 else scores
    if mean.ndim != 2:
        raise ValueError(f"scores must be [L, H, n_pairs] or [L, H], got shape {scores.shape}")
    null = np.asarray(null_scores, dtype=np.float64).ravel()
    if not 0 < q < 1:
        raise ValueError(f"q must be in (0, 1), got {q}")
    p = empirical_pvalue(mean, null, alternative="greater")
    threshold = float(np.quantile(null, 1 - q))
    min_p = 1.0 / (null.size + 1)
    if method == "bh":
        mask, adj = benjamini_hochberg(p, q)
    elif method == "holm":
        if min_p > q / p.size:
            warnings.warn(
                f"Holm over {p.size} heads needs p <= {q / p.size:.2g} but {null.size} null samples give at best "
                f"p = {min_p:.2g}: no head can pass. Use more null samples (> {int(p.size / q)}) or method='bh'.",
                stacklevel=2,
            )
        mask, adj = holm(p, q)
    elif method == "threshold":
        mask, adj = mean > threshold, p
    else:
        raise ValueError(f"method must be 'bh', 'holm' or 'threshold', got {method!r}")
    return {
        "mean": mean,
        "pvalues": p,
        "p_adjusted": adj,
        "mask": mask,
        "threshold": threshold,
        "count": int(mask.sum()),
        "method": method,
        "q": q,
        "min_pvalue": min_p,
    }


def top_k_heads(mean_scores, k: int) -> list[tuple[int, int]]:
    """The k heads with the highest score, as (layer, head), highest first.

    Ties go to the lower layer, then the lower head; NaN scores are ranked last.
    """
    m = np.asarray(mean_scores, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"mean_scores must be [L, H], got shape {m.shape}")
    L, H = m.shape
    layer, head = np.divmod(np.arange(L * H), H)
    key = -m.ravel()
    key = np.where(np.isnan(key), np.inf, key)
    order = np.lexsort((head, layer, key))[: max(k, 0)]
    return [(int(layer[i]), int(head[i])) for i in order]


def stage_map(mean_scores_by_condition, colours: list[str] | None = None) -> np.ndarray:
    """Fig. 1d-style map: [L, H, 3] RGB in [0, 1], one channel per condition.

    Input: a dict name -> mean scores [L, H] (channels in insertion order, e.g. id_retrieval -> red,
    id_selection -> green, feature_retrieval -> blue) or an array [C, L, H], with C <= 3. Each channel is the
    positive part of its scores divided by that condition's own maximum, because the conditions' scales differ by
    an order of magnitude; a condition with no positive score is all 0. Missing channels are 0. With ``colours``
    (one "#rrggbb" per condition, e.g. a colour-blind-safe palette), each condition's weight scales its colour
    instead of one channel, and the colours add (clipped at 1).
    """
    if isinstance(mean_scores_by_condition, dict):
        maps = [np.asarray(v, dtype=np.float64) for v in mean_scores_by_condition.values()]
    else:
        maps = list(np.asarray(mean_scores_by_condition, dtype=np.float64))
    if not 1 <= len(maps) <= 3:
        raise ValueError(f"stage_map takes 1 to 3 conditions (one per RGB channel), got {len(maps)}")
    shape = maps[0].shape
    if len(shape) != 2 or any(m.shape != shape for m in maps):
        raise ValueError("every condition's mean scores must be [L, H] with the same L and H")
    rgb = np.zeros(shape + (3,))
    for c, m in enumerate(maps):
        pos = np.clip(np.nan_to_num(m, nan=0.0), 0.0, None)
        top = pos.max()
        if top > 0:
            rgb[..., c] = pos / top
    if colours is None:
        return rgb
    if len(colours) != len(maps):
        raise ValueError(f"stage_map got {len(colours)} colours for {len(maps)} conditions")
    cols = np.array([[int(h.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4)] for h in colours])  # [C, 3]
    return np.clip(rgb[..., :len(maps)] @ cols, 0.0, 1.0)


def null_mean_scores(null: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """``samples`` null mean scores: a random head's per-pair null scores, n resampled with replacement."""
    L, H, n = null.shape
    rng = np.random.default_rng(seed)
    flat = null.reshape(L * H, n)
    heads = rng.integers(L * H, size=samples)
    idx = rng.integers(n, size=(samples, n))
    return flat[heads[:, None], idx].mean(1)


def paired_significance(scores, null_scores, q: float = 0.05, floor: float | None = None, n_perm: int = 2000,
                        seed: int = 0) -> dict:
    """Head by head, whether patching the real counterfactual moves the answer more than the same head's control
    patch on the same pairs: d = score - null score per pair, one-sided test of mean(d) > 0 by sign flips (the
    pairs' signs flipped together across heads; every pattern when 2^n <= ``n_perm``), Benjamini-Hochberg at ``q``
    over all heads; with ``floor``, a head must also have a mean score above it (an effect size: without it, small
    consistent effects pass).

    Unlike ``head_significance`` against a pooled null, a head is not measured against other heads' control
    patches, some of which carry another variable (``docs/organism-ids.md``: the feature heads' control patches in
    the ID-selection condition bring another trial's colour and shape and raise the bar for every head).

    ``scores``, ``null_scores``: [L, H, n]. Returns ``mean`` (the real mean score), ``effect`` (mean d),
    ``pvalues``, ``p_adjusted``, ``mask``, ``count``, ``method`` ("paired"), ``q``, ``min_pvalue``."""
    s = np.asarray(scores, dtype=np.float64)
    d = s - np.asarray(null_scores, dtype=np.float64)
    if d.ndim != 3:
        raise ValueError(f"scores and null scores must be [L, H, n_pairs] alike, got shape {d.shape}")
    n = d.shape[-1]
    exact = 2 ** n <= n_perm
    if exact:  # every sign pattern
        signs = 1.0 - 2.0 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_perm, n))
    effect = d.mean(-1)
    at_least = (np.einsum("pn,lhn->plh", signs, d) / n >= effect - 1e-12).sum(0)
    p = at_least / len(signs) if exact else (at_least + 1) / (len(signs) + 1)
    mask, adj = benjamini_hochberg(p, q)
    if floor is not None:
        mask = mask & (s.mean(-1) > floor)
    return {"mean": s.mean(-1), "effect": effect, "pvalues": p, "p_adjusted": adj, "mask": mask,
            "count": int(mask.sum()), "method": "paired", "q": q,
            "min_pvalue": 1.0 / len(signs) if exact else 1.0 / (len(signs) + 1)}
