"""``key-intervention``: swap two objects' position IDs in the keys of their image patches (§4.3, Fig. 4).

With K^o the keys (before RoPE) of the image patches that show object o, and d_i the mean key over the patches of
objects with ID i on an estimation split (``interventions.key_id_vectors``), the IDs of the described object A and
the target B are swapped: K^A += alpha (d_B - d_A), K^B += alpha (d_A - d_B). It is applied at the layers of the
top-``top_k`` feature-retrieval heads of the CMA (20 and alpha = 2 in the paper). The paper does not say whether
every key head of those layers is edited; ``key_heads="top"`` (default) edits the key heads the top heads read
(under GQA several query heads share one, ``hooks.kv_head_of``), ``"all"`` every key head of those layers.

Scenes and IDs as in ``id-intervention``: 2-object scene-description trials on a 1x2 grid (left/right, like the
paper's PUG images), ID = cell; ``--set stimuli=photoreal`` renders them photorealistically (object patches from the
rendered masks), a folder path takes a user's own (patches from their boxes or masks; ``experiments.sources``).
If the ID lives in the keys, feature retrieval's query for B's ID now finds A's patches, so the model names A:
efficacy = fraction of held-out trials whose greedy answer is A (first token, or every token under the
``sequence`` rule of ``models.answers``; Wilson 95% interval), against no edit and a control with random
directions of equal norm.

Not for Idefics2 or any model without per-patch image tokens: the summary says it was skipped and why.
Options: ``n`` held-out trials (64), ``n_estimate`` (64), ``grid`` ((1, 2)), ``alpha`` (2.0), ``top_k`` (20,
capped at the model's head count), ``key_heads`` ("top"), ``cma_n`` (50), ``stimuli`` ("grid"), ``photoreal``.
"""

from __future__ import annotations

import numpy as np

from vismech.engine import interventions as iv
from vismech.analysis.stats import rate
from vismech.errors import UserError
from vismech.experiments.cma import cma_scores
from vismech.experiments import figures as F
from vismech.experiments.common import Context
from vismech.experiments.options import Opt
from vismech.experiments.id_intervention import two_object_trials

NAME = "key-intervention"
DESCRIPTION = "Swap two objects' position IDs in their patch keys before RoPE at the feature-retrieval layers (Fig. 4)"
DEFAULTS = {"n": 64, "n_estimate": 64, "grid": (1, 2), "alpha": 2.0, "top_k": 20, "key_heads": "top", "cma_n": 50,
            "stimuli": "grid", "photoreal": {}}
LIMITS = {"key_heads": Opt("str", choices=("top", "all"))}


def key_heads(vlm, top: list[tuple[int, int]], which: str) -> list[tuple[int, int]]:
    """(layer, kv head) pairs to edit: those the top heads read, or every kv head of their layers."""
    if which == "top":
        return iv.kv_heads_for(vlm, top)
    if which == "all":
        return [(l, k) for l in sorted({l for l, _ in top}) for k in range(vlm.n_kv_heads)]
    raise UserError(f"key_heads must be 'top' or 'all', not {which!r}")


def key_hits(vlm, held, vecs, alpha: float, batch_size: int, seed: int, update=None) -> dict[str, int]:
    """Swap the described object's and the target's key IDs (``vecs``: ``interventions.key_id_vectors``) on the
    held-out 2-object trials: counts of trials whose first-token arg-max is the described object's, with no edit
    (``none``), the ID swap (``id``) and random directions (``random``), and of right answers unedited
    (``original``)."""
    hits = {"none": 0, "id": 0, "random": 0, "original": 0}
    for s in range(0, len(held), batch_size):
        chunk = held[s:s + batch_size]
        b = vlm.encode(chunk)
        first = min(p for objs in b.objects for ps in objs.values() for p in ps)
        answers = vlm.answers(b, [[t.mentioned[0].name, t.answer] for t in chunk])  # A, then B
        runs = iv.EditedRuns(vlm, b, first_position=first, answers=answers)
        pairs = [(tuple(t.mentioned[0].cell), tuple(t.target.cell)) for t in chunk]
        clean = runs.scores().greedy
        hits["none"] += int(clean[:, 0].sum())
        hits["original"] += int(clean[:, 1].sum())
        dirs = ("id", "random")
        edited = runs.scores_many([iv.key_swap_edits(vecs, b, pairs, alpha, direction=d, seed=seed) for d in dirs])
        for d, sc in zip(dirs, edited):
            hits[d] += int(sc.greedy[:, 0].sum())
        if update:
            update(len(chunk))
    return hits


@F.paper_style
def plot(st) -> dict:
    """Figure ``key_intervention`` from the stored table: efficacy of the key ID swap, a random direction and no
    edit."""
    if "skipped" in st.summary:
        return {}
    rows = st.table("key_intervention")
    fig, axes = F.figure(1, 1, w=2.6, h=2.4)
    ax = axes[0, 0]
    names = {"none": "no edit", "id": "key ID\nswap", "random": "random\ndirection"}
    colours = {"none": F.ROLE["none"], "id": F.ROLE["edit"], "random": F.ROLE["control"]}
    v = F.column(rows, "value")
    ax.bar(range(len(rows)), np.nan_to_num(v), yerr=F.error(v, F.column(rows, "ci_low"), F.column(rows, "ci_high")),
           color=[colours[r["direction"]] for r in rows], capsize=2, error_kw={"lw": 0.8})
    ax.set_xticks(range(len(rows)), [names[r["direction"]] for r in rows])
    ax.set_ylabel("Intervention efficacy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Key intervention, α={st.summary['alpha']:g}\n({st.model}, n={rows[0]['n']})")
    fig.tight_layout()
    return {"key_intervention": fig}


def run(ctx: Context) -> dict:
    vlm = ctx.vlm
    if not vlm.family.spatial_tokens:
        return {"skipped": f"{vlm.family.name} has no per-patch image tokens (its image is resampled into "
                           "latent tokens), so object keys cannot be edited; use a family with per-patch image tokens "
                           "(`vismech models` lists them)"}
    res = cma_scores(ctx)
    top = res.top_k("feature_retrieval", min(ctx.opt("top_k"), vlm.n_layers * vlm.n_heads))
    kv = key_heads(vlm, top, ctx.opt("key_heads"))
    n_est, n, alpha = ctx.opt("n_estimate"), ctx.opt("n"), float(ctx.opt("alpha"))
    trials, src = two_object_trials(ctx, n_est + n, NAME)
    est, held = trials[:n_est], trials[n_est:]
    vecs = iv.key_id_vectors(vlm, est, kv, ctx.batch_size)

    def compute():
        with ctx.progress(len(held), "key-intervention") as update:
            return key_hits(vlm, held, vecs, alpha, ctx.batch_size, ctx.seed, update)

    kv_tag = "_".join(f"{l}.{h}" for l, h in kv)
    hits = ctx.unit(ctx.unit_key(NAME, kv=kv_tag, stimuli=src.tag), compute)
    rows = []
    for d in ("none", "id", "random"):
        w = rate(hits[d], n)
        rows.append({"measure": "efficacy", **w, "direction": d, "alpha": 0.0 if d == "none" else alpha})
    ctx.save_table("key_intervention", rows)
    layers = sorted({l for l, _ in kv})
    return {"alpha": alpha, "n_heldout": n, "n_estimate": n_est, "top_k": len(top), "layers": layers,
            "key_heads": [list(x) for x in kv], "ids": "object cells (PUG: left/right)", "stimuli": src.describe(),
            "efficacy": {r["direction"]: {"rate": r["value"], "ci": [r["ci_low"], r["ci_high"]]} for r in rows},
            "baseline_accuracy": rate(hits["original"], n),
            "id_labels": [list(x) for x in vecs.labels],
            "mean_id_difference_norm": float(np.linalg.norm(vecs.vectors[0] - vecs.vectors[-1], axis=-1).mean())}


def caption(summary: dict) -> str:
    if "skipped" in summary:
        return "Skipped: " + summary["skipped"]
    e = summary["efficacy"]
    return (f"Key ID swap (α={summary['alpha']:g}, layers {summary['layers']}): {100 * e['id']['rate']:.0f}% of "
            f"n={summary['n_heldout']} trials name the other object; random direction "
            f"{100 * e['random']['rate']:.0f}%, "
            f"no edit {100 * e['none']['rate']:.0f}%.")
