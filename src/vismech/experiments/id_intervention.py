"""``id-intervention``: steer the answer by adding position-ID vectors to the top CMA heads (§4.2, Fig. 3).

The paper edits Qwen/LLaVA on PUG photographs of two animals whose IDs are left (0) and right (1). By default the
scenes are vismech's synthetic 2-object scene-description trials ("In this image there is a {A} and a" -> B) on a 1x2
grid (``grid``), so the two objects are likewise left and right; the ID of an object is its cell (with a larger grid,
every cell is an ID). Colours and shapes of the two objects are distinct (``entropy="high"``), so their first answer
tokens differ. ``--set stimuli=photoreal`` uses photorealistic renders in the paper's PUG design instead (two objects,
left = cell (0, 0) = ID 0, right = ID 1, three environments, jittered positions; ``scenes.photoreal``), and a folder
path a user's own two-object trials (``experiments.sources``); the CMA ranking still comes from the run's ``cma``.

For each CMA condition the top-K heads (``cma_scores(ctx)``, computed if this run has not) are edited:
õ_h = o_h + alpha (d_target - d_original), with d_i the mean activation over the estimation split where the
relevant object has ID i (``interventions.id_vectors``):

- ID retrieval heads: outputs (``z``) at the described object A's mention tokens; relevant object A; original =
  A's cell, target = B's cell (the mention now points at B, so the model should name A as the missing one);
- ID selection heads: outputs at the last token; relevant object the target B; original = B's cell, target = A's;
- feature retrieval heads: queries (``q``, before RoPE) at the last token, as the paper does because these heads
  use the ID as their query; same IDs as ID selection.

Every edit predicts the same thing: the model repeats A. Efficacy = fraction of held-out trials whose answer is A
(A's colour word is the greedy answer: its first token the arg-max, or under the ``sequence`` rule every token of
it, ``models.answers``), with a Wilson 95% interval; the baseline rate (no edit) and a control (the same edit
with a random direction of equal norm per head, ``interventions.additive_edits(direction="random")``) are reported
at every (K, alpha). The estimation and held-out splits are disjoint (``n_estimate``, ``n``). The best (K, alpha) is
picked on the held-out split itself, as the paper reports its best setting; it is optimistic by the selection.

Options: ``n`` held-out trials (64), ``n_estimate`` (64), ``grid`` ((1, 2)), ``k_grid`` (None: the paper's
{1, 2, 5, 10, 20, 50, 100, 200} up to half the model's heads), ``alphas`` (1 ... 100, log grid), ``conditions``,
``cma_n`` (pairs per CMA condition if this experiment computes CMA, 50), ``stimuli`` ("grid"), ``photoreal`` (render
settings, ``experiments.sources``).
"""

from __future__ import annotations

import itertools

import numpy as np

from vismech.engine import interventions as iv
from vismech.analysis.stats import rate
from vismech.errors import UserError
from vismech.engine.mediation import condition_positions
from vismech.experiments.cma import LABELS, cma_scores
from vismech.experiments import figures as F
from vismech.experiments.common import Context
from vismech.experiments.sources import source
from vismech.scenes.counterfactual import CONDITIONS

NAME = "id-intervention"
DESCRIPTION = "Add alpha*(d_target - d_original) position-ID vectors to the top-K heads of each CMA stage (Fig. 3)"
DEFAULTS = {"n": 64, "n_estimate": 64, "grid": (1, 2), "k_grid": None, "alphas": [1, 2, 5, 10, 20, 50, 100],
            "conditions": list(CONDITIONS), "cma_n": 50, "stimuli": "grid", "photoreal": {}}
SITE = {"id_retrieval": "z", "id_selection": "z", "feature_retrieval": "q"}
PAPER_K = (1, 2, 5, 10, 20, 50, 100, 200)


def k_grid(n_heads_total: int) -> list[int]:
    """The paper's K values that fit in half the model's heads (at least K = 1)."""
    return [k for k in PAPER_K if k <= max(1, n_heads_total // 2)]


def id_labels(trial, condition: str) -> tuple[tuple, tuple]:
    """(original ID, target ID) of the edit: the relevant object's cell, and the other object's."""
    a, b = tuple(trial.mentioned[0].cell), tuple(trial.target.cell)
    return (a, b) if condition == "id_retrieval" else (b, a)


def two_object_trials(ctx: Context, n: int, what: str):
    """The experiment's estimation + held-out trials from its ``stimuli`` source, and that source."""
    src = source(ctx.options)
    trials = src.two_object_trials(ctx.vlm, n, ctx.opt("grid"), ctx.seed, what, progress=ctx.show_progress)
    ctx.shared.setdefault("render_seconds", []).extend(src.seconds)
    return trials, src


def edit_hits(vlm, held, vecs: dict, head_sets: dict, alphas, batch_size: int, seed: int, update=None,
              directions=("id", "random")) -> tuple[dict, int, int]:
    """Run the additive ID edit of every head set on the held-out trials: ``head_sets`` maps (condition, tag) to
    a list of (layer, head) (``vecs[condition]`` must cover them); returns hits[((condition, tag), alpha,
    direction)] (trials whose first-token arg-max is the described object A's), and the unedited counts of A and of
    the right answer. A random direction is drawn per call with seed ``seed + len(heads)``."""
    conds = sorted({c for c, _ in head_sets})
    hits = {(key, a, d): 0 for key in head_sets for a in alphas for d in directions}
    base_pred = base_orig = 0
    for s in range(0, len(held), batch_size):
        chunk = held[s:s + batch_size]
        b = vlm.encode(chunk)
        pos = {c: condition_positions(b, c) for c in conds}
        # candidates: the repeated object A (what every edit predicts), then the true answer B
        answers = vlm.answers(b, [[t.mentioned[0].name, t.answer] for t in chunk])
        runs = iv.EditedRuns(vlm, b, first_position=min(p for c in conds for ps in pos[c] for p in ps),
                             answers=answers)
        clean = runs.scores().greedy
        base_pred += int(clean[:, 0].sum())
        base_orig += int(clean[:, 1].sum())
        keys, edit_sets = [], []
        for (c, tag), heads in head_sets.items():
            labels = [id_labels(t, c) for t in chunk]
            for a in alphas:
                for d in directions:
                    keys.append(((c, tag), a, d))
                    edit_sets.append(iv.additive_edits(vecs[c], [x[0] for x in labels], [x[1] for x in labels],
                                                       pos[c], a, heads=heads, direction=d, seed=seed + len(heads)))
        for key, sc in zip(keys, runs.scores_many(edit_sets)):  # every setting of the chunk in stacked forwards
            hits[key] += int(sc.greedy[:, 0].sum())
        if update:
            update(len(chunk) * len(keys))
    return hits, base_pred, base_orig


def _best(rows: list[dict], condition: str) -> dict:
    cand = [r for r in rows if r["condition"] == condition and r["direction"] == "id"]
    return max(cand, key=lambda r: (r["value"], -r["alpha"], -r["k"]))


@F.paper_style
def plot(st) -> dict:
    """Figures ``id_intervention_surface`` (efficacy over K x alpha per condition) and ``id_intervention_best``
    (the best setting per condition against a random direction and no edit) from the stored table."""
    rows, sm = st.table("id_intervention"), st.summary
    conds = [c for c in CONDITIONS if c in sm["best"]]
    ks, alphas = sm["k_grid"], sm["alphas"]
    fig, axes = F.figure(len(conds), 1, w=2.3, h=2.3, sharey=True)
    im = None
    for i, (ax, c) in enumerate(zip(axes[0], conds)):
        grid = np.full((len(ks), len(alphas)), np.nan)
        for r in F.where(rows, condition=c, direction="id"):
            grid[ks.index(r["k"]), alphas.index(r["alpha"])] = 100 * r["value"]
        im = ax.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=100, cmap="viridis")
        for y, x in itertools.product(range(len(ks)), range(len(alphas))):
            ax.text(x, y, f"{grid[y, x]:.0f}", ha="center", va="center", fontsize=5.5,
                    color="white" if grid[y, x] < 60 else "black")
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("α")
        if i == 0:  # shared y axis: one label, so no tick labels run into the panel on the left
            ax.set_ylabel("K (top heads)")
        ax.set_title(LABELS[c])
    fig.colorbar(im, ax=list(axes[0]), label="Intervention efficacy (%)", shrink=0.9)
    figs = {"id_intervention_surface": fig}

    fig, axes = F.figure(1, 1, w=1.2 * len(conds) + 1.4, h=2.6)
    ax = axes[0, 0]
    series = {}
    for key, label in (("id", "ID edit"), ("random", "random direction"), ("base", "no edit")):
        got = []
        for c in conds:
            b = sm["best"][c]
            if key == "base":
                got.append({"value": sm["baseline_repeat_rate"]["value"],
                            "ci_low": sm["baseline_repeat_rate"]["ci_low"],
                            "ci_high": sm["baseline_repeat_rate"]["ci_high"]})
            else:
                got.append(F.where(rows, condition=c, direction=key, k=b["k"], alpha=b["alpha"])[0])
        series[label] = tuple(F.column(got, k) for k in ("value", "ci_low", "ci_high"))
    F.bars(ax, [f"{LABELS[c]}\nK={sm['best'][c]['k']}, α={sm['best'][c]['alpha']:g}" for c in conds], series,
           {"ID edit": F.ROLE["edit"], "random direction": F.ROLE["control"], "no edit": F.ROLE["none"]},
           "Intervention efficacy", f"Position-ID interventions ({st.model}, n={sm['n_heldout']})")
    ax.set_ylim(0, 1.05)
    F.legend_below(ax, ncol=3, drop=0.45)
    fig.tight_layout()
    figs["id_intervention_best"] = fig
    return figs


def run(ctx: Context) -> dict:
    vlm, conds = ctx.vlm, list(ctx.opt("conditions"))
    res = cma_scores(ctx)
    total = vlm.n_layers * vlm.n_heads
    ks = sorted(ctx.opt("k_grid") or k_grid(total))
    if max(ks) > total:
        raise UserError(f"K = {max(ks)} exceeds the model's {total} heads")
    alphas = [float(a) for a in ctx.opt("alphas")]
    n_est, n = ctx.opt("n_estimate"), ctx.opt("n")
    trials, src = two_object_trials(ctx, n_est + n, NAME)
    est, held = trials[:n_est], trials[n_est:]
    top, vecs = {}, {}
    for c in conds:
        top[c] = res.top_k(c, max(ks))
        vecs[c] = iv.id_vectors(vlm, est, [id_labels(t, c)[0] for t in est], SITE[c], top[c],
                                lambda b, c=c: condition_positions(b, c), ctx.batch_size)
    head_sets = {(c, k): top[c][:k] for c in conds for k in ks}

    def compute():
        with ctx.progress(len(head_sets) * len(alphas) * 2 * len(held), "id-intervention") as update:
            hits, base_pred, base_orig = edit_hits(vlm, held, vecs, head_sets, alphas, ctx.batch_size, ctx.seed,
                                                   update)
        return {(c, k, a, d): h for ((c, k), a, d), h in hits.items()}, base_pred, base_orig

    key = ctx.unit_key(NAME, heads=sorted(head_sets.items()), conditions=conds, stimuli=src.tag)
    hits, base_pred, base_orig = ctx.unit(key, compute)
    base = rate(base_pred, n)
    rows = []
    for (c, k, a, d), h in hits.items():
        w = rate(h, n)
        rows.append({"measure": "efficacy", **w, "condition": c, "site": SITE[c], "k": k, "alpha": a,
                     "direction": d, "baseline_rate": base["value"], "baseline_ci_low": base["ci_low"],
                     "baseline_ci_high": base["ci_high"]})
    ctx.save_table("id_intervention", rows)
    best = {c: _best(rows, c) for c in conds}
    ids = (f"object cells on a {ctx.opt('grid')[0]}x{ctx.opt('grid')[1]} grid (PUG: left/right)" if src.kind == "grid"
           else "left = ID (0, 0), right = ID (0, 1), as in the paper's PUG images" if src.kind == "photoreal"
           else "the stimulus folder's object IDs")
    summary = {"ids": ids, "stimuli": src.describe(),
               "n_heldout": n, "n_estimate": n_est, "k_grid": ks, "alphas": alphas,
               "baseline_repeat_rate": base, "baseline_accuracy": rate(base_orig, n), "best": {}}
    for c in conds:
        b = best[c]
        ctl = next(r for r in rows if r["condition"] == c and r["direction"] == "random" and r["k"] == b["k"]
                   and r["alpha"] == b["alpha"])
        summary["best"][c] = {"k": b["k"], "alpha": b["alpha"], "site": SITE[c], "efficacy": b["value"],
                              "ci": [b["ci_low"], b["ci_high"]], "random_direction_efficacy": ctl["value"],
                              "random_direction_ci": [ctl["ci_low"], ctl["ci_high"]], "n": n}
    return summary


def report_rows(st):
    """For the report: the best K and alpha of each condition, with its random-direction control."""
    rows, sm = st.table("id_intervention"), st.summary
    out = []
    for c, b in sm["best"].items():
        out += [{k: r[k] for k in ("condition", "k", "alpha", "direction", "measure", "value", "ci_low", "ci_high",
                                   "n")} for r in F.where(rows, condition=c, k=b["k"], alpha=b["alpha"])]
    return "Best setting per condition", out, "results/id_intervention.csv (every K and alpha)"


def caption(summary: dict) -> str:
    parts = [f"{LABELS[c]} {100 * b['efficacy']:.0f}% (K={b['k']}, α={b['alpha']:g}; random direction "
             f"{100 * b['random_direction_efficacy']:.0f}%)" for c in CONDITIONS if (b := summary["best"].get(c))]
    return f"Best efficacy on n={summary['n_heldout']} held-out trials: " + "; ".join(parts) + "."
