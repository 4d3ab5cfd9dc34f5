"""``binding-errors`` (App. D, Table 1; plus a trial-level tracing the paper did not do): are binding errors failures
of ID selection, and does the wrongly selected ID predict the wrong answer?

Stimuli: the binding-error sets ``scenes.sets.entropy_set(grid, "high" | "low", k=n)`` (every cell filled; high
entropy: every object its own colour and shape; low: all conjunctions of a few colours x shapes, so features are
shared). Heads: the top-k ID-selection heads (``experiments.cma.cma_scores(ctx).top_k("id_selection", k)``, or an
explicit ``heads`` list); all reads and edits are of their outputs (site ``z``) at the last token.

(a) **Prototypes**: per target cell, the mean head outputs over the *correct* high-entropy trials with the target
    there (``prototypes``; correct = first-token correct, which on high-entropy scenes, where each colour belongs to
    one object, names the object). A cell without a correct trial falls back to all its high-entropy trials
    (listed in the summary under ``prototype_fallback_cells``).
(b) **Table 1**: accuracy on high, low, low + patch (the heads' outputs *replaced* by the prototype of the target's
    cell) and a control, low + wrong-cell patch (the prototype of a cell drawn uniformly from the other cells per
    trial). Two measures: ``first_token`` (arg-max over the vocabulary is the answer's first token; on low-entropy
    scenes that is the colour, shared by several objects, so it overstates binding accuracy) and ``generation``
    (greedy decoding parsed by ``scenes.answers``: colour *and* shape must match). Wilson 95% intervals; the
    improvement (patch - low) and the control's change, paired over the same trials, with percentile bootstrap
    intervals. For the control, how often the generated answer names the wrong cell's object.
(c) **Error tracing** (new): a linear probe (``analysis.pca.fit_probe``, multinomial logistic regression on
    standardised features) decodes the selected position ID (the target's cell) from the concatenated head outputs.
    It is fitted on the correct high-entropy trials (cross-validated accuracy with ``analysis.pca.probe_accuracy``;
    falls back to all high-entropy trials when the correct ones cover fewer than two cells), then applied to the
    unedited low-entropy trials. Reported: decoded-ID accuracy on correct vs error trials (Wilson), and on error
    trials (generation parsed to a scene object other than the target; in the low-entropy sets every colour x shape
    pair is in the scene, so every parsed answer names one object) with a wrongly decoded cell, the fraction whose
    answered object is the object at the decoded cell (``error_tracing``), against chance 1/(N-1) (the answer one of
    the N-1 other objects at random) and a permutation null (decoded cells shuffled across those error trials,
    ``n_perm`` times, keeping their distribution; ``permutation_null``; one-sided empirical p).

Options: ``grid`` (2x2 for speed; the paper's Table 1 uses 3x3), ``n`` = K trials per (identity, cell) per
condition (K N^2 trials; small by default, the paper uses 50 on 3x3), ``k`` heads (50 as in the third-party
reproduction; the paper does not state it; capped at the head count), ``generate`` (generation accuracy and the
tracing, which needs the named object), ``folds`` (probe cross-validation), ``l2`` (probe penalty),
``probe_dims`` (the probe reads the top 128 principal components of the concatenated outputs, computed on the
probe's fitting trials without their labels, so no label leaks into the cross-validation; on the raw k x d_head
features, 12,800 for 100 heads of 128 dims, the L-BFGS fits took 55 s of CPU time for 32 trials on the H100
host; 0 uses the raw features), ``n_perm``.
"""

from __future__ import annotations

import random

import numpy as np

from vismech.analysis.pca import chance_accuracy, fit_probe, pca, probe_accuracy
from vismech.analysis.stats import empirical_pvalue
from vismech.engine import evaluate
from vismech.experiments import cma
from vismech.experiments import figures as F
from vismech.experiments.common import Context, pct
from vismech.analysis.stats import paired_diff, rate
from vismech.engine.edits import run_heads
from vismech.experiments.cma import select_heads
from vismech.scenes import answers
from vismech.scenes.core import Trial
from vismech.scenes.sets import all_cells, entropy_set

NAME = "binding-errors"
DESCRIPTION = "Table 1: ID-selection prototypes patched into low-entropy trials; trial-level error tracing by probe"
DEFAULTS = {"n": 2, "grid": (2, 2), "k": 50, "heads": None, "generate": True, "folds": 5, "l2": 1e-3,
            "probe_dims": 128, "n_perm": 2000, "cma_n": cma.DEFAULTS["n"], "cma_grid": cma.DEFAULTS["grid"]}
CONDITIONS = ("high", "low", "low+patch", "low+control")


def prototypes(z: np.ndarray, cells: list, selected) -> tuple[dict, list]:
    """Per cell, the mean of ``z`` [n, ...] over the selected rows with that cell (all its rows where none is
    selected). Returns ({cell: mean}, cells that fell back to all rows)."""
    selected = np.asarray(selected, bool)
    out, fallback = {}, []
    for cell in dict.fromkeys(cells):
        rows = np.array([c == cell for c in cells])
        use = rows & selected
        if not use.any():
            use, _ = rows, fallback.append(cell)
        out[cell] = z[use].mean(0)
    return out, fallback


def answered_cell(trial: Trial, text: str | None):
    """The cell of the scene object the generated ``text`` names (colour and shape), else None."""
    if text is None:
        return None
    parsed = answers.parse(trial, text)
    hit = [o.cell for o in trial.scene.objects if o.name == parsed]
    return hit[0] if len(hit) == 1 else None


def error_tracing(records: list[tuple], n_objects: int) -> dict:
    """``records``: (answered cell or None, decoded cell, target cell) per trial. Error trials have an answered
    cell other than the target's; among those whose decoded cell is also wrong, the fraction answering the object
    at the decoded cell, and chance 1 / (n_objects - 1)."""
    errors = [r for r in records if r[0] is not None and r[0] != r[2]]
    wrong = [r for r in errors if r[1] != r[2]]
    match = sum(r[0] == r[1] for r in wrong)
    return {"n_trials": len(records), "n_error": len(errors), "n_error_decoded_wrong": len(wrong), "n_match": match,
            "fraction": match / len(wrong) if wrong else float("nan"), "chance": 1.0 / (n_objects - 1)}


def permutation_null(records: list[tuple], n_perm: int, seed: int = 0) -> dict:
    """The tracing fraction with decoded cells shuffled across the error trials: null mean, 95% range, p."""
    errors = [r for r in records if r[0] is not None and r[0] != r[2]]
    obs = error_tracing(records, 2)["fraction"]
    if len(errors) < 2 or not np.isfinite(obs):
        return {"null_mean": float("nan"), "null_low": float("nan"), "null_high": float("nan"), "p": float("nan")}
    rng = np.random.default_rng(seed)
    ans = [r[0] for r in errors]
    dec = [r[1] for r in errors]
    tgt = [r[2] for r in errors]
    null = []
    for _ in range(n_perm):
        perm = rng.permutation(len(dec))
        f = error_tracing([(a, dec[j], t) for a, j, t in zip(ans, perm, tgt)], 2)["fraction"]
        if np.isfinite(f):
            null.append(f)
    if not null:
        return {"null_mean": float("nan"), "null_low": float("nan"), "null_high": float("nan"), "p": float("nan")}
    lo, hi = np.quantile(null, [0.025, 0.975])
    return {"null_mean": float(np.mean(null)), "null_low": float(lo), "null_high": float(hi),
            "p": float(empirical_pvalue(obs, null))}


def probe_features(X_high: np.ndarray, X_low: np.ndarray, fit, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Both sets projected on the top ``dims`` principal components of the probe's fitting rows (0: unchanged)."""
    Xf = X_high[fit]
    k = min(dims, Xf.shape[0], Xf.shape[1])
    if dims <= 0 or k >= X_high.shape[1] or k < 1 or Xf.shape[0] < 2:
        return X_high, X_low
    _, comps, _ = pca(Xf, k)
    mu = Xf.mean(0)
    return (X_high - mu) @ comps.T, (X_low - mu) @ comps.T


def decode_cells(X_high, y_high, fit, X_low, folds: int = 5, l2: float = 1e-3, dims: int = 128, seed: int = 0):
    """Fit the position-ID probe on the ``fit`` rows of X_high (labels y_high) and decode X_low: returns
    ((cross-validated accuracy, its standard error), decoded labels of X_low)."""
    X_high, X_low = probe_features(X_high, X_low, fit, dims)
    folds = min(folds, int(np.sum(fit)))
    cv = probe_accuracy(X_high[fit], y_high[fit], folds=folds, seed=seed, l2=l2) if folds >= 2 else (np.nan, np.nan)
    return cv, fit_probe(X_high[fit], y_high[fit], l2=l2)(X_low)


def _outcomes(trials: list[Trial], r, prefix: str) -> list[dict]:
    rows = []
    for i, t in enumerate(trials):
        row = {f"{prefix}_first_token": int(r.cand_hit[i, 0])}
        if r.texts is not None:
            row[f"{prefix}_generated"] = r.texts[i]
            row[f"{prefix}_generation"] = int(answers.is_correct(t, r.texts[i]))
            cell = answered_cell(t, r.texts[i])
            row[f"{prefix}_answered_cell"] = "" if cell is None else f"{cell[0]},{cell[1]}"
        rows.append(row)
    return rows


def _cell(s: str):
    return None if s == "" else tuple(int(x) for x in s.split(","))


@F.paper_style
def plot(st) -> dict:
    """Figure ``binding_errors`` from the stored tables: Table 1's accuracies, and the error tracing against
    chance and its permutation null."""
    table, tracing, k = st.table("binding_errors"), st.table("binding_errors_tracing"), len(st.summary["heads"])
    fig, axes = F.figure(2, 1, w=3.2, h=2.6, gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0, 0]
    measures = [m for m in ("first_token", "generation") if F.where(table, measure=m)]
    colours = {"high": F.ROLE["high"], "low": F.ROLE["low"], "low+patch": F.ROLE["patch"],
               "low+control": F.ROLE["control"]}
    names = {"low+patch": "low + ID patch", "low+control": "low + wrong-cell patch"}
    series = {}
    for cond in CONDITIONS:
        got = [F.where(table, condition=cond, measure=m, stat="accuracy")[0] for m in measures]
        series[names.get(cond, f"{cond} entropy")] = tuple(F.column(got, c) for c in ("value", "ci_low", "ci_high"))
    F.bars(ax, [m.replace("_", "-") for m in measures], series,
           {names.get(c, f"{c} entropy"): colours[c] for c in CONDITIONS}, "Accuracy")
    ax.set_ylim(0, 1)
    n = F.where(table, condition="low", stat="accuracy")[0]["n"]
    ax.set_title(f"Table 1: top-{k} ID-selection heads (n={n} per condition)")
    F.legend_below(ax, ncol=2, drop=0.3)  # under the axes: it covers no bar
    ax = axes[0, 1]
    tr = (F.where(tracing, measure="answer_is_object_at_decoded_cell") or [{}])[0]
    nan = float("nan")
    get = {c: (nan if tr.get(c, "") == "" else tr[c]) for c in ("value", "ci_low", "ci_high", "chance",
                                                                 "permutation_mean", "permutation_low",
                                                                 "permutation_high")}
    chance = get["chance"] if get["chance"] == get["chance"] else 1 / (st.summary["grid"][0] * st.summary["grid"][1] - 1)
    vals = [get["value"], chance, get["permutation_mean"]]
    # a percentile interval of a discrete null need not contain its mean: draw only the part on each side
    err = F.error(vals, [get["ci_low"], chance, get["permutation_low"]], [get["ci_high"], chance, get["permutation_high"]])
    ax.bar(range(3), np.nan_to_num(vals), yerr=err, capsize=2, color=[F.PALETTE["vermillion"], F.ROLE["control"],
                                                                     F.ROLE["none"]], error_kw={"lw": 0.8})
    ax.set_xticks(range(3), ["answer = object\nat decoded cell", "chance\n1/(N-1)", "permutation\nnull"])
    ax.set_ylabel("Fraction of error trials")
    ax.set_ylim(0, 1)
    n_err = int(tr.get("n") or 0)
    ax.set_title(f"Error tracing (n={n_err} errors,\ndecoded ID wrong)")
    if not n_err:
        ax.text(0, 0.5, "no error trials\nwith a wrong\ndecoded ID", ha="center")
    fig.tight_layout()
    return {"binding_errors": fig}


def run(ctx: Context, heads=None) -> dict:
    vlm, grid, seed = ctx.vlm, tuple(ctx.opt("grid")), ctx.seed
    heads, source = select_heads(ctx, ctx.opt("k"), heads)
    n = int(ctx.opt("n"))
    high, low = entropy_set(grid, "high", k=n, seed=seed), entropy_set(grid, "low", k=n, seed=seed + 1)
    cells = all_cells(grid)
    rng = random.Random(seed + 3)
    control = [rng.choice([c for c in cells if c != t.target.cell]) for t in low]
    gen = evaluate.GEN_TOKENS["scene_description"] if ctx.opt("generate") else 0
    kw = dict(gen_tokens=gen, batch_size=ctx.batch_size)

    def compute():
        with ctx.progress(len(high) + 3 * len(low), "binding-errors") as update:
            rh = run_heads(vlm, high, heads, candidates=[[t.answer] for t in high], capture=True, progress=update,
                           **kw)
            protos, fallback = prototypes(rh.z, [t.target.cell for t in high], rh.cand_hit[:, 0])
            cand = [[t.answer] for t in low]
            rl = run_heads(vlm, low, heads, candidates=cand, capture=True, progress=update, **kw)
            patch = np.stack([protos[t.target.cell] for t in low])
            rp = run_heads(vlm, low, heads, patch, "set", cand, progress=update, **kw)
            rc = run_heads(vlm, low, heads, np.stack([protos[c] for c in control]), "set", cand, progress=update, **kw)
        return rh, rl, rp, rc, fallback

    rh, rl, rp, rc, fallback = ctx.unit(ctx.unit_key(NAME, heads=heads), compute)

    # (c) the probe: fit on correct high-entropy trials, decode the low-entropy ones
    index = {c: i for i, c in enumerate(cells)}
    y_high = np.array([index[t.target.cell] for t in high])
    correct_high = rh.cand_hit[:, 0]
    fit = correct_high if len(np.unique(y_high[correct_high])) >= 2 else np.ones(len(high), bool)
    cv, decoded = decode_cells(rh.z.reshape(len(high), -1), y_high, fit, rl.z.reshape(len(low), -1),
                               int(ctx.opt("folds")), float(ctx.opt("l2")), int(ctx.opt("probe_dims")), seed)

    rows = []
    for i, (t, o) in enumerate(zip(high, _outcomes(high, rh, "baseline"))):
        rows.append({"set": "high", "trial": i, "target_cell": "{},{}".format(*t.target.cell), "answer": t.answer,
                     **o})
    outs = [_outcomes(low, r, p) for r, p in ((rl, "baseline"), (rp, "patch"), (rc, "control"))]
    for i, t in enumerate(low):
        rows.append({"set": "low", "trial": i, "target_cell": "{},{}".format(*t.target.cell), "answer": t.answer,
                     "control_cell": "{},{}".format(*control[i]), "decoded_cell": "{},{}".format(*cells[decoded[i]]),
                     **outs[0][i], **outs[1][i], **outs[2][i]})
    hi_rows, lo_rows = rows[:len(high)], rows[len(high):]

    # (b) Table 1
    table = []
    measures = ["first_token"] + (["generation"] if gen else [])
    for m in measures:
        cols = {"high": [r[f"baseline_{m}"] for r in hi_rows], "low": [r[f"baseline_{m}"] for r in lo_rows],
                "low+patch": [r[f"patch_{m}"] for r in lo_rows], "low+control": [r[f"control_{m}"] for r in lo_rows]}
        for cond, v in cols.items():
            table.append({"condition": cond, "measure": m, "stat": "accuracy", **rate(sum(v), len(v))})
        for cond in ("low+patch", "low+control"):
            table.append({"condition": f"{cond}-low", "measure": m, "stat": "accuracy_change",
                          **paired_diff(cols[cond], cols["low"], seed)})
    if gen:
        hits = [int(r["control_answered_cell"] == r["control_cell"]) for r in lo_rows]
        base = [int(r["baseline_answered_cell"] == r["control_cell"]) for r in lo_rows]
        table.append({"condition": "low+control", "measure": "generation", "stat": "control_object_rate",
                      **rate(sum(hits), len(hits))})
        table.append({"condition": "low", "measure": "generation", "stat": "control_object_rate",
                      **rate(sum(base), len(base))})

    # (c) tracing on the unedited low-entropy trials
    trace_rows, trace = [], {}
    dec_ok = [r["decoded_cell"] == r["target_cell"] for r in lo_rows]
    trace_rows.append({"measure": "probe_cv_accuracy_high", "value": float(cv[0]), "se": float(cv[1]),
                       "n": int(fit.sum()), "chance": chance_accuracy(y_high[fit])})
    trace_rows.append({"measure": "decoded_accuracy_low", **rate(sum(dec_ok), len(dec_ok)), "chance": 1 / len(cells)})
    if gen:
        records = [(_cell(r["baseline_answered_cell"]), _cell(r["decoded_cell"]), _cell(r["target_cell"]))
                   for r in lo_rows]
        correct = [r[0] == r[2] for r in records]
        error = [r[0] is not None and r[0] != r[2] for r in records]
        for name, mask in (("decoded_accuracy_correct_trials", correct), ("decoded_accuracy_error_trials", error)):
            k_ = sum(d for d, m in zip(dec_ok, mask) if m)
            trace_rows.append({"measure": name, **rate(k_, sum(mask)), "chance": 1 / len(cells)})
        trace = error_tracing(records, len(cells))
        ci = rate(trace["n_match"], trace["n_error_decoded_wrong"])
        trace.update(ci_low=ci["ci_low"], ci_high=ci["ci_high"])
        trace.update(permutation_null(records, int(ctx.opt("n_perm")), seed))
        trace_rows.append({"measure": "answer_is_object_at_decoded_cell", "n": trace["n_error_decoded_wrong"],
                           "value": trace["fraction"], "ci_low": trace["ci_low"], "ci_high": trace["ci_high"],
                           "chance": trace["chance"], "permutation_mean": trace["null_mean"],
                           "permutation_low": trace["null_low"], "permutation_high": trace["null_high"],
                           "p_permutation": trace["p"]})
    for r in table + trace_rows:
        r.update(grid=f"{grid[0]}x{grid[1]}", k=len(heads))
    ctx.save_table("binding_errors_trials", rows)
    ctx.save_table("binding_errors", table)
    ctx.save_table("binding_errors_tracing", trace_rows)
    pick = {f"{r['condition']}_{r['measure']}_{r['stat']}": {k: r[k] for k in ("n", "value", "ci_low", "ci_high")}
            for r in table}
    return {"head_source": source, "grid": list(grid), "n_per_combination": n, **pick,
            "tracing": {r["measure"]: {k: v for k, v in r.items() if k not in ("measure", "grid", "k")}
                        for r in trace_rows},
            "prototype_fallback_cells": [list(c) for c in fallback],
            "probe_fit_on": "correct high-entropy trials" if fit is correct_high
            else "all high-entropy trials (too few correct)",
            "note": "" if gen else "generate=False: no generation accuracy and no error tracing",
            "heads": [list(h) for h in heads]}


def caption(summary: dict) -> str:
    m = "generation" if "low_generation_accuracy" in summary else "first_token"
    d = summary[f"low+patch-low_{m}_accuracy_change"]
    text = (f"{m.replace('_', '-')} accuracy: high entropy {pct(summary[f'high_{m}_accuracy'])}, low "
            f"{pct(summary[f'low_{m}_accuracy'])}, low + prototype patch {pct(summary[f'low+patch_{m}_accuracy'])} "
            f"(change {100 * d['value']:+.1f} points [{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}]), "
            f"wrong-cell patch {pct(summary[f'low+control_{m}_accuracy'])}.")
    tr = summary["tracing"].get("answer_is_object_at_decoded_cell")
    if tr and tr["n"]:
        null = tr["permutation_mean"]
        perm = (f"permutation null {100 * null:.0f}%, p = {tr['p_permutation']:.3g}" if null == null else
                "no permutation null: it needs 2 or more error trials")
        text += (f" On {tr['n']} error trial{'s' if tr['n'] != 1 else ''} with a wrongly decoded ID, the answer named "
                 f"the object at the decoded cell in {100 * tr['value']:.0f}% [{100 * tr['ci_low']:.0f}, "
                 f"{100 * tr['ci_high']:.0f}] (chance {100 * tr['chance']:.0f}%, {perm}).")
    return text
