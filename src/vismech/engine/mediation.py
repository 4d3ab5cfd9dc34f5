"""The causal-mediation sweep: every head's CMA score on counterfactual pairs, and the re-paired null.

For one condition (``id_retrieval`` patches the described object's mention tokens, ``id_selection`` and
``feature_retrieval`` the last token), each pair's counterfactual head outputs are patched, head by head, into its
clean run (``patching.head_patch``: many heads stacked as rows of one forward, the prefix cached; or one forward
per head, ``engine="naive"``), and each head's score is the change in the logit difference of the two answers
(``analysis.cma.logit_diff_score``). The null patches the counterfactual of another pair, one that carries this
pair's clean value of the condition variable (``null_partners``). Data parallel under ``torchrun``: chunks of pairs,
or heads, are split over the processes and gathered (``condition_scores``).
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from vismech import distributed
from vismech.analysis.cma import logit_diff_score
from vismech.engine import patching
from vismech.errors import UserError
from vismech.scenes.core import CounterfactualPair
from vismech.scenes.counterfactual import CONDITIONS


def condition_positions(batch, condition: str) -> list[list[int]]:
    """Where a condition patches, per row: the described object's mention tokens, or the last token."""
    if condition == "id_retrieval":
        return [list(m[0]) for m in batch.mentions]
    if condition in ("id_selection", "feature_retrieval"):
        return [[batch.last] for _ in range(len(batch))]
    raise UserError(f"unknown CMA condition {condition!r}; conditions are {', '.join(CONDITIONS)}")


def condition_variable(pair: CounterfactualPair, condition: str, context: str = "counterfactual"):
    """What the counterfactual changes in ``condition``, read in the pair's ``counterfactual`` or ``clean`` context."""
    trial = pair.counterfactual if context == "counterfactual" else pair.clean
    if condition == "id_retrieval":
        return tuple(trial.mentioned[0].cell)
    if condition == "id_selection":
        return tuple(trial.target.cell)
    return (pair.answer_star if context == "counterfactual" else pair.answer).split()[0]


def null_partners(pairs: list[CounterfactualPair], condition: str, seed: int) -> list[int]:
    """For each pair, another pair whose counterfactual carries this pair's clean value of the condition variable
    (else one whose counterfactual value differs from this pair's, else any other pair)."""
    if len(pairs) < 2:
        raise UserError("the re-paired null needs at least 2 pairs per condition; use n >= 2")
    rng = random.Random(seed)
    cf = [condition_variable(p, condition) for p in pairs]
    clean = [condition_variable(p, condition, "clean") for p in pairs]
    out = []
    for i in range(len(pairs)):
        others = [j for j in range(len(pairs)) if j != i]
        cand = ([j for j in others if cf[j] == clean[i]] or [j for j in others if cf[j] != cf[i]] or others)
        out.append(rng.choice(cand))
    return out


def _baseline(vlm, clean, src, pos, tid, engine: str) -> torch.Tensor:
    """Clean scores [B, 2] of the two answers, computed the way the engine computes patched ones."""
    if engine == "naive":
        return vlm.score_answers(clean, tid).scores
    # the text-only path of head_patch with an exact no-op edit (adding 0), so its numerics match the patches
    return patching.head_patch(vlm, clean, src, pos, tid, heads=[(0, 0)], mode="add", scale=0.0)[0]


def _patched(vlm, clean, src, pos, tid, engine: str, progress) -> torch.Tensor:
    """Patched logits [L*H, B, 2] of the two answer tokens, by the chosen engine."""
    if engine == "naive":
        out = patching.naive_head_patch(vlm, clean, src, pos, tid)
        if progress:
            progress(out.shape[0])
        return out
    return patching.head_patch(vlm, clean, src, pos, tid, progress=progress)


def condition_scores(vlm, pairs: list[CounterfactualPair], condition: str, batch_size: int = 16,
                     engine: str = "fast", seed: int = 0, null: bool = True, progress=None
                     ) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-pair CMA scores [L, H, n] of every head, and re-paired null scores [L, H, n] (None if ``null`` off).

    Pairs are processed in chunks of ``batch_size``. Data parallel (``torchrun``): with at least as many chunks
    as processes, each process takes every world()-th chunk whole (encoding, captures, prefix cache and every head;
    nothing is repeated across processes), the counterfactual values the null needs are exchanged, and the scores
    gathered; with fewer chunks the engine splits the heads instead. Either way every process returns the full
    arrays, equal to a one-process run (same chunks, same numbers)."""
    if engine not in ("fast", "naive"):
        raise UserError(f"engine must be 'fast' or 'naive', not {engine!r}")
    L, H, n = vlm.n_layers, vlm.n_heads, len(pairs)
    starts = list(range(0, n, batch_size))
    by_chunk = distributed.active() and len(starts) >= distributed.world()
    chunks = []
    for s in (distributed.shard(starts) if by_chunk else starts):
        part = pairs[s:s + batch_size]
        clean = vlm.encode([p.clean for p in part])
        cf = vlm.encode([p.counterfactual for p in part])
        patching.check_same_layout(clean, cf)
        pos, lens = patching.pad_positions(condition_positions(clean, condition))
        names = [[p.answer, p.answer_star] for p in part]
        tid = vlm.answers(clean, names)
        tid.check_distinct(names)
        src = patching.capture_z(vlm, cf, pos)
        chunks.append((list(range(s, s + len(part))), clean, pos, lens, tid, src))
    partner = null_partners(pairs, condition, seed) if null else None
    if null:  # pair i's null patches pair partner[i]'s counterfactual values: every process needs all of them
        shared = [(idx, lens, src) for idx, _, _, lens, _, src in chunks]
        if by_chunk:
            mine = [(idx, lens, {l: v.cpu() for l, v in src.items()}) for idx, lens, src in shared]
            shared = [c for got in distributed.gather(mine) for c in got]
        where = {i: (lens, src, r) for idx, lens, src in shared for r, i in enumerate(idx)}
    scores = np.zeros((L, H, n))
    nulls = np.zeros((L, H, n)) if null else None
    with distributed.solo() if by_chunk else contextlib.nullcontext():
        for idx, clean, pos, lens, tid, src in chunks:
            with patching.reused_setup():  # baseline, scores and null: one vision forward, one prefix
                zero, one = np.zeros(len(idx), int), np.ones(len(idx), int)
                base = _baseline(vlm, clean, src, pos, tid, engine).numpy()
                out = _patched(vlm, clean, src, pos, tid, engine, progress)
                scores[..., idx] = logit_diff_score(base, out.numpy(), zero, one).reshape(L, H, -1)
                if null:
                    nsrc = {l: torch.empty_like(v) for l, v in src.items()}
                    for r, i in enumerate(idx):
                        jlens, jsrc, rj = where[partner[i]]
                        take = [min(k, lens[r] - 1, jlens[rj] - 1) for k in range(len(pos[0]))]
                        for l in nsrc:
                            nsrc[l][r] = jsrc[l][rj, take].to(nsrc[l].device)
                    out = _patched(vlm, clean, nsrc, pos, tid, engine, progress)
                    nulls[..., idx] = logit_diff_score(base, out.numpy(), zero, one).reshape(L, H, -1)
    if by_chunk:  # each process filled its own pairs' columns; the others are zero
        scores = sum(distributed.gather(scores))
        nulls = sum(distributed.gather(nulls)) if null else None
    return scores, nulls
