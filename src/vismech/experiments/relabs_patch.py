"""``relabs-patch`` (App. A.4, Fig. 13, Fig. 29): is the selected position ID absolute or relative?

Construction of one trial pair (paper-notes §4.7):

- **Image 1** is a trial of ``scenes.sets.relabs_set``: the four objects of ``RELABS_CONJUNCTIONS`` in one 2x2
  arrangement (a quadrant of the 3x3 grid), the prompt names three of them and the target T sits at absolute cell
  A, relative cell R (its row and column inside the 2x2). The outputs (site ``z``) of the top-K ID-selection heads
  at image 1's last token are captured.
- **Image 2** uses the same four objects in a *different* arrangement that also contains cell A (drawn from the
  run seed among the arrangements that do). As in the paper, A is the centre by default (option ``cells``:
  "centre", in all four arrangements; "shared" also admits the edge-middle cells, each in two arrangements;
  corners belong to one arrangement only and never pair). Its two missing objects are the **absolute match** at
  cell A and the **relative match** at the cell with the same relative position R in the new arrangement (never
  A, since the arrangements' origins differ). Image 1's target identity
  T is placed on one of the two *named* cells, so neither candidate shares T's features: a patch can pull the
  answer toward a candidate only through position. The remaining objects fill the other cells at random; the
  prompt (``scenes.tasks.scene_description``) names the two objects on the non-candidate cells in random order.
- **Patch**: image 1's values replace the same heads' outputs at image 2's last token (the two prompts differ,
  but only the last position is patched, so only it must be aligned: ``[batch.last]`` of each).

Measures, for the patched run and the unpatched baseline on the same image-2 trials: the proportion of answers
naming the absolute vs the relative match, (i) by the arg-max of the first-token logits over the two candidates
("choice"; the four colours differ, so their first tokens differ) and (ii) by the arg-max over the whole vocabulary
("argmax": absolute, relative or other). Wilson 95% intervals; the patch effect (patched - baseline) per trial pair
with a percentile bootstrap interval. Under relative coding the patched answer moves to the relative match, under
absolute coding to the absolute match.

Options: ``n`` = K image-1 trials per (identity, cell) per arrangement (``relabs_set``; of its 64 K trials, the
16 K with the target at the centre pair, 48 K with ``cells="shared"``), ``k`` heads
(default 50: the paper does not state K for Fig. 29; capped at the head count), ``heads`` (explicit [layer, head]
list instead of the CMA ranking; ``cma_n``, ``cma_grid`` pass options to the ranking).
"""

from __future__ import annotations

import random


from vismech.errors import UserError
from vismech.experiments import cma
from vismech.experiments import figures as F
from vismech.experiments.common import Context, pct
from vismech.experiments.options import Opt
from vismech.analysis.stats import paired_diff, rate
from vismech.engine.edits import run_heads
from vismech.experiments.cma import select_heads
from vismech.scenes.core import Obj, Scene, Trial
from vismech.scenes.sets import RELABS_CONJUNCTIONS, RELABS_ORIGINS, relabs_set
from vismech.scenes.tasks import scene_description

NAME = "relabs-patch"
DESCRIPTION = "Fig. 29: patch image 1's ID-selection outputs into image 2: absolute- or relative-match answer?"
DEFAULTS = {"n": 2, "k": 50, "cells": "centre", "heads": None, "cma_n": cma.DEFAULTS["n"],
            "cma_grid": cma.DEFAULTS["grid"]}
LIMITS = {"cells": Opt("str", choices=("centre", "shared"))}


def arrangement_cells(a: int) -> list[tuple[int, int]]:
    r0, c0 = RELABS_ORIGINS[a]
    return [(r0 + r, c0 + c) for r in range(2) for c in range(2)]


def image2(t1: Trial, rng: random.Random) -> Trial:
    """Image 2 for image-1 trial ``t1`` (see the module docstring); meta holds both candidates and their cells."""
    A = tuple(t1.meta["absolute_cell"])
    R = tuple(t1.meta["relative_cell"])
    a1 = t1.meta["arrangement"]
    options = [a for a in range(len(RELABS_ORIGINS)) if a != a1 and A in arrangement_cells(a)]
    if not options:
        raise ValueError(f"no other arrangement contains cell {A}")
    a2 = rng.choice(options)
    r0, c0 = RELABS_ORIGINS[a2]
    rel_cell = (r0 + R[0], c0 + R[1])
    named_cells = [c for c in arrangement_cells(a2) if c not in (A, rel_cell)]
    T = (t1.target.color, t1.target.shape)
    others = [c for c in RELABS_CONJUNCTIONS if tuple(c) != T]
    rng.shuffle(others)
    t_cell = rng.choice(named_cells)
    rest = [c for c in (A, rel_cell, *named_cells) if c != t_cell]
    objs = [Obj(*T, t_cell)] + [Obj(col, shp, cell) for (col, shp), cell in zip(others, rest)]
    scene = Scene(tuple(sorted(objs, key=lambda o: o.cell)), (3, 3))
    named = [scene.at(c) for c in named_cells]
    rng.shuffle(named)
    absolute, relative = scene.at(A), scene.at(rel_cell)
    trial = scene_description(scene, absolute, named)
    trial.meta.update(arrangement=a2, source_arrangement=a1, absolute_cell=list(A), relative_cell_abs=list(rel_cell),
                      relative_cell=list(R), absolute_answer=absolute.name, relative_answer=relative.name,
                      source_target=t1.target.name)
    return trial


def build_pairs(k: int, seed: int, cells: str = "centre") -> tuple[list[Trial], list[Trial]]:
    """(image-1 trials whose target cell lies in another arrangement too, matching image-2 trials)."""
    if cells not in ("centre", "shared"):
        raise UserError(f"cells must be 'centre' or 'shared', not {cells!r}")
    shared = {c for a in range(len(RELABS_ORIGINS)) for c in arrangement_cells(a)
              if sum(c in arrangement_cells(b) for b in range(len(RELABS_ORIGINS))) > 1}
    keep = {(1, 1)} if cells == "centre" else shared
    first = [t for t in relabs_set(k, seed) if tuple(t.meta["absolute_cell"]) in keep]
    rng = random.Random(seed + 7)
    return first, [image2(t, rng) for t in first]


def outcomes(r, prefix: str) -> list[dict]:
    """Per-trial choice and arg-max outcomes of a run scored on [absolute, relative] candidates."""
    rows = []
    for i in range(len(r.top)):
        absolute = int(r.cand_logits[i, 0] >= r.cand_logits[i, 1])
        am = "absolute" if r.cand_hit[i, 0] else "relative" if r.cand_hit[i, 1] else "other"
        rows.append({f"{prefix}_choice": "absolute" if absolute else "relative", f"{prefix}_argmax": am,
                     f"{prefix}_logit_abs_minus_rel": float(r.cand_logits[i, 0] - r.cand_logits[i, 1])})
    return rows


def summarize(rows: list[dict], seed: int = 0) -> list[dict]:
    out = []
    for measure in ("choice", "argmax"):
        for answer in ("absolute", "relative"):
            vals = {c: [int(r[f"{c}_{measure}"] == answer) for r in rows] for c in ("baseline", "patched")}
            for cond, v in vals.items():
                out.append({"measure": measure, "answer": answer, "condition": cond, **rate(sum(v), len(v))})
            out.append({"measure": measure, "answer": answer, "condition": "patched-baseline",
                        **paired_diff(vals["patched"], vals["baseline"], seed)})
    return out


@F.paper_style
def plot(st) -> dict:
    """Figure ``relabs_patch`` from the stored table: how often answers name the absolute or the relative match,
    without and with the patch."""
    table, k = st.table("relabs_patch"), len(st.summary["heads"])
    fig, axes = F.figure(2, 1, w=2.8, h=2.4, sharey=True)
    for ax, measure, title in ((axes[0, 0], "choice", "Choice between the two candidates"),
                               (axes[0, 1], "argmax", "Arg-max over the vocabulary")):
        series, colours = {}, {}
        for cond, colour in (("baseline", F.ROLE["none"]), ("patched", F.ROLE["edit"])):
            label = "no patch" if cond == "baseline" else f"patched (top-{k} ID-selection heads)"
            got = [F.where(table, measure=measure, condition=cond, answer=a)[0] for a in ("absolute", "relative")]
            series[label], colours[label] = tuple(F.column(got, c) for c in ("value", "ci_low", "ci_high")), colour
        F.bars(ax, ["Absolute", "Relative"], series, colours, title=title)
        ax.set_ylim(0, 1)
    axes[0, 0].set_ylabel(f"Proportion of answers (n={table[0]['n']})")
    F.legend_below(axes[0, 0], ncol=2, drop=0.3)
    fig.tight_layout()
    return {"relabs_patch": fig}


def run(ctx: Context, heads=None) -> dict:
    vlm = ctx.vlm
    heads, source = select_heads(ctx, ctx.opt("k"), heads)
    first, second = build_pairs(int(ctx.opt("n")), ctx.seed, ctx.opt("cells"))
    cand = [[t.meta["absolute_answer"], t.meta["relative_answer"]] for t in second]

    def compute():
        with ctx.progress(3 * len(first), "relabs-patch") as update:
            src = run_heads(vlm, first, heads, candidates=[[t.answer] for t in first], capture=True,
                            batch_size=ctx.batch_size, progress=update)
            base = run_heads(vlm, second, heads, candidates=cand, batch_size=ctx.batch_size, progress=update)
            patched = run_heads(vlm, second, heads, src.z, "set", cand, batch_size=ctx.batch_size, progress=update)
        return src, base, patched

    src, base, patched = ctx.unit(ctx.unit_key(NAME, heads=heads), compute)
    rows = []
    for i, (t1, t2, b, p) in enumerate(zip(first, second, outcomes(base, "baseline"), outcomes(patched, "patched"))):
        rows.append({"pair": i, "source_arrangement": t1.meta["arrangement"], "arrangement": t2.meta["arrangement"],
                     "absolute_cell": "{},{}".format(*t2.meta["absolute_cell"]),
                     "relative_match_cell": "{},{}".format(*t2.meta["relative_cell_abs"]),
                     "relative_position_cell": "{},{}".format(*t2.meta["relative_cell"]),
                     "source_target": t1.answer, "source_first_token_correct": int(src.cand_hit[i, 0]),
                     "absolute_answer": t2.meta["absolute_answer"], "relative_answer": t2.meta["relative_answer"],
                     **b, **p})
    table = summarize(rows, ctx.seed)
    for r in table:
        r["k"] = len(heads)
    ctx.save_table("relabs_patch_trials", rows)
    ctx.save_table("relabs_patch", table)
    pick = {(r["measure"], r["answer"], r["condition"]): {k: r[k] for k in ("n", "value", "ci_low", "ci_high")}
            for r in table}
    return {"head_source": source, "n_pairs": len(rows), "cells": ctx.opt("cells"),
            "source_first_token_accuracy": rate(sum(r["source_first_token_correct"] for r in rows), len(rows)),
            **{"_".join(k): v for k, v in pick.items()}, "heads": [list(h) for h in heads]}


def caption(summary: dict) -> str:
    shift = summary["choice_relative_patched-baseline"]
    return (f"Between the two missing objects, answers name the relative match in "
            f"{pct(summary['choice_relative_baseline'])} of pairs without a patch and "
            f"{pct(summary['choice_relative_patched'])} with image 1's ID-selection outputs patched in (shift "
            f"{100 * shift['value']:+.1f} points [{100 * shift['ci_low']:+.1f}, {100 * shift['ci_high']:+.1f}], "
            f"n={shift['n']}); a shift toward relative means relative position coding, toward absolute (the "
            f"complement) absolute coding.")
