"""The high-level causal model that ``organism-ids`` is trained to implement, and the trials it is trained on.

Planting (``plant``) trains declared heads to carry the variables of this model by interchange intervention
training, so its variables are the ground truth that ``vismech run recovery`` checks vismech against. For a
scene-description or colour-retrieval trial the variables are:

- ``R`` (ID retrieval), at each described object's mention: the cell of that object in the image;
- ``S`` (ID selection), where the next object is named: the cell of the object to name. In a description this is
  the first occupied cell in reading order (row by row, left to right) whose object has not been described; in
  the colour question it is the cell of the named shape;
- ``F`` (feature retrieval), where the next object is named: the colour and shape of the object at cell ``S``.

The answer is ``F``'s words ("colour shape" in a description, the colour in the colour question). With every
object but one described (the paper's task) ``S`` is the missing object's cell whatever the order; with several
objects left, reading order decides, so the model must use positions to answer at all.

The trials (``planting_trial``): the paper's description with 1 or more objects left and the described objects in
random order (``describe``), the same with the described objects in reading order (``describe_ordered``, whose
every "a" and every colour word is a naming position, trained as such), and the colour question (``color``), on
2x2 and 3x3 grids with 2-9 objects, colours and shapes drawn from the whole vocabulary ("random vocabulary").
Their counterfactual sources have the same prompt length: ``swap_source`` (two occupied cells exchange objects;
same prompt), ``feature_source`` (the target's features replaced at its cell; same prompt), ``resample_source``
(an independent trial of the same structure) and ``mention_feature_source`` (a described object's features replaced
at its cell: R unchanged). ``counterfactual_answer`` is what the model should say when one
variable takes its value from a source.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from vismech.scenes.core import Obj, Scene, Trial
from vismech.scenes.tasks import COLOR_RETRIEVAL, SCENE_DESCRIPTION, color_retrieval, scene_description
from vismech.scenes.vocab import COLORS, SHAPES

Cell = tuple[int, int]
KINDS = ("describe", "describe_ordered", "color")
ENTROPIES = ("high", "any", "low")


def select(task: str, occupied: list[Cell], mentioned: list[Cell]) -> Cell:
    """``S``: the cell of the object to name next (see the module docstring)."""
    if task == COLOR_RETRIEVAL:
        return mentioned[0]
    left = sorted(c for c in occupied if c not in set(mentioned))
    if not left:
        raise ValueError("every object is described: nothing is left to name")
    return left[0]


def selected_cell(trial: Trial, mentioned: list[Cell] | None = None) -> Cell:
    """``S`` of ``trial``, optionally with the mentions' cells (``R``) replaced by ``mentioned``."""
    cells = [o.cell for o in trial.mentioned] if mentioned is None else list(mentioned)
    return select(trial.task, [o.cell for o in trial.scene.objects], cells)


def answer_at(trial: Trial, cell: Cell) -> str:
    """``F``'s words for the object of ``trial``'s scene at ``cell``."""
    obj = trial.scene.at(cell)
    return obj.color if trial.task == COLOR_RETRIEVAL else obj.name


@dataclass(frozen=True)
class Structure:
    """What fixes a trial's token layout: task kind, grid, number of objects and of described objects."""

    kind: str
    grid: tuple[int, int]
    n_objects: int
    n_described: int


def _conjunctions(rng: random.Random, n: int, entropy: str) -> list[tuple[str, str]]:
    colors, shapes = list(COLORS), list(SHAPES)
    if entropy == "high":
        return list(zip(rng.sample(colors, n), rng.sample(shapes, n)))
    if entropy == "low":
        m = max(2, math.isqrt(n - 1) + 1)  # the smallest m >= 2 with m * m >= n: objects share features
        pool = [(c, s) for c in rng.sample(colors, m) for s in rng.sample(shapes, m)]
        return rng.sample(pool, n)
    return rng.sample([(c, s) for c in colors for s in shapes], n)


def draw_structure(rng: random.Random, kind: str, grid: tuple[int, int], full: float = 0.0) -> Structure:
    """A random structure of ``kind``: 2 to all cells occupied, 1 to all but one object described. ``full``: the
    chance that a description fills the grid and describes every object but one (the paper's task at its largest,
    otherwise drawn about once in (cells - 1)^2 descriptions); with ``full`` = 0 the draws are as they always were."""
    cells = grid[0] * grid[1]
    if kind == "color":
        return Structure(kind, grid, rng.randint(2, cells), 1)
    if full > 0 and rng.random() < full:
        return Structure(kind, grid, cells, cells - 1)
    n = rng.randint(2, cells)
    return Structure(kind, grid, n, rng.randint(1, n - 1))


def build(kind: str, grid: tuple[int, int], objs: list[Obj], described: list[Obj] | None = None,
          target: Obj | None = None) -> Trial:
    """The trial on objects ``objs``: a description of ``described`` in the order given, or the colour question
    about ``target``. ``meta["ordered"]``: the described objects are in reading order, so every "a" and colour word
    of the prompt is a naming position whose object ``S`` fixes (training labels them)."""
    scene = Scene(tuple(sorted(objs, key=lambda o: o.cell)), tuple(grid))
    if kind == "color":
        trial = color_retrieval(scene, target)
        ordered = True
    else:
        cell = select(SCENE_DESCRIPTION, [o.cell for o in objs], [o.cell for o in described])
        trial = scene_description(scene, scene.at(cell), described)
        ordered = [o.cell for o in described] == sorted(o.cell for o in described)
    trial.meta.update(kind=kind, ordered=ordered, target_cell=list(trial.target.cell))
    return trial


def planting_trial(rng: random.Random, structure: Structure, entropy: str = "any") -> Trial:
    """A random trial of ``structure``; colours and shapes from the whole vocabulary under ``entropy``."""
    s = structure
    cells = [(r, c) for r in range(s.grid[0]) for c in range(s.grid[1])]
    if s.kind == "color":
        conj = _conjunctions(rng, s.n_objects, "high")  # the asked shape must be unique
    else:
        conj = _conjunctions(rng, s.n_objects, entropy)
    objs = [Obj(c, sh, p) for (c, sh), p in zip(conj, rng.sample(cells, s.n_objects))]
    if s.kind == "color":
        return build(s.kind, s.grid, objs, target=rng.choice(objs))
    described = rng.sample(objs, s.n_described)
    if s.kind == "describe_ordered":
        described.sort(key=lambda o: o.cell)
    return build(s.kind, s.grid, objs, described)


def structure_of(trial: Trial) -> Structure:
    return Structure(trial.meta["kind"], tuple(trial.scene.grid), len(trial.scene.objects), len(trial.mentioned))


def _rebuild(trial: Trial, mapping: dict[Obj, Obj]) -> Trial:
    """``trial`` with every object replaced by ``mapping[object]``, mentions kept in their order (same wording
    wherever the mentioned objects keep their features)."""
    objs = [mapping[o] for o in trial.scene.objects]
    kind, grid = trial.meta["kind"], trial.scene.grid
    if kind == "color":
        return build(kind, grid, objs, target=mapping[trial.target])
    return build(kind, grid, objs, [mapping[o] for o in trial.mentioned])


def swap_source(trial: Trial, rng: random.Random) -> tuple[Trial, tuple[Cell, Cell]]:
    """``trial`` with the objects of two occupied cells exchanged (one of them a described object's), same prompt.
    Returns the source and the two cells."""
    objs = list(trial.scene.objects)
    if len(objs) < 2:
        raise ValueError("a swap needs two objects")
    a = rng.choice(list(trial.mentioned))
    b = rng.choice([o for o in objs if o != a])
    mapping = {o: o for o in objs}
    mapping[a], mapping[b] = Obj(a.color, a.shape, b.cell), Obj(b.color, b.shape, a.cell)
    return _rebuild(trial, mapping), (a.cell, b.cell)


def feature_source(trial: Trial, rng: random.Random) -> Trial:
    """``trial`` with its target's features replaced at the same cell (the colour only in the colour question, whose
    prompt names the shape), by ones no object of the scene has; same prompt."""
    t = trial.target
    used_c = {o.color for o in trial.scene.objects}
    used_s = {o.shape for o in trial.scene.objects}
    color = rng.choice([c for c in COLORS if c not in used_c])
    shape = t.shape if trial.task == COLOR_RETRIEVAL else rng.choice([s for s in SHAPES if s not in used_s] or
                                                                      [s for s in SHAPES if s != t.shape])
    new = Obj(color, shape, t.cell)
    return _rebuild(trial, {o: (new if o == t else o) for o in trial.scene.objects})


def mention_feature_source(trial: Trial, rng: random.Random) -> tuple[Trial, int] | None:
    """``trial`` with one described object's colour and shape replaced at the same cell by others (the prompt names
    the new object: same length), and the index of that mention; None when nothing is described. R, the mentioned
    object's cell, is the same in both: what ID retrieval heads write there must not depend on the features. The
    new shape is one no object of the scene has (the old one when the vocabulary has none left, so a shape stays
    unique), the new colour one no object has where some are left, else any other than the old one that makes no
    conjunction the scene already holds."""
    if not trial.mentioned:
        return None
    j = rng.randrange(len(trial.mentioned))
    old = trial.mentioned[j]
    objs = trial.scene.objects
    shape = rng.choice([s for s in SHAPES if s not in {o.shape for o in objs}] or [old.shape])
    free = [c for c in COLORS if c not in {o.color for o in objs}]
    names = {o.name for o in objs}
    color = rng.choice(free or [c for c in COLORS if c != old.color and Obj(c, shape, old.cell).name not in names])
    new = Obj(color, shape, old.cell)
    return _rebuild(trial, {o: (new if o == old else o) for o in objs}), j


def resample_source(trial: Trial, rng: random.Random, entropy: str = "any") -> Trial:
    """An independent trial of ``trial``'s structure (same prompt length)."""
    return planting_trial(rng, structure_of(trial), entropy)


def counterfactual_answer(base: Trial, source: Trial, variable: str) -> str:
    """The answer of ``base`` when ``variable`` takes its value from ``source`` (same structure): ``R`` (every
    mention's cell from the source, then ``S`` and ``F`` follow in the base image), ``S`` (the source's selected
    cell, read in the base image), ``F`` (the source's features), or ``none`` (the base answer)."""
    if variable == "R":
        return answer_at(base, selected_cell(base, [o.cell for o in source.mentioned]))
    if variable == "S":
        return answer_at(base, selected_cell(source))
    if variable == "F":
        return source.answer
    if variable == "none":
        return base.answer
    raise ValueError(f"unknown variable {variable!r}; variables are R, S, F, none")
