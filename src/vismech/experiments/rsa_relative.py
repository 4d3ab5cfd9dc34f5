"""``rsa-relative`` (Fig. 2): are position IDs coded in absolute or relative coordinates?

Stimuli: the relative/absolute set (``scenes.sets.relabs_set``): four 2x2 arrangements, one per quadrant of a 3x3
grid (each holds the centre cell), K x 4 x 4 trials per arrangement (option ``n`` = K). RSA at the last token
(``analysis.rsa``, cosine model RSMs per layer) against three target RSMs of the target object:

- ``features``: (1[colour equal] + 1[shape equal]) / 2;
- ``absolute``: position RSM on the target's (row, col) on the 3x3 grid (``meta["absolute_cell"]``);
- ``relative``: position RSM on its (row, col) within its 2x2 arrangement (``meta["relative_cell"]``).

Uncertainty: percentile bootstrap over trials (``n_boot``), with the same resamples for every target and layer, so
relative - absolute is bootstrapped on paired resamples; a permutation null (``n_null`` label permutations).
Summary: each curve's peak layer and value, and the comparison at the *position peak*, the layer where
max(absolute, relative) peaks (a choice: the paper compares the curves by eye): the difference relative - absolute
there with its paired bootstrap interval, and which wins ("relative"/"absolute" when the interval excludes 0,
else "neither"). The peak layer is chosen on the same data, so that interval is slightly optimistic; the by-layer
difference with intervals is in the table for every layer.
"""

from __future__ import annotations

import numpy as np

from vismech.engine import activations
from vismech.analysis.rsa import feature_rsm, position_rsm
from vismech.analysis.stats import finite as _f, rate
from vismech.experiments import figures as F
from vismech.experiments.common import Context
from vismech.experiments.rsa import curve_rows, curve_summary, rsa_by_layer, stored_curve
from vismech.scenes.sets import relabs_set

NAME = "rsa-relative"
DESCRIPTION = "Fig. 2: last-token RSA against feature, absolute-position and relative-position targets by layer"
DEFAULTS = {"n": 2, "n_boot": 200, "n_null": 20, "ci": 0.95, "act_dtype": "float32", "memmap_mb": 512}

TARGETS = ("features", "absolute", "relative")
STYLE = {"features": dict(color=F.PALETTE["green"], label="Feature"),
         "absolute": dict(color=F.PALETTE["blue"], label="Absolute"),
         "relative": dict(color=F.PALETTE["vermillion"], label="Relative")}


def relabs_targets(trials) -> dict[str, np.ndarray]:
    return {"features": feature_rsm([t.target.color for t in trials], [t.target.shape for t in trials]),
            "absolute": position_rsm([t.meta["absolute_cell"] for t in trials]),
            "relative": position_rsm([t.meta["relative_cell"] for t in trials])}


def paired_difference(a: dict, b: dict, ci: float) -> dict[str, np.ndarray]:
    """a - b per layer with a percentile interval over paired bootstrap samples ([L, n_boot] each)."""
    d = a["samples"] - b["samples"]
    lo, hi = np.full(d.shape[0], np.nan), np.full(d.shape[0], np.nan)
    for layer, row in enumerate(d):
        ok = row[np.isfinite(row)]
        if ok.size:
            lo[layer], hi[layer] = np.quantile(ok, [(1 - ci) / 2, (1 + ci) / 2])
    return {"r": a["r"] - b["r"], "lo": lo, "hi": hi}


@F.paper_style
def plot(st) -> dict:
    """Figure ``rsa_relative`` from the stored table: the three RSA curves, and relative - absolute."""
    sm, rows = st.summary, st.table("rsa_relative")
    n_layers = sm["n_layers"]
    res = {t: stored_curve(rows, t) for t in TARGETS}
    diff = stored_curve(rows, "relative_minus_absolute")
    fig, axes = F.figure(2, 1)
    x = np.arange(n_layers)
    ax = axes[0, 0]
    nulls = [res[t] for t in TARGETS if "null_lo" in res[t]]
    if nulls:
        F.null_band(ax, x, np.nanmin([r["null_lo"] for r in nulls], 0), np.nanmax([r["null_hi"] for r in nulls], 0))
    for t in TARGETS:
        F.interval_line(ax, x, res[t]["r"], res[t]["lo"], res[t]["hi"], **STYLE[t])
    F.rsa_axes(ax, n_layers, f"Relative vs absolute, n={sm['n_trials']}")
    F.legend_below(ax)
    ax = axes[0, 1]
    F.interval_line(ax, x, diff["r"], diff["lo"], diff["hi"], color="0.2")
    F.rsa_axes(ax, n_layers, "Difference (paired bootstrap)")
    ax.set_ylabel("Relative - absolute RSA (r)")
    fig.tight_layout()
    return {"rsa_relative": fig}


def run(ctx: Context) -> dict:
    k, n_boot, n_null, ci = int(ctx.opt("n")), int(ctx.opt("n_boot")), int(ctx.opt("n_null")), float(ctx.opt("ci"))
    trials = relabs_set(k=k, seed=ctx.seed)
    acts = activations.for_context(ctx, trials, commas=False, z=False, desc="rsa-relative capture")
    res = rsa_by_layer(acts.last(), relabs_targets(trials), n_boot, ctx.seed, ci, n_null, samples=True)
    diff = paired_difference(res["relative"], res["absolute"], ci)
    extra = {"n": len(trials), "n_boot": n_boot, "n_null": n_null}
    rows = [r for t in TARGETS for r in curve_rows(t, "last", t, res[t], extra)]
    rows += [{**r, "measure": "pearson_r_difference"}
             for r in curve_rows("relative_minus_absolute", "last", "relative-absolute", diff, extra)]
    ctx.save_table("rsa_relative", rows)
    L = acts.n_layers
    both = np.fmax(res["absolute"]["r"], res["relative"]["r"])
    summary = {"k": k, "n_trials": len(trials), "n_layers": L, "n_boot": n_boot, "n_null": n_null, "ci": ci,
               "curves": {t: curve_summary(res[t]) for t in TARGETS},
               "first_token_accuracy": rate(int(np.sum(acts.correct)), len(acts.correct))}
    if np.isfinite(both).any():
        p = int(np.nanargmax(both))
        lo, hi = diff["lo"][p], diff["hi"][p]
        winner = "relative" if lo > 0 else "absolute" if hi < 0 else "neither"
        summary["comparison"] = {"layer": p, "absolute_r": _f(res["absolute"]["r"][p]),
                                 "relative_r": _f(res["relative"]["r"][p]),
                                 "relative_minus_absolute": _f(diff["r"][p]), "ci": [_f(lo), _f(hi)],
                                 "winner": winner,
                                 "rule": "layer = argmax of max(absolute, relative); winner when the paired "
                                         f"{int(ci * 100)}% bootstrap interval of the difference excludes 0"}
    return summary


def report_rows(st):
    """For the report: every curve at the comparison layer."""
    rows, layer = st.table("rsa_relative"), st.summary.get("comparison", {}).get("layer", 0)
    return f"At layer {layer} (the larger of the absolute and relative peaks)", [
        {k: r[k] for k in ("curve", "layer", "measure", "value", "ci_low", "ci_high", "n")}
        for r in F.where(rows, layer=layer)], "results/rsa_relative.csv (every layer)"


def caption(summary: dict) -> str:
    """Which position code wins at the peak layer, with the paired interval of the difference."""
    c = summary["comparison"]
    lo, hi = c["ci"]
    return (f"At layer {c['layer']}: relative r={c['relative_r']:.2f}, absolute r={c['absolute_r']:.2f}, "
            f"relative - absolute {c['relative_minus_absolute']:+.3f} [{lo:+.3f}, {hi:+.3f}]: winner "
            f"{c['winner']} (n={summary['n_trials']} trials).")
