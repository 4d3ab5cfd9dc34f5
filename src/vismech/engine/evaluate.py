"""Behaviour: how often the model names the right answer, by task, grid, entropy condition and target cell.

Two measures per trial: first-token accuracy (the correct answer is the model's greedy answer: the arg-max of the
last-token logits over the whole vocabulary is its token where the task's answers are single tokens, else every
token of it, teacher forced; ``models.answers``, whose per-task rule each row records in ``scoring``; read off the
greedy continuation when there is one, ``AnswerSet.greedy_from``) and generation
accuracy (greedy decoding of a few tokens, parsed by ``vismech.scenes.answers``). Intervals are Wilson 95%
intervals over trials.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable


from vismech.analysis.stats import rate
from vismech.models.vlm import VLM
from vismech.scenes import answers
from vismech.scenes.core import Trial

GEN_TOKENS = {"scene_description": 4, "color_retrieval": 3, "spatial_relation": 3, "counting": 48}


def batches(trials: list[Trial], size: int) -> list[list[int]]:
    """Indices of ``trials`` in chunks of at most ``size`` that share a grid (one canvas size per batch)."""
    by_grid: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(trials):
        by_grid[(t.scene.grid, t.task)].append(i)
    return [idx[s:s + size] for idx in by_grid.values() for s in range(0, len(idx), size)]


def evaluate(vlm: VLM, trials: list[Trial], batch_size: int = 16, generate: bool = True,
             progress: Callable[[int], None] | None = None, max_new_tokens: int | None = None) -> list[dict]:
    """One tidy row per trial: labels, the answer, first-token and (optionally) generation correctness."""
    rows: list[dict] = [{} for _ in trials]
    for idx in batches(trials, batch_size):
        chunk = [trials[i] for i in idx]
        b = vlm.encode(chunk)
        aset = vlm.answers(b, [[t.answer] for t in chunk])
        n_new = max_new_tokens or GEN_TOKENS.get(chunk[0].task, 4)
        hit, texts = None, [None] * len(chunk)
        if generate:  # the first-token hits read off the greedy continuation where it is long enough
            ids = vlm.generate_ids(b, n_new)
            hit, texts = aset.greedy_from(ids, n_new), vlm.decode(ids)
        hit = (vlm.score_answers(b, aset).greedy if hit is None else hit)[:, 0]
        for j, (i, t) in enumerate(zip(idx, chunk)):
            rows[i] = {
                "trial": i, "task": t.task, "grid": f"{t.scene.grid[0]}x{t.scene.grid[1]}",
                "entropy": t.meta.get("entropy") or "", "n_objects": len(t.scene.objects),
                "target_cell": "" if t.target is None else f"{t.target.cell[0]},{t.target.cell[1]}",
                "answer": t.answer, "first_token_correct": int(hit[j]), "scoring": aset.rule,
                "generated": texts[j] if texts[j] is not None else "",
                "parsed": "" if texts[j] is None else (answers.parse(t, texts[j]) or ""),
                "generation_correct": "" if texts[j] is None else int(answers.is_correct(t, texts[j])),
            }
        if progress:
            progress(len(chunk))
    return rows


def summarize(rows: list[dict], by: tuple[str, ...] = ("task", "grid", "entropy")) -> list[dict]:
    """Accuracy with Wilson 95% intervals per group of ``by`` columns, for both measures."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in by)].append(r)
    out = []
    for key, rs in sorted(groups.items()):
        for measure in ("first_token_correct", "generation_correct"):
            vals = [r[measure] for r in rs if r[measure] != ""]
            if not vals:
                continue
            out.append({**dict(zip(by, key)), "measure": measure.replace("_correct", ""),
                        **rate(sum(vals), len(vals))})
    return out
