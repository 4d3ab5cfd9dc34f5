"""``cma``: head-level causal mediation analysis in the paper's three conditions (§3.4, App. A.3; Fig. 1d).

For every condition (``scenes.counterfactual.cma_pairs``: ID retrieval, ID selection, feature retrieval) each
pair's clean context c1 and counterfactual c2 are encoded (same prompt, same token layout: ``check_same_layout``),
c2's per-head outputs (the o_proj input, site ``z``) are captured at the condition's positions and written, one head
at a time, into the run on c1 (``patching.head_patch``). The score is the paper's logit-difference change
(``analysis.cma.logit_diff_score``) on the answers a1 and a1*, each scored as the model writes it
(``models.answers``; the rule is the scene-description task's, recorded in the run's manifest):

    s = (S(c1*, a1*) - S(c1*, a1)) - (S(c1, a1*) - S(c1, a1)).

Where the first answer token is exact (every colour one token, as on vismech's own models) S is the last-token
logit of the answer's token, which is the paper's score. Otherwise (multi-token answers) S(c, a) is the
teacher-forced log-probability of a's whole token sequence after context c, log P(t1 | c) + log P(t2 | c, t1) + ...,
the patch applied in every forward (it sits at prompt positions, which the answer's tokens follow), and summed
over the forms a model writes (log-sum-exp); s is then the change, caused by the patch, in the log-odds of a1*
against a1. For one-token answers both definitions give the same s.

The two ID conditions score the same pairs (as in the paper, they differ only in where they patch); feature
retrieval has its own. Positions (``condition_positions``): ID retrieval patches every token of the described object's mention; ID
selection and feature retrieval patch the last token. Mentions can span different token counts across pairs on a
real tokenizer; shorter rows are padded by repeating their last mention token (its value is written twice, which a
"set" patch makes harmless), so every row of a batch patches the same number of positions.

**Head significance (not in the paper).** Null design: *re-paired counterfactuals with the clean value*. For
pair i, each head is also patched with the c2 values of another pair j (same condition, same positions of row i)
whose condition variable in c2 equals the variable's value in pair i's *clean* context c1, and scored with pair
i's own a1 and a1*. The condition variable is what the real counterfactual changes: for ID retrieval the cell of
the described object, for ID selection the cell of the target, for feature retrieval the colour of the target (the
first answer word). Such a patch changes the head's output as much as a real patch does in everything but the
variable (other objects, other words), so it measures the generic disruption a patch causes (a head whose
removal lowers a1's logit raises s too), not mediation; heads must beat it. (An earlier design re-paired with a
pair whose variable *differed*; on a model with planted position IDs (``organism-ids``) that null moved the
answer nearly as much as the real patch, since any other ID redirects the model, and hid the planted ID-retrieval
heads.) Where no pair has the clean value, any pair whose variable differs serves. One re-paired patch per
(head, pair) gives null per-pair scores [L, H, n] (the sweep and its re-pairing: ``engine.mediation``);
``null_samples`` null *mean* scores (``analysis.cma.null_mean_scores``) are drawn from them by picking a random head and resampling n of its pairs
with replacement (a head's mean under the null), and ``analysis.cma.head_significance`` tests every head's mean
against this pooled null (one-sided, Benjamini-Hochberg at ``q``; the uncorrected count above the null's 1-q
quantile is reported too, as in Yang et al. 2025). Cost: twice the patching of the scores alone. With option
``test="paired"`` each head is tested against its *own* control patches on the same pairs instead
(``analysis.cma.paired_significance``: score minus control score per pair, sign flips, BH at ``q``) and must also
score above the pooled null's 1-q quantile: on ``organism-ids`` the pooled null, which holds control patches that
carry another variable (the feature heads' in the ID-selection condition bring another trial's colour and shape),
missed planted heads in one seed of three at 50 and 80 pairs, where the paired test found all of them with no wrong
head (``docs/organism-ids.md``, "CMA's recall of the planted heads across pairs and seeds"); on the negative
control `organism` it also passes more small feature-retrieval heads (11 against 2 at 20 pairs).

Stimuli (option ``stimuli``, ``experiments.sources``): the flat-shape pairs of ``scenes.counterfactual`` on ``grid``
(default), ``"photoreal"`` (the same three conditions on rendered two-object scenes: the ID conditions swap the
objects' places, feature retrieval replaces the target; ``photoreal`` sets the render), or a stimulus folder (its
first ``n`` pairs of each condition; the two ID conditions share pairs; conditions without pairs are left out).

Options: ``n`` pairs per condition (50 as in the paper), ``grid`` (2x2), ``conditions``, ``null_samples`` (2,000),
``q`` (0.05), ``test`` ("pooled", or "paired": above), ``top_k`` (heads listed in the summary, 10), ``engine``
("fast": ``head_patch``, vision once and stacked rows; "naive": one full forward per head, the bit-exact reference). Other experiments call
``cma_scores(ctx)``, which computes once per run and set of options (cached in ``ctx.shared["cma"]``); called from
another experiment it takes this module's defaults, overridden by that experiment's ``cma_*`` options (e.g. ``cma_n``). Each
condition's scores are one resumable unit (``ctx.unit``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vismech.analysis.cma import head_significance, null_mean_scores, paired_significance, stage_map, top_k_heads
from vismech.analysis.stats import mean_se
from vismech.errors import UserError
from vismech.experiments import figures as F
from vismech.experiments.common import Context
from vismech.experiments.options import MAX_TRIALS, Opt
from vismech.experiments.sources import source
from vismech.engine.mediation import condition_scores
from vismech.scenes.counterfactual import CONDITIONS

NAME = "cma"
DESCRIPTION = "Causal mediation over every attention head in 3 conditions, with a re-paired null (Fig. 1d)"
DEFAULTS = {"n": 50, "grid": (2, 2), "conditions": list(CONDITIONS), "null_samples": 2000, "q": 0.05,
            "test": "pooled", "top_k": 10, "engine": "fast", "stimuli": "grid", "photoreal": {}}
LIMITS = {"n": Opt("int", 2, MAX_TRIALS), "engine": Opt("str", choices=("fast", "naive")),
          "test": Opt("str", choices=("pooled", "paired"))}
LABELS = {"id_retrieval": "ID retrieval", "id_selection": "ID selection", "feature_retrieval": "Feature retrieval"}


@dataclass
class CMAResult:
    """Per-head CMA scores of one model; arrays are [L, H] (mean, se) or [L, H, n_pairs] (scores, null)."""

    conditions: tuple[str, ...]
    mean: dict[str, np.ndarray]
    se: dict[str, np.ndarray]
    scores: dict[str, np.ndarray]
    significance: dict[str, dict]
    null_scores: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    null_means: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    stimuli: str = "flat shapes on the grid"

    def top_k(self, condition: str, k: int) -> list[tuple[int, int]]:
        """The paper's head selection: the k heads with the highest mean score, as (layer, head)."""
        if condition not in self.mean:
            raise UserError(f"this run's CMA has no {condition!r} condition (it ran {', '.join(self.conditions)}); "
                            "include it in the cma experiment's conditions")
        return top_k_heads(self.mean[condition], k)

    def max_score(self) -> np.ndarray:
        """[L, H]: each head's highest mean score over the conditions (the App. C ranking)."""
        return np.max(np.stack([self.mean[c] for c in self.conditions]), axis=0)


def _options(ctx: Context, options: dict | None) -> dict:
    if options is not None:
        return {**DEFAULTS, **options}
    return {**DEFAULTS, **{k[4:]: v for k, v in ctx.options.items() if k.startswith("cma_") and k[4:] in DEFAULTS}}


def _same_scores(o: dict) -> str:
    """What identifies a CMA result: the options its scores depend on, and ``ablated_heads`` where a caller
    computes them with heads ablated (``recovery``'s ``ablate_declared``; it is in the units' keys too, which hash
    every entry of the options)."""
    return repr([list(o[k]) if isinstance(o[k], tuple) else o[k]
                 for k in ("n", "grid", "conditions", "null_samples", "q", "test", "engine", "stimuli", "photoreal")]
                + [o.get("ablated_heads")])


def use_cma(ctx: Context, result: CMAResult, options: dict | None = None) -> None:
    """Make ``result`` (e.g. scores computed elsewhere) what ``cma_scores(ctx, options)`` returns in this run."""
    ctx.shared.setdefault("cma", {})[_same_scores(_options(ctx, options))] = result


def cma_scores(ctx: Context, options: dict | None = None) -> CMAResult:
    """The CMA result under these options: computed on first call, then reused from ``ctx.shared["cma"]`` by every
    experiment of the run that asks with the same options (so results depend on the options alone, not on which
    experiment ran first or on resuming)."""
    o = _options(ctx, options)
    same = _same_scores(o)
    cache = ctx.shared.setdefault("cma", {})
    if same in cache:
        return cache[same]
    vlm = ctx.vlm
    for c in o["conditions"]:
        if c not in CONDITIONS:
            raise UserError(f"unknown CMA condition {c!r}; conditions are {', '.join(CONDITIONS)}")
    src = source(o)
    conds = src.conditions(o["conditions"])
    res = CMAResult(conds, {}, {}, {}, {})
    total = len(conds) * 2 * vlm.n_layers * vlm.n_heads * -(-o["n"] // ctx.batch_size)
    with ctx.progress(total, "cma") as update:
        for c in conds:
            # the two ID conditions patch the same pairs (as in the paper), feature retrieval has its own
            pairs = src.cma_pairs(vlm, c, o["n"], tuple(o["grid"]), ctx.seed + (c == "feature_retrieval"),
                                  progress=ctx.show_progress)
            # keyed by the CMA options alone, so every experiment of a run that asks for them shares the unit;
            # "null2": the clean-value re-paired null (units of the earlier null design are not reused)
            # (the test is left out: it reads the stored scores, which do not depend on it)
            key = ctx.unit_key(f"cma-{c}", options={k: v for k, v in o.items() if k != "test"}, null="null2",
                               stimuli=src.tag)
            s, nl = ctx.unit(key, lambda pairs=pairs, c=c: condition_scores(
                vlm, pairs, c, ctx.batch_size, o["engine"], ctx.seed, progress=update))
            res.scores[c], res.null_scores[c] = s, nl
            res.mean[c], res.se[c] = mean_se(s, axis=-1)
            res.null_means[c] = null_mean_scores(nl, o["null_samples"], ctx.seed)
            res.significance[c] = head_significance(s, res.null_means[c], q=o["q"], method="bh")
            if o["test"] == "paired":  # each head against its own control patches, above the pooled null's quantile
                pooled = res.significance[c]
                res.significance[c] = {**paired_significance(s, nl, o["q"], floor=pooled["threshold"],
                                                             seed=ctx.seed), "threshold": pooled["threshold"]}
    ctx.shared.setdefault("render_seconds", []).extend(src.seconds)
    res.stimuli = src.describe()
    cache[same] = res
    return res


# -- the experiment -------------------------------------------------------------------------------------------
def select_heads(ctx: Context, k: int, heads=None, condition: str = "id_selection") -> tuple[list[tuple[int, int]], str]:
    """The heads to edit and where they came from: an explicit list, else the top-k of the CMA ranking."""
    vlm = ctx.vlm
    if heads is None:
        heads = ctx.options.get("heads")
    if heads:
        out = [(int(l), int(h)) for l, h in heads]
        for l, h in out:
            if not (0 <= l < vlm.n_layers and 0 <= h < vlm.n_heads):
                raise UserError(f"head ({l}, {h}) is out of range: {vlm.name} has {vlm.n_layers} layers x "
                                f"{vlm.n_heads} heads")
        if len(set(out)) != len(out):
            raise UserError(f"a head is listed twice in {out}")
        return out, "given"
    k = min(int(k), vlm.n_layers * vlm.n_heads)
    return [tuple(map(int, h)) for h in cma_scores(ctx).top_k(condition, k)], f"cma top-{k} {condition}"


def _layer_range(mask: np.ndarray) -> str:
    layers = np.nonzero(mask)[0]
    return "none" if layers.size == 0 else f"{layers.min()}-{layers.max()}" if layers.min() != layers.max() \
        else str(layers.min())


def _ticks(ax, L: int, H: int) -> None:
    ax.set_xlabel("Head")
    ax.set_ylabel("Layer")
    if H <= 40:
        ax.set_xticks(range(0, H, max(1, H // 10)))
    if L <= 40:
        ax.set_yticks(range(0, L, max(1, L // 10)))


@F.paper_style
def plot(st) -> dict:
    """Figures ``cma_stage_map`` (every head coloured by the stages it mediates) and ``cma_CONDITION`` (mean score
    per head, significant heads circled) from the stored table ``cma_heads``."""
    from matplotlib.patches import Patch

    rows, sm = st.table("cma_heads"), st.summary
    conds = [c for c in CONDITIONS if c in sm["conditions"]]
    L, H = 1 + max(r["layer"] for r in rows), 1 + max(r["head"] for r in rows)

    def grid(c, key):
        return F.column(sorted(F.where(rows, condition=c), key=lambda r: (r["layer"], r["head"])), key).reshape(L, H)

    mean = {c: grid(c, "value") for c in conds}
    w, h = min(6.8, max(2.6, 0.16 * H + 1.6)), min(6.0, max(2.0, 0.14 * L + 1.0))
    fig, axes = F.figure(1, 1, w=w, h=h)
    ax = axes[0, 0]
    ax.imshow(stage_map(mean, [F.STAGE[c] for c in conds]), origin="lower", aspect="auto", interpolation="nearest")
    _ticks(ax, L, H)
    ax.set_title(f"CMA heads by stage ({st.model})")
    ax.legend(handles=[Patch(color=F.STAGE[c], label=LABELS[c]) for c in conds], loc="upper left",
              bbox_to_anchor=(1.01, 1))
    figs = {"cma_stage_map": fig}
    for c in conds:
        m, sig = mean[c], grid(c, "significant") > 0
        lim = float(np.nanmax(np.abs(m))) or 1.0
        fig, axes = F.figure(1, 1, w=w + 0.6, h=h)
        ax = axes[0, 0]
        im = ax.imshow(m, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ys, xs = np.nonzero(sig)
        if ys.size:
            ax.scatter(xs, ys, s=14, facecolors="none", edgecolors="black", linewidths=0.8,
                       label=f"significant (BH q={sm['q']})")
            ax.legend(loc="lower left", bbox_to_anchor=(0, 1.08), ncol=1)
        _ticks(ax, L, H)
        ax.set_title(f"{LABELS[c]}: mean CMA score (n={sm['conditions'][c]['n_pairs']} pairs)")
        fig.colorbar(im, ax=ax, label="CMA score s")
        figs[f"cma_{c}"] = fig
    return figs


def resolution(dtype, res: CMAResult) -> dict:
    """How finely the model's dtype resolves a score: its relative rounding step ``eps`` (a score is a difference
    of logits, each stored to within ``eps`` times its magnitude: in bf16, 2^-7, so a score of a few ``eps`` x
    |logit| can be rounding; the fast and naive engines round differently) and, per condition, the spread of the
    re-paired null's per-pair scores to set it beside."""
    import torch

    eps = float(torch.finfo(dtype).eps)
    out = {"dtype": str(dtype).replace("torch.", ""), "eps": eps, "conditions": {}}
    for c in res.conditions:
        sd = float(np.std(res.null_scores[c])) if c in res.null_scores else None
        out["conditions"][c] = {"null_sd": sd}
    return out


def run(ctx: Context) -> dict:
    res = cma_scores(ctx, ctx.options)
    rows, summary = [], {"conditions": {}, "null": "re-paired counterfactual (see module docstring)",
                         "test": ctx.opt("test"), "null_samples": ctx.opt("null_samples"), "q": ctx.opt("q"),
                         "engine": ctx.opt("engine"),
                         "stimuli": res.stimuli, "resolution": resolution(ctx.vlm.dtype, res)}
    for c in res.conditions:
        sig, n = res.significance[c], res.scores[c].shape[-1]
        L, H = res.mean[c].shape
        for l in range(L):
            for h in range(H):
                rows.append({"measure": "cma_score", "value": float(res.mean[c][l, h]), "n": n, "condition": c,
                             "layer": l, "head": h, "se": float(res.se[c][l, h]), "p": float(sig["pvalues"][l, h]),
                             "p_adjusted": float(sig["p_adjusted"][l, h]), "significant": int(sig["mask"][l, h])})
        above = res.mean[c] > sig["threshold"]
        top = res.top_k(c, ctx.opt("top_k"))
        summary["conditions"][c] = {
            "n_pairs": n, "n_significant": sig["count"], "significant_layers": _layer_range(sig["mask"]),
            "null_threshold": sig["threshold"], "n_above_null_threshold": int(above.sum()),
            "above_threshold_layers": _layer_range(above), "min_attainable_p": sig["min_pvalue"],
            "max_mean": float(res.mean[c].max()),
            "top_k": [{"layer": l, "head": h, "mean": float(res.mean[c][l, h]), "se": float(res.se[c][l, h]),
                       "p_adjusted": float(sig["p_adjusted"][l, h])} for l, h in top],
            "line": f"{LABELS[c]} heads: {sig['count']} significant, layers {_layer_range(sig['mask'])}",
        }
    ctx.save_table("cma_heads", rows)
    dims = {"scores": ("layer", "head", "pair"), "null_scores": ("layer", "head", "pair"), "null_means": ("sample",)}
    arrays = {f"{k}_{c}": getattr(res, k)[c] for c in res.conditions for k in dims}
    ctx.save_arrays("cma_scores", arrays, {f"{k}_{c}": d for c in res.conditions for k, d in dims.items()})
    return summary


def report_rows(st):
    """For the report: the top heads of each condition."""
    rows = st.table("cma_heads")
    out = []
    for c in CONDITIONS:
        got = sorted(F.where(rows, condition=c), key=lambda r: -r["value"])[:5]
        out += [{k: r[k] for k in ("condition", "layer", "head", "measure", "value", "se", "p_adjusted",
                                   "significant", "n")} for r in got]
    return "Top 5 heads per condition (mean CMA score)", out, "results/cma_heads.csv (every head)"


def caption(summary: dict) -> str:
    conds = [c for c in CONDITIONS if c in summary["conditions"]]
    against = ("each head's own re-paired control patches, mean above the pooled null's quantile"
               if summary.get("test") == "paired" else "the re-paired null")
    return "; ".join(summary["conditions"][c]["line"] for c in conds) + f" (BH q={summary['q']} against {against})."
