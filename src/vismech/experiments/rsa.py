"""``rsa`` (Fig. 1c): is the residual stream organised by object position or by object features, layer by layer?

Stimuli: the K x N x N scene-description protocol on an N-cell grid (option ``grid``, default 2x2; ``n`` = K).
Model RSMs are cosine similarities across trials per layer (``analysis.rsa``), at

- the **comma tokens** after each described object: one RSM per described-object slot, compared with the target
  RSMs of *that* object (its cell, colour, shape); lower triangles are concatenated over slots;
- the **last token**: compared with the target object's RSMs.

Target RSMs: position = 1 - D / max D on (row, col) grid coordinates, colour and shape = 1[equal], features = the
mean of colour and shape. Score: Pearson r on the strictly lower triangle. Curves (one row per layer each):
``position_prompt``, ``position_last``, ``features_last`` (the three Fig. 1c lines), plus ``features_prompt``,
``color_last`` and ``shape_last``.

Uncertainty: a percentile bootstrap over trials (``analysis.rsa.rsa_bootstrap``, ``n_boot`` resamples, the same
resamples for every layer and curve) and a permutation null: the same RSA with the target labels permuted across
trials (``n_null`` permutations; mean and central ``ci`` range), which shows what r reaches by chance.

Per-head RSA: the per-head attention outputs ("z", the o_proj input) at the last token, against position and
features, give [L, H] maps (no intervals; they are descriptive).

Choices where the paper is silent (options): the object vocabulary (``vocab``): ``"high"`` (default) uses the
entropy sets' high-entropy objects, every object with its own colour and its own shape, as in the paper's examples;
then colour, shape and features RSMs coincide at the last token. ``"low"`` uses every conjunction of
sqrt(N) colours x sqrt(N) shapes (colour and shape then differ), or give a list of N [colour, shape] pairs.
With ``vocab="high"`` the trial set is the same as the entropy experiment's high-entropy set for the same grid,
``n`` and seed, so one capture serves both (``activations.for_context``). Caveat: on such a set the described
objects fix the target (the one left out), so the prompt's words alone carry the target's features, and
``features_last`` is high even with random weights (0.92-0.97 for the untrained organisms); the permutation null
does not remove this. Compare with the same architecture untrained before reading a high value as the model's own.

``stimuli`` (``experiments.sources``): ``"grid"`` (the sets above) or a stimulus folder, whose trials with a target
(all describing the same number of objects) are used as they are; positions are the objects' IDs (``id`` in the
folder, else left-to-right order), features their colour and class.
"""

from __future__ import annotations

import numpy as np

from vismech.engine import activations
from vismech.analysis.rsa import feature_rsm, identity_rsm, layerwise_rsa, permutation_null, position_rsm, \
    rsa_bootstrap
from vismech.analysis.stats import finite as _f, rate
from vismech.experiments import figures as F
from vismech.experiments.common import Context
from vismech.experiments.options import Opt
from vismech.experiments.sources import folder_trials
from vismech.scenes.core import Obj, Trial
from vismech.scenes.sets import all_cells, entropy_set, knn_protocol

NAME = "rsa"
DESCRIPTION = ("Fig. 1c: RSA of the residual stream by layer (position at prompt tokens, position and features at "
               "the last token) with bootstrap intervals, a permutation null, and per-head maps")
DEFAULTS = {"grid": (2, 2), "n": 3, "vocab": "high", "n_boot": 200, "n_null": 20, "ci": 0.95, "heads": True,
            "act_dtype": "float32", "memmap_mb": 512, "stimuli": "grid"}
#: the entropy sets are defined on 2x2 and 3x3 grids; vocab is "high", "low" or a list of [colour, shape] pairs
LIMITS = {"grid": Opt("grid", choices=([2, 2], [3, 3])), "vocab": Opt("any")}

# (curve, token, target)
CURVES = (("position_prompt", "prompt", "position"), ("position_last", "last", "position"),
          ("features_last", "last", "features"), ("features_prompt", "prompt", "features"),
          ("color_last", "last", "color"), ("shape_last", "last", "shape"))


# ------------------------------------------------------------------------------------------------ stimuli/targets
def rsa_trials(grid, k: int, vocab, seed: int) -> list[Trial]:
    grid = tuple(grid)
    if isinstance(vocab, str):
        return entropy_set(grid, vocab, k=k, seed=seed)
    conj = [tuple(c) for c in vocab]
    return knn_protocol(conj, all_cells(grid), grid, k, seed)


def object_targets(objs: list[Obj], coords=None) -> dict[str, np.ndarray]:
    """Target RSMs of one object per trial: position (from ``coords``, default the cells), colour, shape, features."""
    colors, shapes = [o.color for o in objs], [o.shape for o in objs]
    return {"position": position_rsm(coords if coords is not None else [o.cell for o in objs]),
            "color": identity_rsm(colors), "shape": identity_rsm(shapes), "features": feature_rsm(colors, shapes)}


def prompt_targets(trials: list[Trial], names=("position", "features")) -> dict[str, list[np.ndarray]]:
    """Per described-object slot (prompt order), the target RSMs of the object described there."""
    S = activations.n_slots_of(trials)
    per = [object_targets([t.mentioned[s] for t in trials]) for s in range(S)]
    return {k: [p[k] for p in per] for k in names}


def last_targets(trials: list[Trial], names=("position", "features", "color", "shape")) -> dict[str, np.ndarray]:
    t = object_targets([tr.target for tr in trials])
    return {k: t[k] for k in names}


# ------------------------------------------------------------------------------------------------ scores
def rsa_by_layer(X, targets: dict, n_boot: int, seed: int, ci: float = 0.95, n_null: int = 0,
                 samples: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """Per named target: r, lo, hi [L] (bootstrap over trials), null_mean/null_lo/null_hi [L] (``n_null`` > 0) and,
    with ``samples``, the bootstrap values [L, n_boot] (paired across layers and targets)."""
    boot = rsa_bootstrap(X, targets, n_boot=n_boot, seed=seed, ci=ci, return_samples=samples)
    out = {k: {"r": np.atleast_1d(v[0]), "lo": np.atleast_1d(v[1]), "hi": np.atleast_1d(v[2])}
           for k, v in boot.items()}
    if samples:
        for k, v in boot.items():
            out[k]["samples"] = v[3]
    if n_null > 0:
        for k, v in permutation_null(X, targets, n_null, seed + 1).items():
            out[k]["null_mean"] = np.nanmean(v, 0)
            out[k]["null_lo"], out[k]["null_hi"] = np.nanquantile(v, [(1 - ci) / 2, (1 + ci) / 2], axis=0)
    return out


def peak(r) -> tuple[int | None, float | None]:
    r = np.asarray(r, dtype=float)
    if not np.isfinite(r).any():
        return None, None
    i = int(np.nanargmax(r))
    return i, float(r[i])


def curve_summary(res: dict) -> dict:
    layer, value = peak(res["r"])
    out = {"peak_layer": layer, "peak_r": value}
    if layer is not None:
        out["peak_ci"] = [_f(res["lo"][layer]), _f(res["hi"][layer])]
        if "null_lo" in res:
            out["null_range_at_peak"] = [_f(res["null_lo"][layer]), _f(res["null_hi"][layer])]
    return out


def curve_rows(name: str, token: str, target: str, res: dict, extra: dict) -> list[dict]:
    rows = []
    for layer in range(len(res["r"])):
        row = {"measure": "pearson_r", "value": _f(res["r"][layer]), "ci_low": _f(res["lo"][layer]),
               "ci_high": _f(res["hi"][layer]), **extra, "curve": name, "token": token, "target": target,
               "layer": layer}
        if "null_mean" in res:
            row.update(null_mean=_f(res["null_mean"][layer]), null_low=_f(res["null_lo"][layer]),
                       null_high=_f(res["null_hi"][layer]))
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ figures
def stored_curve(rows: list[dict], curve: str) -> dict[str, np.ndarray]:
    rs = sorted(F.where(rows, curve=curve), key=lambda r: r["layer"])
    out = {"r": F.column(rs, "value"), "lo": F.column(rs, "ci_low"), "hi": F.column(rs, "ci_high")}
    if rs and "null_low" in rs[0]:
        out.update(null_lo=F.column(rs, "null_low"), null_hi=F.column(rs, "null_high"))
    return out


@F.paper_style
def plot(st) -> dict:
    """Figure ``rsa`` (the three Fig. 1c curves; the features curves in detail) and ``rsa_heads`` (per-head maps)
    from the stored tables."""
    sm, rows = st.summary, st.table("rsa")
    n_layers = sm["n_layers"]
    results = {c: stored_curve(rows, c) for c, _, _ in CURVES}
    fig, axes = F.figure(2, 1)
    x = np.arange(n_layers)
    nulls = [results[c] for c, _, _ in CURVES if "null_lo" in results[c]]
    lo = np.nanmin([c["null_lo"] for c in nulls], 0) if nulls else np.full(n_layers, np.nan)
    hi = np.nanmax([c["null_hi"] for c in nulls], 0) if nulls else np.full(n_layers, np.nan)
    # curves equal to features_last (vocab "high": every object has its own colour and shape) are not drawn under
    # it unseen: the legend says so
    same = [c for c in ("color_last", "shape_last") if np.allclose(results[c]["r"], results["features_last"]["r"],
                                                                   equal_nan=True)]
    title = f"RSA, {sm['grid'][0]}x{sm['grid'][1]} grid, n={sm['n_trials']}"
    for ax, names, sub in ((axes[0, 0], CURVES[:3], title), (axes[0, 1], CURVES[2:], "features in detail")):
        if np.isfinite(lo).any():
            F.null_band(ax, x, lo, hi)
        for c, _, _ in names:
            if c in same and ax is axes[0, 1]:
                continue
            st_ = dict(F.CURVE_STYLE[c])
            if c == "features_last" and same and ax is axes[0, 1]:
                st_["label"] += " = " + " = ".join(F.CURVE_STYLE[s]["label"].split(" (")[0] for s in same)
            res = results[c]
            F.interval_line(ax, x, res["r"], res["lo"], res["hi"], label=st_["label"], color=st_["color"],
                            ls=st_.get("ls", "-"), lw=st_.get("lw", 1.4))
        F.rsa_axes(ax, n_layers, sub)
    fig.tight_layout()
    F.figure_legend(fig, axes[0], ncol=3)
    figs = {"rsa": fig}
    if st.has("rsa_heads"):
        heads = st.table("rsa_heads")
        H = 1 + max(r["head"] for r in heads)
        maps = {t: F.column(sorted(F.where(heads, target=t), key=lambda r: (r["layer"], r["head"])),
                            "value").reshape(n_layers, H) for t in ("position", "features")}
        figs["rsa_heads"] = F.head_maps(maps, {"position": "Position (Last Token)",
                                               "features": "Feature (Last Token)"})
    return figs


# ------------------------------------------------------------------------------------------------ run
def run(ctx: Context) -> dict:
    grid, k, seed = tuple(ctx.opt("grid")), int(ctx.opt("n")), ctx.seed
    n_boot, n_null, ci = int(ctx.opt("n_boot")), int(ctx.opt("n_null")), float(ctx.opt("ci"))
    trials = folder_trials(ctx, NAME) or rsa_trials(grid, k, ctx.opt("vocab"), seed)
    acts = activations.for_context(ctx, trials, commas=True, z=bool(ctx.opt("heads")), desc="rsa capture")
    prompt = rsa_by_layer(acts.commas(), prompt_targets(trials), n_boot, seed, ci, n_null)
    last = rsa_by_layer(acts.last(), last_targets(trials), n_boot, seed, ci, n_null)
    results = {c: (prompt if tok == "prompt" else last)[tgt] for c, tok, tgt in CURVES}
    extra = {"n": len(trials), "grid": f"{grid[0]}x{grid[1]}", "n_boot": n_boot, "n_null": n_null}
    rows = [r for c, tok, tgt in CURVES for r in curve_rows(c, tok, tgt, results[c], extra)]
    ctx.save_table("rsa", rows)
    L = acts.n_layers
    summary = {"grid": list(grid), "k": k, "n_trials": len(trials), "n_layers": L, "n_boot": n_boot,
               "n_null": n_null, "ci": ci, "vocab": ctx.opt("vocab"),
               "first_token_accuracy": rate(int(np.sum(acts.correct)), len(acts.correct)),
               "curves": {c: curve_summary(results[c]) for c, _, _ in CURVES}}
    if ctx.opt("vocab") == "high":
        summary["note"] = ("every object has its own colour and shape (vocab='high'), so colour, shape and features "
                           "RSMs coincide at the last token; use vocab='low' to separate them")
    if ctx.opt("heads"):
        z = acts.last("z")
        tg = last_targets(trials, ("position", "features"))
        maps = {t: np.stack([layerwise_rsa(z[layer], tg)[t] for layer in range(L)]) for t in tg}
        ctx.save_table("rsa_heads", [{"measure": "pearson_r", "value": _f(m[layer, h]), "n": len(trials),
                                      "target": t, "layer": layer, "head": h} for t, m in maps.items()
                                     for layer in range(L) for h in range(m.shape[1])])
        top = {}
        for t, m in maps.items():
            flat = np.where(np.isfinite(m), m, -np.inf).ravel()
            order = np.argsort(-flat)[:5]
            top[t] = [{"layer": int(i // m.shape[1]), "head": int(i % m.shape[1]), "r": _f(flat[i])} for i in order]
        summary["heads_top5"] = top
    return summary


def report_rows(st):
    """For the report: each curve at its peak layer."""
    rows = st.table("rsa")
    peaks = [max(rs, key=lambda r: -np.inf if r["value"] == "" else r["value"])
             for c, _, _ in CURVES if (rs := F.where(rows, curve=c))]
    return "Each curve at its peak layer", [{k: r[k] for k in ("curve", "layer", "null_low", "null_high", "measure",
                                                                "value", "ci_low", "ci_high", "n") if k in r}
                                            for r in peaks], "results/rsa.csv (every layer), rsa_heads.csv"


def caption(summary: dict) -> str:
    """Peak layer and value of the three Fig. 1c curves, with intervals and the permutation-null range."""
    names = {"position_prompt": "position at prompt tokens", "position_last": "position at last token",
             "features_last": "features at last token"}
    parts = []
    for key, label in names.items():
        c = summary["curves"].get(key)
        if c:
            lo, hi = c["peak_ci"]
            n0, n1 = c["null_range_at_peak"]
            parts.append(f"{label} peaks at layer {c['peak_layer']} (r={c['peak_r']:.2f} [{lo:.2f}, {hi:.2f}]; "
                         f"null {n0:.2f} to {n1:.2f})")
    return "; ".join(parts) + f"; n={summary['n_trials']} trials."
