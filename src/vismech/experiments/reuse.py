"""``reuse`` (§4.4, Fig. 5): position IDs estimated on scene description steer the spatial-relation task.

ID vectors: d_desc^i = the mean output (site ``z``, the o_proj input) of each of the top-K ID-selection heads at the
last token, over scene-description contexts whose target sits at cell i (``interventions.id_vectors``). On the
spatial-relation task (``scenes.sets.spatial_relation_set``, "what is the color of the object directly {relation}
of the {ref}") the same heads at the last token get a *pure addition*, o_h + alpha * d_desc^{i*}, where i* is the
cell of the object that answers the question. Accuracy before vs after, per relation, with Wilson 95% intervals,
and the paired difference (after - before) with a percentile bootstrap interval over trials.

Control (not in the paper): the same addition with the ID vector of a *wrong* cell c' (uniform over the other
cells, drawn per trial from the run seed). It should lower accuracy or move answers toward the object at c'; the
"control-object rate" (how often the answer is the colour of the object at c') is reported for the control
intervention and, as its baseline, for the unedited run on the same trials.

Measures: ``first_token`` (the colour is the greedy answer: the arg-max over the whole vocabulary of the last-token
logits is its first token, or under the ``sequence`` rule of ``models.answers`` every token of it) and, with option ``generate``, ``generation`` (greedy decoding, parsed by ``scenes.answers``). The edit is
applied at the prompt's last position only; during generation it acts in the prefill forward, and later tokens see
it through the cached keys and values.

Choices where the paper is silent, with their options: the estimation contexts are the K x N x N scene-description
protocol on the same grid (``scenes.sets.knn_protocol``, one unique colour and shape per object), ``n_estimate``
contexts per target cell spread evenly over target identities (default 18); ``n`` is the number of spatial-relation
trials *per relation* (the set's relations are drawn at random; trials are taken in order until each relation has
``n``); ``k`` heads (default 100 as in the paper, capped at the model's head count); ``alpha`` (2, the paper's);
``grid`` (3x3; the paper does not state it). ``heads`` (a list of [layer, head]) replaces the CMA ranking, which is
otherwise ``experiments.cma.cma_scores(ctx).top_k("id_selection", k)`` (its options via ``cma_n``, ``cma_grid``).

The heads come from ``experiments.cma.select_heads``; the edits are ``engine.edits.run_heads`` (capture and/or
set/add per-row values of a head list at the last token, with candidate scores, arg-max and optional generation).
"""

from __future__ import annotations

import random

import numpy as np

from vismech.analysis.stats import paired_diff, rate
from vismech.engine import interventions
from vismech.engine.edits import Head, run_heads
from vismech.errors import UserError
from vismech.engine import evaluate
from vismech.experiments import cma
from vismech.experiments.cma import select_heads
from vismech.experiments import figures as F
from vismech.experiments.common import Context, pct
from vismech.experiments.options import Opt
from vismech.scenes import answers
from vismech.scenes.core import Trial
from vismech.scenes.sets import all_cells, knn_protocol, spatial_relation_set
from vismech.scenes.vocab import COLORS, RELATIONS, SHAPES

NAME = "reuse"
DESCRIPTION = "Fig. 5: scene-description position IDs added to ID-selection heads steer the spatial-relation task"
DEFAULTS = {"n": 16, "grid": (3, 3), "k": 100, "alpha": 2.0, "n_estimate": 18, "heads": None, "generate": True,
            "cma_n": cma.DEFAULTS["n"], "cma_grid": cma.DEFAULTS["grid"]}
LIMITS = {"grid": Opt("grid", 2, len(SHAPES))}  # one shape per cell (relation_trials)


def estimation_trials(grid: tuple[int, int], per_cell: int, seed: int) -> list[Trial]:
    """``per_cell`` scene-description contexts per target cell, spread evenly over target identities."""
    cells = all_cells(grid)
    N = len(cells)
    if N > len(SHAPES):
        raise UserError(f"a {grid[0]}x{grid[1]} grid needs {N} unique shapes; there are {len(SHAPES)}")
    conj = list(zip(list(COLORS)[:N], SHAPES[:N]))
    pool = knn_protocol(conj, cells, grid, -(-per_cell // N), seed)
    pool.sort(key=lambda t: (t.meta["trial"], t.meta["target_index"]))
    out = []
    for cell in cells:
        out += [t for t in pool if tuple(t.meta["target_cell"]) == cell][:per_cell]
    return out


def relation_trials(n_per_relation: int, grid: tuple[int, int], seed: int) -> list[Trial]:
    """Spatial-relation trials, the first ``n_per_relation`` of each relation in the set's order."""
    m = 8 * n_per_relation
    while True:
        pool = spatial_relation_set(m, seed, grid)
        out = {r: [t for t in pool if t.meta["relation"] == r][:n_per_relation] for r in RELATIONS}
        if all(len(v) == n_per_relation for v in out.values()) or m > 10_000 * max(1, n_per_relation):
            return [t for r in RELATIONS for t in out[r]]
        m *= 2


def control_cells(trials: list[Trial], seed: int) -> list[tuple[int, int]]:
    """A wrong cell per trial: uniform over the grid's cells other than the answer's."""
    rng = random.Random(seed)
    return [rng.choice([c for c in all_cells(t.scene.grid) if c != t.target.cell]) for t in trials]


def steer(vlm, trials: list[Trial], heads: list[Head], vectors: dict, cells: list, alpha: float,
          controls: list, batch_size: int = 16, gen_tokens: int = 0, progress=None) -> list[dict]:
    """Add alpha * vectors[cells[i]] at the heads for trial i; per-trial outcome rows (answer and control)."""
    values = None if alpha is None else alpha * np.stack([vectors[c] for c in cells])
    cand = [[t.answer, t.scene.at(c).color] for t, c in zip(trials, controls)]
    r = run_heads(vlm, trials, heads, values, "add", cand, gen_tokens=gen_tokens, batch_size=batch_size,
                  progress=progress)
    rows = []
    for i, (t, c) in enumerate(zip(trials, controls)):
        row = {"trial": i, "relation": t.meta["relation"], "target_cell": f"{t.target.cell[0]},{t.target.cell[1]}",
               "control_cell": f"{c[0]},{c[1]}", "answer": t.answer, "control_answer": t.scene.at(c).color,
               "first_token_correct": int(r.cand_hit[i, 0]),
               "first_token_control": int(r.cand_hit[i, 1])}
        if r.texts is not None:
            parsed = answers.parse(t, r.texts[i])
            row.update(generated=r.texts[i], parsed=parsed or "", generation_correct=int(parsed == t.answer),
                       generation_control=int(parsed == row["control_answer"]))
        rows.append(row)
    return rows


def summarize(rows: list[dict], seed: int = 0) -> list[dict]:
    """Accuracy and control-object rate per condition x relation x measure; paired differences vs baseline."""
    out = []
    measures = [m for m in ("first_token", "generation") if f"{m}_correct" in rows[0]]
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    for rel in [*RELATIONS, "all"]:
        sub = [r for r in rows if rel == "all" or r["relation"] == rel]
        for m in measures:
            base = [r for r in sub if r["condition"] == "baseline"]
            for cond in conds:
                rs = [r for r in sub if r["condition"] == cond]
                for stat, col in (("accuracy", f"{m}_correct"), ("control_object_rate", f"{m}_control")):
                    vals = [r[col] for r in rs]
                    out.append({"relation": rel, "condition": cond, "measure": m, "stat": stat,
                                **rate(sum(vals), len(vals))})
                    if cond != "baseline" and len(base) == len(rs):
                        out.append({"relation": rel, "condition": f"{cond}-baseline", "measure": m, "stat": stat,
                                    **paired_diff(vals, [r[col] for r in base], seed)})
    return out


@F.paper_style
def plot(st) -> dict:
    """Figure ``reuse`` from the stored table: first-token accuracy and wrong-cell answers per relation, before,
    after the ID edit and with a wrong cell's ID."""
    table, sm = st.table("reuse"), st.summary
    alpha, k = sm["alpha"], len(sm["heads"])
    rels = [*RELATIONS, "all"]
    conds = [("baseline", "Before", F.ROLE["none"]), ("target_id", f"After (+{alpha:g} d)", F.ROLE["edit"]),
             ("control_id", "Control (wrong-cell d)", F.ROLE["top"])]
    fig, axes = F.figure(2, 1, w=3.4, h=2.6)
    for ax, stat, ylabel in ((axes[0, 0], "accuracy", "Accuracy"),
                             (axes[0, 1], "control_object_rate", "Answer = wrong cell's object")):
        series = {}
        for cond, label, _ in conds:
            got = [F.where(table, measure="first_token", stat=stat, condition=cond, relation=r)[0] for r in rels]
            series[label] = tuple(F.column(got, c) for c in ("value", "ci_low", "ci_high"))
        F.bars(ax, [r.capitalize() for r in rels], series, {label: c for _, label, c in conds}, ylabel)
        ax.set_ylim(0, 1)
    n = F.where(table, relation="above", condition="baseline")[0]["n"]
    axes[0, 0].set_title(f"Top-{k} ID-selection heads (n={n} per relation)")
    axes[0, 1].set_title("Control: ID of a wrong cell")
    F.legend_below(axes[0, 0], ncol=3, drop=0.35)
    fig.tight_layout()
    return {"reuse": fig}


def run(ctx: Context, heads=None) -> dict:
    vlm, grid, alpha = ctx.vlm, tuple(ctx.opt("grid")), float(ctx.opt("alpha"))
    heads, source = select_heads(ctx, ctx.opt("k"), heads)
    est = estimation_trials(grid, int(ctx.opt("n_estimate")), ctx.seed)
    evals = relation_trials(int(ctx.opt("n")), grid, ctx.seed + 1)
    controls = control_cells(evals, ctx.seed + 2)
    gen = evaluate.GEN_TOKENS["spatial_relation"] if ctx.opt("generate") else 0

    def compute():
        with ctx.progress(len(est) + 3 * len(evals), "reuse") as update:
            vecs = interventions.id_vectors(vlm, est, [t.target.cell for t in est], "z", heads,
                                            lambda b: [[b.last]] * len(b), ctx.batch_size)
            vectors = {c: vecs.d(c).numpy() for c in vecs.labels}
            update(len(est))
            rows = []
            for cond, cells, a in (("baseline", [t.target.cell for t in evals], None),
                                   ("target_id", [t.target.cell for t in evals], alpha),
                                   ("control_id", controls, alpha)):
                for r in steer(vlm, evals, heads, vectors, cells, a, controls, ctx.batch_size, gen, update):
                    rows.append({"condition": cond, **r})
        return vectors, rows

    vectors, rows = ctx.unit(ctx.unit_key(NAME, heads=heads), compute)
    table = summarize(rows, ctx.seed)
    for r in table:
        r.update(alpha=alpha, k=len(heads))
    ctx.save_table("reuse_trials", rows)
    ctx.save_table("reuse", table)
    pick = {(r["condition"], r["measure"], r["stat"]): r for r in table if r["relation"] == "all"}
    summary = {"head_source": source, "alpha": alpha, "grid": list(grid), "n_per_relation": int(ctx.opt("n")),
               "n_estimate_per_cell": int(ctx.opt("n_estimate"))}
    for key in (("baseline", "first_token", "accuracy"), ("target_id", "first_token", "accuracy"),
                ("target_id-baseline", "first_token", "accuracy"), ("control_id", "first_token", "accuracy"),
                ("baseline", "first_token", "control_object_rate"),
                ("control_id", "first_token", "control_object_rate")):
        r = pick.get(key)
        summary["_".join(key)] = None if r is None else {k: r[k] for k in ("n", "value", "ci_low", "ci_high")}
    summary["by_relation"] = {r["relation"]: {"before": r["value"], "after": after["value"]}
                              for r in table for after in table
                              if r["condition"] == "baseline" and after["condition"] == "target_id"
                              and r["relation"] == after["relation"] != "all" and r["measure"] == after["measure"]
                              == "first_token" and r["stat"] == after["stat"] == "accuracy"}
    summary["heads"] = [list(h) for h in heads]
    summary["id_vector_norms"] = {f"{c[0]},{c[1]}": float(np.linalg.norm(v)) for c, v in vectors.items()}
    return summary


def report_rows(st):
    """For the report: every condition over all relations."""
    keep = ("condition", "measure", "stat", "value", "ci_low", "ci_high", "n")
    return "All relations", [{k: r[k] for k in keep} for r in F.where(st.table("reuse"), relation="all")], \
        "results/reuse.csv (per relation), reuse_trials.csv"


def caption(summary: dict) -> str:
    d = summary["target_id-baseline_first_token_accuracy"]
    return (f"Spatial-relation first-token accuracy {pct(summary['baseline_first_token_accuracy'])} before and "
            f"{pct(summary['target_id_first_token_accuracy'])} after adding {summary['alpha']:g} x the "
            f"scene-description ID of the answer's cell (change {100 * d['value']:+.1f} points "
            f"[{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}], n={d['n']}). With a wrong cell's ID: accuracy "
            f"{pct(summary['control_id_first_token_accuracy'])}, answers naming that cell's object "
            f"{pct(summary['control_id_first_token_control_object_rate'])} (unedited: "
            f"{pct(summary['baseline_first_token_control_object_rate'])}).")
