"""``counting-ablation``: zero-ablating the top CMA heads destroys counting (App. C, Fig. 46).

Heads are ranked by their highest mean CMA score over the three conditions (``CMAResult.max_score``). For each K
the top-K heads, the bottom-K heads and ``random_draws`` random sets of K heads have their outputs (site ``z``,
the o_proj input) set to 0 at every position of every forward, generated tokens included
(``interventions.zero_heads_per_block``: the settings run as row blocks of one batch, generation with the
KV cache; on CUDA the rows of a pass follow the memory free, from the previous pass's measured peak per row).
Counting trials are the App. C set (3-8 unique objects on a 3x3 grid, ``scenes.sets.counting_set``) with the
paper's prompt.

Two accuracies per setting, each with a Wilson 95% interval over trials: generation (greedy, ``max_new_tokens``,
parsed by ``scenes.answers``: the number after the last "Answer:", the format the prompt asks for) and first
token (the count is the greedy answer: where a count is one token, the arg-max is it; where counts span several
tokens, as with real tokenizers that split digits or write a bare space first, every token of it, teacher forced,
``models.answers``; meaningful only for models that answer with the number at once).
Random-K is reported per draw and as the mean and range over draws.

Options: ``n`` trials (32), ``k_grid`` (None: 0 and 2, 5, 10, 20, 50, 100% of the model's heads; the paper
goes to 500 of 2,560), ``random_draws`` (3), ``max_new_tokens`` (96), ``generate`` (True),
``grid`` ((3, 3)), ``cma_n`` (50).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from vismech.engine import decode
from vismech.engine import interventions as iv
from vismech.engine import patching, replay
from vismech.analysis.stats import rate
from vismech.errors import UserError
from vismech.experiments.cma import cma_scores
from vismech.experiments import figures as F
from vismech.experiments.common import Context
from vismech.models.answers import AnswerSet
from vismech.scenes import answers
from vismech.scenes.sets import counting_set

NAME = "counting-ablation"
DESCRIPTION = "Counting accuracy when the top-K / bottom-K / random-K CMA heads are zero-ablated (App. C, Fig. 46)"
DEFAULTS = {"n": 32, "k_grid": None, "random_draws": 3, "max_new_tokens": 96, "generate": True, "grid": (3, 3),
            "cma_n": 50}
FRACTIONS = (0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def k_grid(total: int) -> list[int]:
    return sorted({int(round(f * total)) for f in FRACTIONS})


def head_order(max_score: np.ndarray) -> list[tuple[int, int]]:
    """Every (layer, head), highest max-CMA score first (ties: lower layer, then lower head)."""
    L, H = max_score.shape
    flat = np.nan_to_num(max_score, nan=-np.inf).ravel()
    order = np.lexsort((np.arange(L * H), -flat))
    return [(int(i // H), int(i % H)) for i in order]


def accuracies(vlm, batches, head_sets, generate: bool, max_new_tokens: int, rows: int, resize=None
               ) -> list[tuple[list[int], list[int]]]:
    """First-token and generation hits per trial for each set of zero-ablated heads in ``head_sets``: the settings
    run as row blocks of one batch (each trial batch, with its ``AnswerSet``, repeated once per setting, about
    ``rows`` rows per forward), the same numbers as one setting at a time. With ``generate``: the batch's
    language-model inputs are captured once (one vision pass) and decoded greedily with a KV cache
    (``engine.decode.greedy``), and the first-token hits are read off the continuations
    (``AnswerSet.greedy_from``: no scoring forward); without, one scoring forward per pass.

    ``resize(rows, ran_rows, peak_bytes)`` gives the rows of the next pass after one of ``ran_rows`` rows (default
    on CUDA: from that pass's measured peak memory per row and the memory free now, as the patching engine sizes
    its chunks; elsewhere ``rows`` stays). An out-of-memory pass is run again with half the rows."""
    cuda = vlm.device.type == "cuda"
    if resize is None and cuda:
        def resize(r, ran, peak):
            return patching.rows_from_memory(patching.free_bytes(vlm.device), peak / ran, r) if peak else r
    out = [([], []) for _ in head_sets]
    for b, aset in batches:
        from_inputs = generate and decode.replays(vlm, b)  # greedy decoding on the captured inputs
        inp = replay.lm_inputs(vlm, b, logits=False)[0] if from_inputs else None
        s = 0
        while s < len(head_sets):
            group = head_sets[s:s + max(1, rows // len(b))]
            if cuda:
                torch.cuda.reset_peak_memory_stats(vlm.device)
                before = torch.cuda.memory_allocated(vlm.device)
            try:
                rep = AnswerSet(aset.rule, aset.seqs * len(group))
                tiled = lambda: b.take(list(range(len(b))) * len(group))  # noqa: E731  (the batch once per setting)
                first = texts = None
                with iv.zero_heads_per_block(vlm, group, len(b)):
                    if from_inputs:
                        ids = decode.greedy(vlm, inp.repeat(len(group)),
                                            b.inputs["attention_mask"].repeat(len(group), 1), max_new_tokens).ids
                    elif generate:  # the full model, vision tower included, on every row
                        ids = vlm.generate_ids(tiled(), max_new_tokens)
                    if generate:
                        texts, first = vlm.decode(ids), rep.greedy_from(ids, max_new_tokens)
                    if first is None:
                        first = vlm.score_answers(tiled(), rep).greedy
                first = first[:, 0].int().tolist()
            except RuntimeError as e:
                if not replay.is_oom(e) or len(group) == 1:
                    raise
                torch.cuda.empty_cache()
                rows = max(len(b), rows // 2)
                continue
            for g in range(len(group)):
                out[s + g][0].extend(first[g * len(b):(g + 1) * len(b)])
                if texts is not None:
                    rows_g = texts[g * len(b):(g + 1) * len(b)]
                    out[s + g][1].extend(int(answers.is_correct(t, x)) for t, x in zip(b.trials, rows_g))
            s += len(group)
            if resize is not None:
                peak = torch.cuda.max_memory_allocated(vlm.device) - before if cuda else 0
                rows = resize(rows, len(b) * len(group), peak)
    return out


@F.paper_style
def plot(st) -> dict:
    """Figure ``counting_ablation`` from the stored table: counting accuracy against the number of ablated heads,
    top-K, bottom-K and random-K (mean and range over draws)."""
    rows, total = st.table("counting_ablation"), st.summary["heads_total"]
    measures = [m for m in ("generation", "first_token") if F.where(rows, measure=m)]
    fig, axes = F.figure(len(measures), 1, w=3.0, h=2.4)
    for ax, m in zip(axes[0], measures):
        for ranking in ("top", "bottom"):
            rs = sorted(F.where(rows, measure=m, ranking=ranking), key=lambda r: r["k"])
            v = F.column(rs, "value")
            ax.errorbar(F.column(rs, "k"), v, yerr=F.error(v, F.column(rs, "ci_low"), F.column(rs, "ci_high")),
                        marker="o", ms=3, capsize=2, color=F.ROLE[ranking], label=f"{ranking}-K ablated")
        by_k = defaultdict(list)
        for r in F.where(rows, measure=m, ranking="random"):
            by_k[r["k"]].append(r["value"])
        k = sorted(by_k)
        ax.plot(k, [np.mean(by_k[x]) for x in k], marker="s", ms=3, color=F.ROLE["control"], label="random-K (mean)")
        ax.fill_between(k, [min(by_k[x]) for x in k], [max(by_k[x]) for x in k], color=F.ROLE["control"], alpha=0.25,
                        lw=0, label="random-K (range)")
        ax.set_xlabel(f"Number of ablated heads K (of {total})")
        ax.set_ylabel("Counting accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("generation" if m == "generation" else "first token")
    fig.tight_layout()
    F.figure_legend(fig, axes[0], ncol=4)
    return {"counting_ablation": fig}


def run(ctx: Context) -> dict:
    vlm = ctx.vlm
    total = vlm.n_layers * vlm.n_heads
    ks = sorted(set(ctx.opt("k_grid") or k_grid(total)))
    if ks[-1] > total or ks[0] < 0:  # checked before the CMA work
        raise UserError(f"K must lie in 0..{total} (the model's heads), got {ks}")
    res = cma_scores(ctx)
    order = head_order(res.max_score())
    trials = counting_set(ctx.opt("n"), seed=ctx.seed, grid=tuple(ctx.opt("grid")))
    batches = []
    for s in range(0, len(trials), ctx.batch_size):
        b = vlm.encode(trials[s:s + ctx.batch_size])
        batches.append((b, vlm.answers(b, [[t.answer] for t in b.trials])))
    rng = np.random.default_rng(ctx.seed)
    settings = []  # (ranking, draw, k, heads)
    for k in ks:
        settings += [("top", 0, k, order[:k]), ("bottom", 0, k, order[::-1][:k])]
        for d in range(ctx.opt("random_draws")):
            settings.append(("random", d, k, [order[i] for i in sorted(rng.choice(total, k, replace=False))]))
    rows, cache, done = [], {}, {}
    sets = list(dict.fromkeys(tuple(sorted(h)) for _, _, _, h in settings))  # K = 0 and all heads: one set each

    def compute(key):  # a missing unit computes itself and the next missing ones together (one batched pass)
        if key not in done:
            group = [k for k in sets[sets.index(key):] if k not in done][:max(1, 4 * ctx.batch_size)]
            done.update(zip(group, accuracies(vlm, batches, group, ctx.opt("generate"), ctx.opt("max_new_tokens"),
                                              4 * ctx.batch_size)))  # on CUDA the rows then follow free memory
        return done[key]

    with ctx.progress(len(settings), "counting-ablation") as update:
        for ranking, draw, k, heads in settings:
            key = tuple(sorted(heads))
            if key not in cache:
                cache[key] = ctx.unit(ctx.unit_key(f"counting-k{k}", heads=key), lambda key=key: compute(key))
            for measure, hits in zip(("first_token", "generation"), cache[key]):
                if hits:
                    w = rate(sum(hits), len(hits))
                    rows.append({"measure": measure, **w, "ranking": ranking, "draw": draw, "k": k})
            update(1)
    ctx.save_table("counting_ablation", rows)
    summary = {"n": len(trials), "k_grid": ks, "heads_total": total, "random_draws": ctx.opt("random_draws"),
               "ranking": "max CMA score over the three conditions", "accuracy": {}}
    for m in ("generation", "first_token"):
        per = {}
        for k in ks:
            get = [r for r in rows if r["measure"] == m and r["k"] == k]
            if not get:
                continue
            rnd = [r["value"] for r in get if r["ranking"] == "random"]
            one = {r["ranking"]: r for r in get if r["ranking"] != "random"}
            per[str(k)] = {"top": one["top"]["value"], "bottom": one["bottom"]["value"],
                           "random_mean": float(np.mean(rnd)) if rnd else None,
                           "random_range": [min(rnd), max(rnd)] if rnd else None}
        if per:
            summary["accuracy"][m] = per
    return summary


def report_rows(st):
    """For the report: top- and bottom-K accuracy at every K (random draws: in the CSV)."""
    rows = [{k: r[k] for k in ("ranking", "k", "measure", "value", "ci_low", "ci_high", "n")}
            for r in st.table("counting_ablation") if r["ranking"] != "random"]
    return "Accuracy with the top or bottom K heads ablated", rows, "results/counting_ablation.csv"


def caption(summary: dict) -> str:
    m = "generation" if "generation" in summary["accuracy"] else "first_token"
    acc = summary["accuracy"][m]
    ks = [k for k in acc if k != "0"]
    mid = ks[len(ks) // 2] if ks else "0"
    a = acc[mid]
    return (f"Counting accuracy ({m.replace('_', ' ')}, n={summary['n']}): {100 * acc['0']['top']:.0f}% intact; "
            f"with K={mid} of {summary['heads_total']} heads ablated: top {100 * a['top']:.0f}%, bottom "
            f"{100 * a['bottom']:.0f}%, random {100 * a['random_mean']:.0f}% (mean of {summary['random_draws']}).")
