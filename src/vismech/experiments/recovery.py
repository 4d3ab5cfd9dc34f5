"""``recovery``: does vismech find the mechanism a model declares? A positive control for every analysis.

Needs declared ground truth (``models.ground_truth``): the model's own ``ground_truth.json`` (vismech's planted
organisms ship one) or option ``ground_truth`` (a path), so a user can test vismech on their own planted model.
Against it, with numbers and their uncertainty:

- **CMA** (``cma_scores``, the re-paired null, BH at ``q``): per stage, the heads significant in the stage's
  condition vs the declared heads: precision (found and declared / found) and recall (found and declared /
  declared); each declared head not found, with its mean score and adjusted p (how near it came); declared heads
  significant in another stage's condition; the layers found per condition, and whether their order is ID
  retrieval < ID selection < feature retrieval (median found layer).
- **RSA** on random-vocabulary scenes (``rsa_grid``, ``rsa_objects`` objects of any colours and shapes, all but
  one described): position at each mention's last token, position at the last token and features at the last
  token, by layer (bootstrap intervals, permutation null), each read at the declared stage's last layer (the
  residual stream after it) and at its peak.
- **Interventions** (2-object trials on ``grid``): the additive ID edit of ``id-intervention`` at the declared
  heads of each stage against the same number of random heads of the same layers (``random_sets`` draws), best
  alpha chosen on the declared heads; the key ID swap of ``key-intervention`` at the key heads the declared
  feature-retrieval heads read, against the other key heads of their layers.

Negative control: ``ablate_declared`` zero-ablates every declared head (stages and helpers) for the whole
experiment (``interventions.ablated_heads``: their input columns of the attention output projection are zeroed,
so they add nothing on any path; the weights are restored afterwards): a sound analysis then finds none of them.

Summary, tables (``recovery_cma``, ``recovery_rsa``, ``recovery_interventions``) and one figure. Options:
``ground_truth`` (None: the model's own), ``stages`` (None: every declared stage; or a list of them),
``ablate_declared`` (False), ``cma_n`` (50 pairs per condition), ``cma_grid`` ((2, 2)), ``cma_test`` ("pooled"
or "paired": ``cma``'s significance test), ``q``
(0.05), ``null_samples`` (2,000), ``rsa_grid`` ((3, 3)), ``rsa_objects`` (5), ``rsa_n`` (192 trials), ``n_boot`` (200), ``n_null`` (20),
``n`` (64 held-out trials), ``n_estimate`` (64), ``grid`` ((2, 2)), ``alphas``, ``key_alpha`` (2), ``random_sets``
(3).
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

from vismech.engine import activations
from vismech.engine import interventions as iv
from vismech.analysis.stats import rate
from vismech.errors import UserError
from vismech.engine.mediation import condition_positions
from vismech.experiments.cma import LABELS, cma_scores
from vismech.experiments import figures as F
from vismech.experiments.common import Context
from vismech.experiments.id_intervention import SITE, edit_hits, id_labels, two_object_trials
from vismech.experiments.key_intervention import key_hits
from vismech.experiments.options import MAX_TRIALS, Opt
from vismech.experiments.rsa import object_targets, rsa_by_layer
from vismech.models.ground_truth import STAGES, load_ground_truth
from vismech.scenes.sets import scene_description_set

NAME = "recovery"
DESCRIPTION = ("Positive control: CMA precision/recall, RSA and interventions against the model's declared ground "
               "truth (ground_truth.json)")
DEFAULTS = {"ground_truth": None, "stages": None, "ablate_declared": False, "cma_n": 50, "cma_grid": (2, 2),
            "cma_test": "pooled", "q": 0.05, "null_samples": 2000, "rsa_grid": (3, 3), "rsa_objects": 5,
            "rsa_n": 192, "n_boot": 200, "n_null": 20, "n": 64, "n_estimate": 64, "grid": (2, 2),
            "alphas": [1, 2, 5, 10, 20, 50], "key_alpha": 2.0, "random_sets": 3}
LIMITS = {"ground_truth": Opt("str", none=True), "q": Opt("float", 0, 1, open=True),
          "stages": Opt("list", none=True, length=(1, len(STAGES)), each=Opt("str", choices=STAGES)),
          "rsa_objects": Opt("int", 3, 81), "rsa_n": Opt("int", 3, MAX_TRIALS), "n_estimate": Opt("int", 4, MAX_TRIALS),
          "key_alpha": Opt("float"), "random_sets": Opt("int", 1, 100),
          "cma_test": Opt("str", choices=("pooled", "paired"))}
#: The RSA curve that reads each stage's variable.
CURVES = {"id_retrieval": ("position_mentions", "position"), "id_selection": ("position_last", "position"),
          "feature_retrieval": ("features_last", "features")}


def declared_ground_truth(ctx: Context):
    """The ground truth of option ``ground_truth``, else the model's own, checked against the model."""
    path = ctx.opt("ground_truth")
    gt = load_ground_truth(path) if path else ctx.vlm.ground_truth
    if gt is None:
        raise UserError(f"recovery needs declared ground truth, and {ctx.vlm.name} declares none (no "
                         "ground_truth.json in its checkpoint): pass --set ground_truth=PATH (the format is in "
                         "vismech.models.ground_truth), or run it on a planted organism such as organism-ids")
    return gt.check(ctx.vlm.n_layers, ctx.vlm.n_heads)


def ground_truth_of(ctx: Context):
    """The declared ground truth, restricted to option ``stages``."""
    gt = declared_ground_truth(ctx)
    keep = ctx.opt("stages")
    if keep is not None:
        unknown = sorted(set(keep) - set(gt.stages))
        if unknown:
            raise UserError(f"stages {', '.join(unknown)} are not declared by the ground truth (it declares "
                             f"{', '.join(gt.stages)})")
        gt = type(gt)({k: v for k, v in gt.stages.items() if k in keep}, gt.helpers, gt.method)
    return gt


# -- CMA ------------------------------------------------------------------------------------------------------
def cma_recovery(res, gt) -> tuple[list[dict], dict]:
    """Per stage: precision, recall, wrong-condition heads and found layers; and the found layer order."""
    rows, out, medians = [], {}, {}
    for c in res.conditions:
        found = {(int(a), int(b)) for a, b in zip(*np.nonzero(res.significance[c]["mask"]))}
        medians[c] = float(np.median([a for a, _ in found])) if found else None
        if c not in gt.stages:
            continue
        declared = set(gt.stages[c].heads)
        hit = found & declared
        wrong = sorted(h for s, d in gt.stages.items() if s != c for h in d.heads if h in found)
        rec = {"stage": c, "declared": sorted(declared), "found": sorted(found), "true_positives": len(hit),
               "precision": len(hit) / len(found) if found else None, "recall": len(hit) / len(declared),
               "declared_of_other_stages_found_here": wrong,
               "found_layers": sorted({a for a, _ in found}), "declared_layers": list(gt.stages[c].layers),
               "declared_mean_score": float(np.mean([res.mean[c][h] for h in declared])),
               # each declared head the test did not find: how near it came
               "missed": [{"head": list(h), "mean_score": float(res.mean[c][h]),
                           "p_adjusted": float(res.significance[c]["p_adjusted"][h])}
                          for h in sorted(declared - found)],
               "max_other_mean_score": float(max((res.mean[c][a, b] for a in range(res.mean[c].shape[0])
                                                  for b in range(res.mean[c].shape[1]) if (a, b) not in declared),
                                                 default=float("nan")))}
        out[c] = rec
        for measure in ("precision", "recall"):
            rows.append({"analysis": "cma", "stage": c, "measure": measure, "value": rec[measure],
                         "n": len(found) if measure == "precision" else len(declared),
                         "n_pairs": int(res.scores[c].shape[-1])})
    order = [medians[c] for c in STAGES if c in medians]
    known = [m for m in order if m is not None]
    out["layer_order"] = {"median_found_layer": {c: medians[c] for c in STAGES if c in medians},
                          "ordered": len(known) == len(order) >= 2 and all(a < b for a, b in zip(known, known[1:]))}
    return rows, out


# -- RSA ------------------------------------------------------------------------------------------------------
def rsa_trials(grid, n_objects: int, n: int, seed: int):
    """Random-vocabulary scene descriptions: any unique colour-shape conjunctions, all objects but one described."""
    return scene_description_set(n, tuple(grid), n_objects=n_objects, seed=seed, entropy=None)


def capture_mentions(vlm, trials, batch_size: int):
    """Residual stream after every layer at the last token and at each mention's last token: (last [L, n, d],
    mentions: a list of S arrays [L, n, d])."""
    S = len(trials[0].mentions)
    last, ment = [], []
    for s in range(0, len(trials), batch_size):
        b = vlm.encode(trials[s:s + batch_size])
        pos = torch.tensor([[b.last] + [m[-1] for m in ms] for ms in b.mentions], dtype=torch.long)
        resid, _, _ = activations.forward_positions(vlm, b, pos, with_z=False)  # [B, P, L, d]
        r = resid.permute(2, 1, 0, 3).numpy()  # [L, P, B, d]
        last.append(r[:, 0])
        ment.append(r[:, 1:])
    last = np.concatenate(last, 1)
    ment = np.concatenate(ment, 2)
    return last, [ment[:, k] for k in range(S)]


def rsa_recovery(ctx: Context, gt) -> tuple[list[dict], dict]:
    trials = rsa_trials(ctx.opt("rsa_grid"), int(ctx.opt("rsa_objects")), int(ctx.opt("rsa_n")), ctx.seed)
    last, ment = capture_mentions(ctx.vlm, trials, ctx.batch_size)
    S = len(ment)
    n_boot, n_null = int(ctx.opt("n_boot")), int(ctx.opt("n_null"))
    per_slot = [object_targets([t.mentioned[k] for t in trials]) for k in range(S)]
    tgt_last = object_targets([t.target for t in trials])
    curves = {"position_mentions": rsa_by_layer(ment, {"position": [p["position"] for p in per_slot]}, n_boot,
                                                ctx.seed, n_null=n_null)["position"],
              **{f"{k}_last": v for k, v in rsa_by_layer(last, {k: tgt_last[k] for k in ("position", "features")},
                                                         n_boot, ctx.seed, n_null=n_null).items()}}
    rows, out = [], {"n_trials": len(trials), "grid": list(ctx.opt("rsa_grid")), "n_objects": ctx.opt("rsa_objects")}
    for name, c in curves.items():
        for layer in range(len(c["r"])):
            rows.append({"analysis": "rsa", "curve": name, "layer": layer, "measure": "pearson_r",
                         "value": float(c["r"][layer]),
                         "ci_low": float(c["lo"][layer]), "ci_high": float(c["hi"][layer]),
                         "null_high": float(c["null_hi"][layer]) if n_null else None, "n": len(trials)})
    for stage, (name, _) in CURVES.items():
        c = curves[name]
        peak = int(np.nanargmax(c["r"]))
        rec = {"curve": name, "peak_layer": peak, "peak_r": float(c["r"][peak])}
        if stage in gt.stages:
            at = max(gt.stages[stage].layers)
            rec.update(declared_layer=at, r_at_declared=float(c["r"][at]),
                       ci_at_declared=[float(c["lo"][at]), float(c["hi"][at])],
                       null_high_at_declared=float(c["null_hi"][at]) if n_null else None)
        out[stage] = rec
    return rows, out


# -- interventions --------------------------------------------------------------------------------------------
def random_heads(heads, n_heads: int, exclude: set, rng: random.Random) -> list[tuple[int, int]]:
    """As many heads as ``heads`` has in each layer, drawn from that layer's heads outside ``exclude``."""
    out = []
    for layer in sorted({a for a, _ in heads}):
        k = sum(1 for a, _ in heads if a == layer)
        pool = [(layer, h) for h in range(n_heads) if (layer, h) not in exclude]
        out += rng.sample(pool, min(k, len(pool)))
    return out


def intervention_recovery(ctx: Context, gt) -> tuple[list[dict], dict]:
    vlm = ctx.vlm
    n_est, n = int(ctx.opt("n_estimate")), int(ctx.opt("n"))
    trials, _ = two_object_trials(ctx, n_est + n, NAME)  # recovery takes no stimuli option: the grid sets
    est, held = trials[:n_est], trials[n_est:]
    rng = random.Random(ctx.seed)
    declared_all = gt.heads()
    alphas = [float(a) for a in ctx.opt("alphas")]
    head_sets, vecs = {}, {}
    for c in STAGES:
        if c not in gt.stages:
            continue
        sets = {"declared": list(gt.stages[c].heads)}
        for k in range(int(ctx.opt("random_sets"))):
            sets[f"random{k}"] = random_heads(gt.stages[c].heads, vlm.n_heads, declared_all, rng)
        union = sorted({h for hs in sets.values() for h in hs})
        vecs[c] = iv.id_vectors(vlm, est, [id_labels(t, c)[0] for t in est], SITE[c], union,
                                lambda b, c=c: condition_positions(b, c), ctx.batch_size)
        head_sets.update({(c, tag): hs for tag, hs in sets.items()})
    rows, out = [], {}

    def compute():
        hits, base_pred, base_orig = edit_hits(vlm, held, vecs, head_sets, alphas, ctx.batch_size, ctx.seed)
        return {f"{c}|{tag}|{a:g}|{d}": h for ((c, tag), a, d), h in hits.items()}, base_pred, base_orig

    heads_tag = hashlib.sha1(repr(sorted(head_sets.items())).encode()).hexdigest()[:10]  # results depend on them
    key = ctx.unit_key("recovery-id", heads=heads_tag)
    hits, base_pred, _ = ctx.unit(key, compute)
    for c in STAGES:
        if c not in gt.stages:
            continue
        eff = {a: hits[f"{c}|declared|{a:g}|id"] / n for a in alphas}
        best = max(alphas, key=lambda a: (eff[a], -a))
        rand = [hits[f"{c}|random{k}|{best:g}|id"] for k in range(int(ctx.opt("random_sets")))]
        w = rate(hits[f"{c}|declared|{best:g}|id"], n)
        wr = rate(sum(rand), n * len(rand))
        wd = rate(hits[f"{c}|declared|{best:g}|random"], n)
        out[c] = {"site": SITE[c], "alpha": best, "declared": w, "random_heads": wr, "random_direction": wd,
                  "random_head_sets": [head_sets[(c, f"random{k}")] for k in range(len(rand))]}
        for tag, ww in (("declared", w), ("random_heads", wr), ("random_direction", wd)):
            rows.append({"analysis": "id_intervention", "stage": c, "heads": tag, "alpha": best, "measure": "efficacy",
                         **ww})
    out["baseline_repeat_rate"] = rate(base_pred, n)
    if "feature_retrieval" in gt.stages and vlm.family.spatial_tokens:
        kv = iv.kv_heads_for(vlm, list(gt.stages["feature_retrieval"].heads))
        others = [(layer, k) for layer in sorted({a for a, _ in kv}) for k in range(vlm.n_kv_heads)
                  if (layer, k) not in kv]
        alpha = float(ctx.opt("key_alpha"))
        key_out = {}
        for tag, heads in (("declared", kv), ("other_key_heads", others)):
            if not heads:
                continue
            kvec = iv.key_id_vectors(vlm, est, heads, ctx.batch_size)
            kv_tag = "_".join(f"{a}.{b}" for a, b in heads)
            h = ctx.unit(ctx.unit_key("recovery-key", heads=kv_tag),
                         lambda kvec=kvec: key_hits(vlm, held, kvec, alpha, ctx.batch_size, ctx.seed))
            w = rate(h["id"], n)
            key_out[tag] = {"key_heads": [list(x) for x in heads], **w}
            rows.append({"analysis": "key_intervention", "stage": "feature_retrieval", "heads": tag, "alpha": alpha,
                         "measure": "efficacy", **w})
        out["key_intervention"] = {"alpha": alpha, **key_out}
    return rows, out


# -- the experiment -------------------------------------------------------------------------------------------
def _bars(ax, x, values, width, label, colour, err=None):
    vals = [np.nan if v is None else v for v in values]
    ax.bar(x, np.nan_to_num(vals), width, yerr=err, label=label, color=colour, capsize=3)
    above = err[1] if err is not None else [0.0] * len(vals)  # labels sit above the error bar
    for xi, v, up in zip(x, vals, above):
        ax.text(xi, (0 if np.isnan(v) else v + up) + 0.02, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center",
                fontsize=6)


@F.paper_style
def plot(st) -> dict:
    """Figure ``recovery`` from the stored summary."""
    sm = st.summary
    model = f"{st.model}, declared heads ablated" if sm.get("ablated_heads") else st.model
    return {"recovery": _figure(model, sm["cma"], sm["rsa"], sm["interventions"])}


def _figure(model: str, cma: dict, rsa: dict, inter: dict):
    stages = [c for c in STAGES if c in cma]
    fig, axes = F.figure(3, 1, w=3.0, h=2.6)
    axes = axes[0]
    x = np.arange(len(stages))
    _bars(axes[0], x - 0.2, [cma[c]["precision"] for c in stages], 0.4, "precision", F.PALETTE["blue"])
    _bars(axes[0], x + 0.2, [cma[c]["recall"] for c in stages], 0.4, "recall", F.PALETTE["orange"])
    axes[0].set_title("CMA: significant vs\ndeclared heads", fontsize=9)
    r = [rsa[c].get("r_at_declared", np.nan) for c in stages]
    err = [[max(0.0, v - rsa[c]["ci_at_declared"][0]) for v, c in zip(r, stages)],
           [max(0.0, rsa[c]["ci_at_declared"][1] - v) for v, c in zip(r, stages)]]
    _bars(axes[1], x, r, 0.5, "bootstrap 95% CI", F.PALETTE["green"], err)
    axes[1].set_title("RSA at the declared layer\n(position, position, features)", fontsize=9)
    _bars(axes[2], x - 0.2, [inter[c]["declared"]["value"] if c in inter else None for c in stages], 0.4,
          "declared heads", F.ROLE["edit"])
    _bars(axes[2], x + 0.2, [inter[c]["random_heads"]["value"] if c in inter else None for c in stages], 0.4,
          "random heads, same layers", F.ROLE["control"])
    axes[2].set_title("ID intervention\nefficacy", fontsize=9)
    for ax in axes:
        ax.set_xticks(x, [LABELS[c].replace(" ", "\n") for c in stages], fontsize=7)
        ax.set_ylim(0, 1.12)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
    fig.suptitle(f"Recovery of the declared ground truth ({model})", fontsize=9)
    fig.tight_layout()
    return fig


def run(ctx: Context) -> dict:
    gt = ground_truth_of(ctx)
    ablated = sorted(declared_ground_truth(ctx).heads()) if ctx.opt("ablate_declared") else []
    cma_options = {"n": int(ctx.opt("cma_n")), "grid": tuple(ctx.opt("cma_grid")), "q": float(ctx.opt("q")),
                   "null_samples": int(ctx.opt("null_samples")), "test": ctx.opt("cma_test"),
                   "conditions": [c for c in STAGES if c in gt.stages]}
    if ablated:  # scores of the ablated model: never shared with the intact model's (``cma._same_scores``)
        cma_options["ablated_heads"] = [list(h) for h in ablated]
    with iv.ablated_heads(ctx.vlm, ablated):
        res = cma_scores(ctx, cma_options)
        cma_rows, cma = cma_recovery(res, gt)
        rsa_rows, rsa = rsa_recovery(ctx, gt)
        int_rows, inter = intervention_recovery(ctx, gt)
    ctx.save_table("recovery_cma", cma_rows)
    ctx.save_table("recovery_rsa", rsa_rows)
    ctx.save_table("recovery_interventions", int_rows)
    return {"ground_truth": gt.to_json(), "ablated_heads": [list(h) for h in ablated], "cma": cma, "rsa": rsa,
            "interventions": inter, "cma_n": int(ctx.opt("cma_n")), "cma_test": ctx.opt("cma_test"),
            "q": float(ctx.opt("q")),
            "rsa_n": rsa["n_trials"], "n": int(ctx.opt("n"))}


def caption(summary: dict) -> str:
    parts = []
    for c in STAGES:
        r = summary["cma"].get(c)
        if r:
            p = "n/a (none found)" if r["precision"] is None else f"{r['precision']:.2f}"
            missed, miss = r.get("missed", []), ""
            if missed and r["recall"]:  # a partial recall: which declared heads, and how near they came
                miss = "; missed " + ", ".join(f"L{m['head'][0]}H{m['head'][1]} (score {m['mean_score']:.2f}, "
                                               f"p_adj {m['p_adjusted']:.3f})" for m in missed)
            elif missed:
                miss = f" (declared heads' smallest p_adj {min(m['p_adjusted'] for m in missed):.3f})"
            parts.append(f"{LABELS[c]}: precision {p}, recall {r['recall']:.2f}{miss}")
    order = summary["cma"]["layer_order"]["ordered"]
    ablated = summary.get("ablated_heads")
    head = f"Declared heads ablated ({len(ablated)} heads zeroed). " if ablated else ""
    return head + "; ".join(parts) + f"; layer order R < S < F {'holds' if order else 'does not hold'} " \
        f"(CMA n={summary['cma_n']} pairs, BH q={summary['q']}" \
        f"{', paired test' if summary.get('cma_test') == 'paired' else ''})."
