"""Representational similarity analysis (paper §3.3, App. A.2; Fig. 1c, Fig. 2, Figs. 6-7).

What it is for: asking, layer by layer, whether the representation at a token position (the last token, or the
comma tokens after each described object) is organised by object *position* or by object *features*.

- Model RSM: pairwise cosine similarity across trials (``cosine_rsm``), one per layer (or per head).
- Target RSMs: ``position_rsm`` = 1 - D / max D on grid coordinates, ``identity_rsm`` = 1[equal], and
  ``feature_rsm`` = (RSM_color + RSM_shape) / 2.
- Score: Pearson r between the strictly-lower-triangle entries (``rsa_score``). For the comma tokens there is one
  (model, target) pair per described object; their lower triangles are concatenated before correlating.
- ``layerwise_rsa``: scores for every layer and every named target. ``rsa_bootstrap``: a percentile interval from
  resampling trials.

Calling convention: a plain array is one group and may carry any leading batch dims, e.g. activations
[L, n, d] (layers) or [L, H, n, d_head] (per-head outputs, which is how per-head RSA is done); a *list* of arrays
is a set of groups (the comma-token case), each [..., n, d] for the same n trials in the same order. Target RSMs
have no batch dims. All similarity arithmetic is float64.

Bootstrap: resampling trials with replacement multiplies each original pair (i, j), i != j, by c_i * c_j, where
c_i counts how often trial i was drawn; pairs of a trial with its own copy are not real pairs and are dropped.
The resampled r is therefore a weighted Pearson r over the original pairs with weights c_i c_j, and every
weighted sum it needs is a quadratic form c^T A c of an n x n matrix with zero diagonal. So the model RSM is built
once per layer and each bootstrap sample costs a few matrix-vector products, with no copy of the resampled
matrix. ``rsa_score_resampled`` is the plain explicit version, used to test the fast path.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "cosine_rsm",
    "permutation_null",
    "position_rsm",
    "identity_rsm",
    "feature_rsm",
    "rsa_score",
    "rsa_score_resampled",
    "layerwise_rsa",
    "bootstrap_indices",
    "rsa_bootstrap",
]


# ----------------------------------------------------------------------------------------------- RSMs
def _unit_rows(X) -> np.ndarray:
    """Rows of ``X`` [..., n, d] scaled to unit length (float64); a zero row stays zero."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim < 2:
        raise ValueError(f"cosine_rsm needs activations of shape [..., n, d], got {X.shape}")
    norm = np.linalg.norm(X, axis=-1, keepdims=True)
    return X / np.where(norm > 0, norm, 1.0)


def cosine_rsm(X) -> np.ndarray:
    """Cosine similarity across trials: X [..., n, d] -> [..., n, n] (float64). A zero row has similarity 0."""
    Xn = _unit_rows(X)
    return np.clip(Xn @ np.swapaxes(Xn, -1, -2), -1.0, 1.0)


def position_rsm(coords) -> np.ndarray:
    """Target RSM for position: 1 - D / max D, D the Euclidean distance between (row, col) coordinates [n, 2].

    The maximum is over this matrix; if all coordinates are equal, every entry is 1.
    """
    c = np.asarray(coords, dtype=np.float64)
    if c.ndim == 1:
        c = c[:, None]
    D = np.sqrt(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1))
    dmax = D.max() if D.size else 0.0
    return np.ones_like(D) if dmax == 0 else 1.0 - D / dmax


def identity_rsm(labels) -> np.ndarray:
    """Target RSM for a categorical attribute (colour, shape, ...): 1[label_i == label_j]."""
    lab = np.asarray(labels)
    return (lab[:, None] == lab[None, :]).astype(np.float64)


def feature_rsm(colors, shapes) -> np.ndarray:
    """Target RSM for features: (RSM_color + RSM_shape) / 2."""
    return 0.5 * (identity_rsm(colors) + identity_rsm(shapes))


# ----------------------------------------------------------------------------------------------- scores
def _as_groups(x, what):
    """A list/tuple is a set of groups; anything else is one group."""
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise ValueError(f"empty list of {what}")
        return [np.asarray(g) for g in x], True
    return [np.asarray(x)], False


def _match(model_groups, target_groups):
    if len(model_groups) != len(target_groups):
        raise ValueError(
            f"{len(model_groups)} model group(s) but {len(target_groups)} target RSM(s): the comma-token case "
            "needs one target RSM per described object, in the same order as the activations"
        )
    for m, t in zip(model_groups, target_groups):
        n = m.shape[-2]
        if t.shape != (n, n):
            raise ValueError(f"target RSM has shape {t.shape}, expected ({n}, {n}) to match {n} trials")


def _pearson(x, y):
    """Pearson r along the last axis; x [..., m], y [m]. Constant input gives NaN without a warning."""
    xc = x - x.mean(-1, keepdims=True)
    yc = y - y.mean()
    ok = (x.max(-1) > x.min(-1)) & (y.max() > y.min()) if y.size else np.zeros(x.shape[:-1], bool)
    num = (xc * yc).sum(-1)
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(ok & (den > 0), num / np.where(den > 0, den, 1.0), np.nan)
    return np.clip(r, -1.0, 1.0)


def _lower(mats):
    """Strictly-lower-triangle entries of each [..., n, n] matrix, concatenated over the list (float64)."""
    i, j = np.tril_indices(mats[0].shape[-1], -1)
    return np.concatenate([np.asarray(m, dtype=np.float64)[..., i, j] for m in mats], axis=-1)


def rsa_score(model_rsms, target_rsms):
    """Pearson r between the strictly-lower-triangle entries of model and target RSMs.

    ``model_rsms``: [..., n, n] or a list of such (one per group); ``target_rsms``: [n, n] or a list of the same
    length. Returns a float (or an array of the model's batch shape). Constant targets give NaN.
    """
    mg, _ = _as_groups(model_rsms, "model RSMs")
    tg, _ = _as_groups(target_rsms, "target RSMs")
    _match(mg, tg)
    return _pearson(_lower(mg), _lower(tg))[()]


def rsa_score_resampled(model_rsms, target_rsms, idx):
    """RSA score of one bootstrap resample, built explicitly (the slow reference for ``rsa_bootstrap``).

    ``idx`` [n'] are the drawn trial indices. The resampled RSMs are M[idx][:, idx]; a pair of two draws of the
    same original trial is not a real pair and is left out of the lower triangle.
    """
    mg, _ = _as_groups(model_rsms, "model RSMs")
    tg, _ = _as_groups(target_rsms, "target RSMs")
    _match(mg, tg)
    idx = np.asarray(idx)
    a, b = np.tril_indices(idx.size, -1)
    keep = idx[a] != idx[b]
    ia, ib = idx[a][keep], idx[b][keep]
    x = np.concatenate([np.asarray(m, dtype=np.float64)[..., ia, ib] for m in mg], axis=-1)
    y = np.concatenate([np.asarray(t, dtype=np.float64)[ia, ib] for t in tg])
    return _pearson(x, y)[()]


def _named_targets(targets):
    if not isinstance(targets, dict):
        raise TypeError("targets must be a dict name -> target RSM (or list of target RSMs, one per group)")
    return {k: _as_groups(v, f"target RSMs for {k!r}")[0] for k, v in targets.items()}


def _batched(groups):
    """Check that all groups share the batch shape and trial count; return (batch_shape, flat views)."""
    batch = groups[0].shape[:-2]
    n = groups[0].shape[-2]
    for g in groups:
        if g.ndim < 2 or g.shape[:-2] != batch or g.shape[-2] != n:
            raise ValueError("all activation groups must have the same shape [..., n, d] (same trials, same batch)")
    flat = [g.reshape((-1,) + g.shape[-2:]) for g in groups]
    return batch, flat


def layerwise_rsa(acts, targets: dict) -> dict:
    """RSA score per layer (or per any leading batch index) for each named target.

    ``acts``: [L, n, d] (more generally [..., n, d], e.g. [L, H, n, d_head] per head) or a list of such, one per
    group. ``targets``: dict name -> target RSM [n, n] (or list of them, one per group). Returns dict name ->
    array of shape ``acts.shape[:-2]``. The model RSM is built once per batch index and reused for all targets.
    """
    groups, _ = _as_groups(acts, "activations")
    batch, flat = _batched(groups)
    tgts = _named_targets(targets)
    n = flat[0].shape[-2]
    for t in tgts.values():
        _match([np.broadcast_to(0.0, (n, n))] * len(flat), t)
    ys = {k: _lower(t) for k, t in tgts.items()}
    out = {k: np.empty(flat[0].shape[0]) for k in tgts}
    for b in range(flat[0].shape[0]):
        x = _lower([cosine_rsm(g[b]) for g in flat])
        for name, y in ys.items():
            out[name][b] = _pearson(x, y)
    return {k: v.reshape(batch) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- bootstrap
def bootstrap_indices(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """The trial resamples ``rsa_bootstrap`` uses: [n_boot, n] integer draws with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _offdiag_centered(mats):
    """Sum over groups of each matrix minus the mean of all lower-triangle entries, with zeroed diagonal."""
    i, j = np.tril_indices(mats[0].shape[0], -1)
    shift = np.mean(np.concatenate([m[i, j] for m in mats]))
    out = sum(m - shift for m in mats)
    np.fill_diagonal(out, 0.0)
    return out, [m - shift for m in mats]


def _quad(A, C):
    """c^T A c for every row c of C [B, n]; A [n, n] symmetric with zero diagonal (= 2 sum_{i<j} c_i c_j A_ij)."""
    return np.einsum("bn,nb->b", C, A @ C.T)


def _weighted_r(sx, sy, sxx, syy, sxy, w):
    """Weighted Pearson r from weighted sums. A variance below 1e-12 of the raw second moment is taken as a
    constant (only rounding left), giving NaN rather than a number made of rounding error."""
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = sxy / w - (sx / w) * (sy / w)
        vx = sxx / w - (sx / w) ** 2
        vy = syy / w - (sy / w) ** 2
        ok = (w > 0) & (vx > 1e-12 * sxx / w) & (vy > 1e-12 * syy / w)
        r = np.where(ok, cov / np.sqrt(np.where(ok, vx * vy, 1.0)), np.nan)
    return np.clip(r, -1.0, 1.0)


def _target_stats(tg, C):
    T, Tc = _offdiag_centered([np.asarray(t, dtype=np.float64) for t in tg])
    TT = sum(t * t for t in Tc)
    np.fill_diagonal(TT, 0.0)
    return Tc, _quad(T, C), _quad(TT, C)


def _boot_one(model_groups, tstats, C, w):
    """Bootstrap r values [B] for one batch index: model RSMs for each group, target stats from _target_stats."""
    M, Mc = _offdiag_centered(model_groups)
    MM = sum(m * m for m in Mc)
    np.fill_diagonal(MM, 0.0)
    sx, sxx = _quad(M, C), _quad(MM, C)
    out = {}
    for name, (Tc, sy, syy) in tstats.items():
        MT = sum(m * t for m, t in zip(Mc, Tc))
        np.fill_diagonal(MT, 0.0)
        out[name] = _weighted_r(sx, sy, sxx, syy, _quad(MT, C), w)
    return out


def _interval(boot, ci):
    ok = boot[~np.isnan(boot)]
    if ok.size == 0:
        return np.nan, np.nan
    lo, hi = np.quantile(ok, [(1 - ci) / 2, (1 + ci) / 2])
    return lo, hi


def rsa_bootstrap(X, targets, n_boot: int = 1000, seed: int = 0, ci: float = 0.95, precomputed: bool = False,
                  return_samples: bool = False):
    """Point RSA score and percentile bootstrap interval over trials: returns ``(r, lo, hi)``.

    ``X``: activations [..., n, d] or a list of them (groups); with ``precomputed=True``, model RSMs [..., n, n]
    instead. ``targets``: a target RSM [n, n], a list of them (one per group), or a dict name -> either, in which
    case a dict name -> (r, lo, hi) is returned. With a batch shape (e.g. layers), r, lo and hi have that shape;
    all batch indices use the same resamples (``bootstrap_indices(n, n_boot, seed)``), so layers are compared
    on paired resamples. ``return_samples=True`` appends the [..., n_boot] bootstrap values to each tuple.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    named = isinstance(targets, dict)
    tgts = _named_targets(targets if named else {"_": targets})
    groups, _ = _as_groups(X, "activations")
    batch, flat = _batched(groups)
    n = flat[0].shape[-2]
    for t in tgts.values():
        _match([np.broadcast_to(0.0, (n, n))] * len(flat), t)
    if precomputed and flat[0].shape[-1] != n:
        raise ValueError(f"precomputed model RSMs must be square [..., n, n], got {groups[0].shape}")
    C = np.stack([np.bincount(r, minlength=n) for r in bootstrap_indices(n, n_boot, seed)]).astype(np.float64)
    C = np.vstack([np.ones((1, n)), C])  # row 0: every trial once = the point estimate
    w = len(groups) * (C.sum(1) ** 2 - (C * C).sum(1))  # sum_{i != j} c_i c_j, matching c^T A c
    tstats = {k: _target_stats(t, C) for k, t in tgts.items()}
    res = {k: np.empty((flat[0].shape[0], n_boot + 1)) for k in tgts}
    for b in range(flat[0].shape[0]):
        rsms = [g[b].astype(np.float64) if precomputed else cosine_rsm(g[b]) for g in flat]
        for k, v in _boot_one(rsms, tstats, C, w).items():
            res[k][b] = v
    out = {}
    for k, v in res.items():
        iv = np.array([_interval(row[1:], ci) for row in v]).reshape(batch + (2,))
        tup = (v[:, 0].reshape(batch)[()], iv[..., 0][()], iv[..., 1][()])
        out[k] = tup + (v[:, 1:].reshape(batch + (n_boot,)),) if return_samples else tup
    return out if named else out["_"]


def _kinds(T: np.ndarray):
    """``T`` [n, n] as E C E^T, E the one-hot kinds of trials (equal rows, found by a random projection and
    checked): (kind of each trial [n], C [K, K]), or None where T is not symmetric (or the projection failed)."""
    n = T.shape[0]
    if not np.array_equal(T, T.T):
        return None
    _, first, kind = np.unique(T @ np.random.default_rng(0).normal(size=n), return_index=True, return_inverse=True)
    kind = kind.ravel()
    if not np.array_equal(T, T[np.ix_(first[kind], first[kind])]):
        return None
    return kind, T[np.ix_(first, first)]


def _cross(group, kinds, T, p, a, b):
    """sum over pairs a > b of M[a, b] T[p[a], p[b]] for one group: M = U U^T (the cosine RSM) given by ``group`` =
    (its unit rows U [n, d], their squared norms [n], its lower triangle). Where T = E C E^T (``kinds``, K kinds),
    by the kinds' sums of the rows of U, O(d (n + K^2)), when that is less than gathering T's permuted lower
    triangle, O(n^2)."""
    U, sq, x = group
    n = len(U)
    if kinds is None or U.shape[1] * (n + len(kinds[1]) ** 2) > n * n / 2:
        return float(x @ T.ravel()[p[a] * n + p[b]])
    kind, C = kinds
    k = kind[p]
    order = np.argsort(k, kind="stable")
    ks = k[order]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
    S = np.zeros((len(C), U.shape[1]))
    S[ks[starts]] = np.add.reduceat(U[order], starts, axis=0)  # each kind's sum of rows
    full = float(np.sum(C * (S @ S.T)))  # every ordered pair a, b, the diagonal (M[a, a] = sq[a]) included
    return 0.5 * (full - float(sq @ C[k, k]))


def permutation_null(X, targets: dict, n_perm: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The permutation null of layerwise RSA: the RSA of ``X`` (one [L, n, d] array or a list of groups) with each
    target's trial labels permuted, ``n_perm`` times: dict name -> [n_perm, L]. The model RSMs are built once per
    layer. A symmetric target's lower triangle keeps its mean and spread under a permutation, so only the cross
    term of Pearson's r is computed per permutation (``_cross``: for a target of few kinds of trials, such as
    colours or grid cells, from the activations without the n x n matrices); a target that is not symmetric is
    gathered pair by pair and correlated in full."""
    groups = X if isinstance(X, (list, tuple)) else [X]
    tg = {k: [np.asarray(t, dtype=np.float64) for t in (v if isinstance(v, (list, tuple)) else [v])]
          for k, v in targets.items()}
    L, n = groups[0].shape[0], groups[0].shape[-2]
    for ts in tg.values():
        _match([g[0] for g in groups], ts)
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n) for _ in range(n_perm)]
    a, b = np.tril_indices(n, -1)
    out = {k: np.empty((n_perm, L)) for k in tg}
    kinds = {k: [_kinds(t) for t in ts] for k, ts in tg.items()}
    ystats = {}  # a symmetric target's lower triangles: mean, centred sum of squares, not constant
    for k, ts in tg.items():
        if all(kd is not None for kd in kinds[k]):
            y = np.concatenate([t[a, b] for t in ts])
            ystats[k] = (y.mean(), float(((y - y.mean()) ** 2).sum()), y.size > 0 and y.max() > y.min())
    for layer in range(L):  # permuted targets are never n_perm x n x n in memory
        us = [_unit_rows(g[layer]) for g in groups]
        per = [(u, np.einsum("nd,nd->n", u, u), np.clip((u @ u.T)[a, b], -1.0, 1.0)) for u in us]
        x = np.concatenate([xg for _, _, xg in per])
        mx = x.mean() if x.size else np.nan
        sxx = float(((x - mx) ** 2).sum())
        x_ok = x.size > 0 and x.max() > x.min()
        for k, ts in tg.items():
            if k not in ystats:
                for i, p in enumerate(perms):
                    out[k][i, layer] = _pearson(x, np.concatenate([t[p[a], p[b]] for t in ts]))
                continue
            my, syy, y_ok = ystats[k]
            ok = x_ok and y_ok and sxx * syy > 0
            for i, p in enumerate(perms):
                sxy = sum(_cross(grp, kd, t, p, a, b) for grp, kd, t in zip(per, kinds[k], ts))
                out[k][i, layer] = np.clip((sxy - x.size * mx * my) / np.sqrt(sxx * syy), -1, 1) if ok else np.nan
    return out
