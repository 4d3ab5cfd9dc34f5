"""``entropy`` (Figs. 6-7): do low-feature-entropy scenes weaken position IDs along with accuracy?

Stimuli: the binding-error sets (``scenes.sets.entropy_set``) on each grid of option ``grids`` (default 2x2 and
3x3), low entropy (every conjunction of a few colours x shapes, so objects share features) vs high entropy (every
object with its own colour and shape); K x N x N trials per condition (option ``n`` = K, small by default; the
paper uses 100 on 2x2 and 50 on 3x3).

Per grid and condition:

- accuracy: first-token accuracy from the same forward that captures the states (``activations``), and, with
  ``generate``, greedy-generation accuracy (``evaluate.evaluate``, a second pass); Wilson 95% intervals;
- position RSA by layer at the prompt (comma) tokens (ID retrieval: the described objects' cells) and at the last
  token (ID selection: the target's cell), with percentile bootstrap intervals over trials, and averaged over
  layers (the average of each bootstrap sample over layers gives the interval of the average);
- the difference high - low, by layer and averaged, with an interval from independent bootstrap resamples of the
  two conditions (different trial sets, so different bootstrap seeds).

Outputs: ``entropy_accuracy.csv``, ``entropy_rsa.csv`` (grid x condition x token x layer, plus ``layer = mean``
rows and ``condition = high-low`` rows), figures ``entropy_by_layer`` (Fig. 6 style: low vs high by layer) and
``entropy_bars`` (Fig. 7 style: accuracy and layer-averaged position RSA). The high-entropy sets are the ``rsa``
experiment's default sets, so with the same ``n`` and seed their captures are reused.
"""

from __future__ import annotations

import numpy as np

from vismech.engine import activations
from vismech.analysis.rsa import position_rsm
from vismech.analysis.stats import finite as _f, rate
from vismech.engine import evaluate
from vismech.experiments import figures as F
from vismech.experiments.common import Context
from vismech.experiments.options import Opt
from vismech.experiments.rsa import peak, prompt_targets, rsa_by_layer
from vismech.scenes.sets import entropy_set

NAME = "entropy"
DESCRIPTION = "Figs. 6-7: accuracy and position RSA (prompt and last token) in low vs high feature-entropy scenes"
DEFAULTS = {"grids": [[2, 2], [3, 3]], "n": 3, "n_boot": 200, "ci": 0.95, "generate": False,
            "act_dtype": "float32", "memmap_mb": 512}
LIMITS = {"grids": Opt("list", length=(1, 2), each=Opt("grid", choices=([2, 2], [3, 3])))}  # the sets' grids

CONDITIONS = ("low", "high")
TOKENS = ("prompt", "last")
COLORS = {"low": F.ROLE["low"], "high": F.ROLE["high"]}
TOKEN_TITLE = {"prompt": "Position (Prompt Tokens)", "last": "Position (Last Token)"}


def _interval(samples: np.ndarray, ci: float) -> tuple[float, float]:
    ok = samples[np.isfinite(samples)]
    if not ok.size:
        return np.nan, np.nan
    lo, hi = np.quantile(ok, [(1 - ci) / 2, (1 + ci) / 2])
    return float(lo), float(hi)


def layer_mean(res: dict, ci: float) -> dict:
    """The layer-averaged r and its interval (each bootstrap sample averaged over layers)."""
    with np.errstate(all="ignore"):
        return {"r": float(np.nanmean(res["r"])),
                **dict(zip(("lo", "hi"), _interval(np.nanmean(res["samples"], 0), ci)))}


def difference(high: dict, low: dict, ci: float) -> dict:
    """high - low by layer and layer-averaged, intervals from independent resamples of the two conditions."""
    d = high["samples"] - low["samples"]
    per = np.array([_interval(row, ci) for row in d])
    with np.errstate(all="ignore"):
        mean = {"r": float(np.nanmean(high["r"]) - np.nanmean(low["r"])),
                **dict(zip(("lo", "hi"), _interval(np.nanmean(high["samples"], 0) - np.nanmean(low["samples"], 0),
                                                   ci)))}
    return {"r": high["r"] - low["r"], "lo": per[:, 0], "hi": per[:, 1], "mean": mean}


def condition_rsa(acts, trials, n_boot: int, seed: int, ci: float) -> dict[str, dict]:
    """Position RSA at the prompt (comma) tokens and at the last token, with bootstrap samples."""
    prompt = rsa_by_layer(acts.commas(), prompt_targets(trials, ("position",)), n_boot, seed, ci, samples=True)
    last = rsa_by_layer(acts.last(), {"position": position_rsm([t.target.cell for t in trials])}, n_boot, seed,
                        ci, samples=True)
    return {"prompt": prompt["position"], "last": last["position"]}


def _rows(grid, cond, token, res, mean, n, n_boot):
    base = {"n": n, "grid": grid, "condition": cond, "token": token, "n_boot": n_boot}
    rows = [{"measure": "pearson_r", "value": _f(res["r"][layer]), "ci_low": _f(res["lo"][layer]),
             "ci_high": _f(res["hi"][layer]), **base, "layer": layer} for layer in range(len(res["r"]))]
    rows.append({"measure": "pearson_r_layer_mean", "value": _f(mean["r"]), "ci_low": _f(mean["lo"]),
                 "ci_high": _f(mean["hi"]), **base, "layer": ""})
    return rows


@F.paper_style
def plot(st) -> dict:
    """Figures ``entropy_by_layer`` (position RSA by layer, low vs high entropy) and ``entropy_bars`` (accuracy and
    layer-averaged RSA) from the stored tables."""
    sm, rsa, acc = st.summary, st.table("entropy_rsa"), st.table("entropy_accuracy")
    grids = list(sm["grids"])
    fig, axes = F.figure(2, len(grids), h=2.3)
    for gi, g in enumerate(grids):
        n = sm["grids"][g]["n_trials"]
        for ti, tok in enumerate(TOKENS):
            ax = axes[gi, ti]
            for cond in CONDITIONS:
                rs = sorted(F.where(rsa, measure="pearson_r", grid=g, condition=cond, token=tok),
                            key=lambda r: r["layer"])
                F.interval_line(ax, np.arange(len(rs)), F.column(rs, "value"), F.column(rs, "ci_low"),
                                F.column(rs, "ci_high"), color=COLORS[cond], label=f"{cond} entropy")
            F.rsa_axes(ax, len(rs), f"{TOKEN_TITLE[tok]}, {g}, n={n['low']}+{n['high']}")
            if gi == len(grids) - 1:
                F.legend_below(ax)
    fig.tight_layout()
    figs = {"entropy_by_layer": fig}

    measure = "generation" if F.where(acc, measure="generation") else "first_token"
    fig, axes = F.figure(3, 1, w=2.3, h=2.3)

    def series(rows, **match):
        got = [F.where(rows, grid=g, **match)[0] for g in grids]
        return tuple(F.column(got, k) for k in ("value", "ci_low", "ci_high"))

    F.bars(axes[0, 0], grids, {f"{c} entropy": series(acc, condition=c, measure=measure) for c in CONDITIONS},
           {f"{c} entropy": COLORS[c] for c in CONDITIONS}, "Accuracy", f"Accuracy ({measure.replace('_', '-')})")
    axes[0, 0].set_ylim(0, 1)
    for ax, tok in zip(axes[0, 1:], TOKENS):
        ser = {f"{c} entropy": series(rsa, condition=c, token=tok, measure="pearson_r_layer_mean") for c in CONDITIONS}
        F.bars(ax, grids, ser, {f"{c} entropy": COLORS[c] for c in CONDITIONS}, "RSA (Pearson r), layer mean",
               TOKEN_TITLE[tok])
        ax.axhline(0, color="0.3", lw=0.6)
    F.legend_below(axes[0, 1])
    fig.tight_layout()
    figs["entropy_bars"] = fig
    return figs


def run(ctx: Context) -> dict:
    k, n_boot, ci = int(ctx.opt("n")), int(ctx.opt("n_boot")), float(ctx.opt("ci"))
    grids = [tuple(g) for g in ctx.opt("grids")]
    names = [f"{g[0]}x{g[1]}" for g in grids]
    acc_rows, rsa_rows, out = [], [], {}
    for gi, (grid, gname) in enumerate(zip(grids, names)):
        out[gname] = {"accuracy": {}, "rsa": {}, "rsa_mean": {}, "n_trials": {}}
        for ci_, cond in enumerate(CONDITIONS):
            trials = entropy_set(grid, cond, k=k, seed=ctx.seed)
            acts = activations.for_context(ctx, trials, commas=True, z=False, desc=f"entropy {gname} {cond}")
            acc = {"first_token": rate(int(np.sum(acts.correct)), len(acts.correct))}
            if ctx.opt("generate"):
                rows = evaluate.evaluate(ctx.vlm, trials, ctx.batch_size, generate=True)
                vals = [r["generation_correct"] for r in rows]
                acc["generation"] = rate(sum(vals), len(vals))
            for m, a in acc.items():
                acc_rows.append({"measure": m, **a, "grid": gname, "condition": cond})
            res = condition_rsa(acts, trials, n_boot, ctx.seed + 2 * gi + ci_, ci)
            out[gname]["accuracy"][cond] = acc
            out[gname]["rsa"][cond] = res
            out[gname]["rsa_mean"][cond] = {tok: layer_mean(res[tok], ci) for tok in TOKENS}
            out[gname]["n_trials"][cond] = len(trials)
            for tok in TOKENS:
                rsa_rows += _rows(gname, cond, tok, res[tok], out[gname]["rsa_mean"][cond][tok], len(trials), n_boot)
        out[gname]["diff"] = {tok: difference(out[gname]["rsa"]["high"][tok], out[gname]["rsa"]["low"][tok], ci)
                              for tok in TOKENS}
        for tok in TOKENS:
            d = out[gname]["diff"][tok]
            rsa_rows += _rows(gname, "high-low", tok, d, d["mean"], out[gname]["n_trials"]["high"], n_boot)
    ctx.save_table("entropy_accuracy", acc_rows)
    ctx.save_table("entropy_rsa", rsa_rows)
    summary = {"k": k, "n_boot": n_boot, "ci": ci, "grids": {}}
    for g in names:
        o = out[g]
        summary["grids"][g] = {
            "n_trials": o["n_trials"], "accuracy": o["accuracy"],
            "rsa_layer_mean": {c: {t: {k_: _f(v) for k_, v in o["rsa_mean"][c][t].items()} for t in TOKENS}
                               for c in CONDITIONS},
            "rsa_peak_layer": {c: {t: peak(o["rsa"][c][t]["r"])[0] for t in TOKENS} for c in CONDITIONS},
            "high_minus_low_layer_mean": {t: {k_: _f(v) for k_, v in o["diff"][t]["mean"].items()} for t in TOKENS},
        }
    return summary


def report_rows(st):
    """For the report: accuracy, and position RSA averaged over layers, per grid and condition."""
    keep = ("grid", "condition", "token", "measure", "value", "ci_low", "ci_high", "n")
    acc = [{k: r[k] for k in keep if k in r} for r in st.table("entropy_accuracy")]
    rsa = [{k: r[k] for k in keep} for r in F.where(st.table("entropy_rsa"), measure="pearson_r_layer_mean")]
    return "Accuracy and layer-mean position RSA", acc + rsa, "results/entropy_accuracy.csv, entropy_rsa.csv"


def caption(summary: dict) -> str:
    """Accuracy and layer-averaged position RSA, low vs high entropy, per grid."""
    parts = []
    for grid, g in summary["grids"].items():
        acc = {c: g["accuracy"][c]["first_token"]["value"] for c in ("high", "low")}
        d = g["high_minus_low_layer_mean"]
        parts.append(f"{grid}: accuracy high {100 * acc['high']:.0f}% vs low {100 * acc['low']:.0f}%; "
                     f"position RSA high - low {d['prompt']['r']:+.3f} [{d['prompt']['lo']:+.3f}, "
                     f"{d['prompt']['hi']:+.3f}] at prompt tokens, {d['last']['r']:+.3f} [{d['last']['lo']:+.3f}, "
                     f"{d['last']['hi']:+.3f}] at the last token (n={g['n_trials']['high']} per condition)")
    return "; ".join(parts) + "."
