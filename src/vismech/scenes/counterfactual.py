"""Clean/counterfactual pairs for the paper's head-level causal mediation analysis (§3.4, App. A.3).

Every pair is built on a 2-object scene-description trial: object A is described ("In this image there is a
{A} and a"), object B is the target; A and B sit at two distinct random cells and have distinct colours and distinct
shapes. The three conditions:

- ``id_retrieval`` and ``id_selection``: c2 = the same two objects with their cells swapped, same prompt.
  a1 = B.name, a1* = A.name (patching position IDs from c2 makes the model point at A, so it repeats A). The two
  conditions share their stimuli and differ only in where the analysis patches (A's prompt tokens vs last token).
- ``feature_retrieval``: c2 = B replaced by B' at B's cell, whose colour and shape differ from both A's and B's;
  A is unchanged. a1 = B.name, a1* = B'.name.

c1 and c2 prompts are identical strings, so their token positions match one to one. The first words of a1 and a1*
(colours) always differ, as first-token logit scoring needs.
"""

from __future__ import annotations

import random
from typing import Sequence

from vismech.errors import UserError

from .core import CounterfactualPair, Obj, Scene, Trial
from .tasks import scene_description
from .vocab import COLORS, SHAPES, check_color, check_shape

CONDITIONS: tuple[str, ...] = ("id_retrieval", "id_selection", "feature_retrieval")


def _trial(a: Obj, b: Obj, grid: tuple[int, int], meta: dict) -> Trial:
    scene = Scene(tuple(sorted((a, b), key=lambda o: o.cell)), tuple(grid))
    trial = scene_description(scene, b, (a,))
    trial.meta.update(meta, described_cell=list(a.cell), target_cell=list(b.cell))
    return trial


def cma_pairs(condition: str, n: int, seed: int = 0, grid: tuple[int, int] = (2, 2),
              colors: Sequence[str] = tuple(COLORS), shapes: Sequence[str] = SHAPES) -> list[CounterfactualPair]:
    """``n`` pairs for ``condition`` (one of ``CONDITIONS``), deterministic under ``seed``.

    Colours and shapes are drawn uniformly from ``colors`` and ``shapes`` (defaults: the whole vocabulary; the paper
    does not list its CMA vocabulary). meta of both trials: ``condition``, ``pair``, ``described_cell``,
    ``target_cell``.
    """
    if condition not in CONDITIONS:
        raise UserError(f"unknown CMA condition {condition!r}; conditions are {', '.join(CONDITIONS)}")
    colors, shapes = list(colors), list(shapes)
    for c in colors:
        check_color(c)
    for s in shapes:
        check_shape(s)
    need = 3 if condition == "feature_retrieval" else 2
    if len(set(colors)) < need or len(set(shapes)) < need:
        raise UserError(f"{condition} needs at least {need} distinct colours and {need} distinct shapes")
    cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    if len(cells) < 2:
        raise UserError(f"a {grid[0]}x{grid[1]} grid has no room for two objects")
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        cell_a, cell_b = rng.sample(cells, 2)
        ca, cb, *cx = rng.sample(colors, need)
        sa, sb, *sx = rng.sample(shapes, need)
        a, b = Obj(ca, sa, cell_a), Obj(cb, sb, cell_b)
        meta = {"condition": condition, "pair": i}
        clean = _trial(a, b, grid, meta)
        if condition == "feature_retrieval":
            b2 = Obj(cx[0], sx[0], cell_b)
            counterfactual = _trial(a, b2, grid, meta)
            star = b2.name
        else:
            counterfactual = _trial(Obj(ca, sa, cell_b), Obj(cb, sb, cell_a), grid, meta)
            star = a.name
        assert clean.prompt == counterfactual.prompt
        pairs.append(CounterfactualPair(condition, clean, counterfactual, answer=b.name, answer_star=star))
    return pairs
