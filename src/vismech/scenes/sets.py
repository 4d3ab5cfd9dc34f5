"""The paper's trial sets: the K x N x N scene-description protocol and the PCA, entropy, relative/absolute, colour
retrieval, spatial relation and counting sets.

Every set is a pure function of its arguments: randomness comes from one ``random.Random(seed)`` made inside the
function, never from global state, so the same arguments give the same trials in the same order. Objects in a scene
are stored sorted by cell. ``meta`` values are JSON-native (cells as ``[row, col]`` lists) so that trials round-trip
exactly through ``Trial.to_json``. Where the paper does not name a colour/shape vocabulary, the defaults below are
this package's choice and are exposed as arguments.
"""

from __future__ import annotations

import math
import random
from typing import Sequence

from vismech.errors import UserError

from .core import Obj, Scene, Trial
from .tasks import COLOR_RETRIEVAL, SCENE_DESCRIPTION, color_retrieval, counting, relation_target, \
    scene_description, spatial_relation
from .vocab import COLORS, RELATIONS, SHAPES, check_color, check_shape

Conj = tuple[str, str]
Cell = tuple[int, int]

PCA_CONJUNCTIONS: tuple[Conj, ...] = (
    ("red", "circle"), ("green", "triangle"), ("blue", "square"),
    ("purple", "star"), ("yellow", "heart"), ("orange", "cross"),
)
PCA_CELLS: tuple[Cell, ...] = tuple((r, c) for r in range(3) for c in (0, 2))

# Default vocabularies of the entropy sets, per (grid, condition): (colours, shapes). Low entropy uses every
# conjunction of the colours x shapes; high entropy pairs the i-th colour with the i-th shape.
ENTROPY_VOCAB: dict[tuple[tuple[int, int], str], tuple[tuple[str, ...], tuple[str, ...]]] = {
    ((2, 2), "low"): (("red", "blue"), ("circle", "square")),
    ((2, 2), "high"): (("red", "green", "blue", "yellow"), ("circle", "triangle", "square", "star")),
    ((3, 3), "low"): (("red", "green", "blue"), ("circle", "triangle", "square")),
    ((3, 3), "high"): (("red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "cyan"), SHAPES[:9]),
}
ENTROPY_K = {(2, 2): 100, (3, 3): 50}  # trials per (identity, cell), as in the paper

# The relative/absolute set: four 2x2 arrangements, one per quadrant of a 3x3 grid, all containing the centre.
RELABS_ORIGINS: tuple[Cell, ...] = ((0, 0), (0, 1), (1, 0), (1, 1))  # top-left cell of each arrangement
RELABS_CONJUNCTIONS: tuple[Conj, ...] = (("pink", "circle"), ("orange", "square"), ("purple", "heart"),
                                         ("blue", "triangle"))  # the objects of the paper's Fig. 13

COUNTING_COLORS = ("red", "blue", "green", "yellow")
COUNTING_SHAPES = ("triangle", "square", "circle", "cross")
RETRIEVAL_COLORS = ("red", "green", "blue")
RETRIEVAL_SHAPES = ("circle", "square", "triangle")


def all_cells(grid: tuple[int, int]) -> list[Cell]:
    return [(r, c) for r in range(grid[0]) for c in range(grid[1])]


def _scene(objs: Sequence[Obj], grid: tuple[int, int]) -> Scene:
    return Scene(tuple(sorted(objs, key=lambda o: o.cell)), tuple(grid))


def _check_conjunctions(conjunctions: Sequence[Conj]) -> list[Conj]:
    conj = [tuple(c) for c in conjunctions]
    for color, shape in conj:
        check_color(color)
        check_shape(shape)
    if len(set(conj)) != len(conj):
        raise ValueError(f"conjunctions must be unique, got {conj}")
    return conj


def knn_protocol(conjunctions: Sequence[Conj], cells: Sequence[Cell], grid: tuple[int, int], k: int, seed: int,
                 task: str = SCENE_DESCRIPTION) -> list[Trial]:
    """The K x N x N protocol: for each object identity i and target cell j, ``k`` trials with object i at cell j
    and the other N-1 objects randomly permuted over the other cells.

    For ``scene_description`` the prompt describes the N-1 others in random order and the target is to be named;
    for ``color_retrieval`` the question asks the target's colour (its shape must be unique). Trials come ordered
    by identity, then cell, then trial; meta: ``target_index``, ``target_cell``, ``cell_index``, ``trial``.
    """
    conj = _check_conjunctions(conjunctions)
    cells = [tuple(c) for c in cells]
    if len(conj) != len(cells) or len(set(cells)) != len(cells):
        raise ValueError(f"need as many unique cells as conjunctions, got {len(cells)} cells for {len(conj)}")
    if task not in (SCENE_DESCRIPTION, COLOR_RETRIEVAL):
        raise ValueError(f"knn_protocol builds {SCENE_DESCRIPTION} or {COLOR_RETRIEVAL} trials, not {task!r}")
    rng = random.Random(seed)
    trials = []
    for i, (color, shape) in enumerate(conj):
        others = [c for j, c in enumerate(conj) if j != i]
        for j, cell in enumerate(cells):
            rest = [c for c in cells if c != cell]
            for t in range(k):
                placed = rest[:]
                rng.shuffle(placed)
                target = Obj(color, shape, cell)
                objs = [Obj(c, s, p) for (c, s), p in zip(others, placed)]
                scene = _scene([target, *objs], grid)
                if task == SCENE_DESCRIPTION:
                    rng.shuffle(objs)
                    trial = scene_description(scene, target, objs)
                else:
                    trial = color_retrieval(scene, target)
                trial.meta.update(target_index=i, target_cell=list(cell), cell_index=j, trial=t)
                trials.append(trial)
    return trials


def pca_set(k: int = 200, seed: int = 0, conjunctions: Sequence[Conj] = PCA_CONJUNCTIONS) -> list[Trial]:
    """The PCA set: 6 conjunctions on the 3x2 layout (left and right columns of a 3x3 grid); 6*6*k trials."""
    trials = knn_protocol(conjunctions, PCA_CELLS, (3, 3), k, seed)
    for t in trials:
        t.meta["set"] = "pca"
    return trials


def entropy_conjunctions(condition: str, colors: Sequence[str], shapes: Sequence[str]) -> list[Conj]:
    """Low: every colour x shape conjunction. High: the i-th colour with the i-th shape (all features unique)."""
    if condition == "low":
        return [(c, s) for c in colors for s in shapes]
    if condition == "high":
        if len(colors) != len(shapes):
            raise ValueError("high entropy pairs colours with shapes one to one; give as many of each")
        return list(zip(colors, shapes))
    raise UserError(f"entropy condition must be 'low' or 'high', got {condition!r}")


def entropy_set(grid: tuple[int, int] = (3, 3), condition: str = "low", k: int | None = None, seed: int = 0,
                colors: Sequence[str] | None = None, shapes: Sequence[str] | None = None) -> list[Trial]:
    """The binding-error sets (§4.5): every cell of a 2x2 or 3x3 grid filled; K*N*N trials.

    ``k`` defaults to the paper's (100 on 2x2, 50 on 3x3); ``colors``/``shapes`` to ``ENTROPY_VOCAB``.
    """
    grid = tuple(grid)
    if grid not in ENTROPY_K:
        raise UserError(f"entropy sets are defined on 2x2 and 3x3 grids, got {grid}")
    dc, ds = ENTROPY_VOCAB.get((grid, condition), ((), ()))
    conj = entropy_conjunctions(condition, colors or dc, shapes or ds)
    cells = all_cells(grid)
    if len(conj) != len(cells):
        raise UserError(f"{condition} entropy on a {grid[0]}x{grid[1]} grid needs {len(cells)} conjunctions, "
                        f"these colours and shapes give {len(conj)}")
    trials = knn_protocol(conj, cells, grid, ENTROPY_K[grid] if k is None else k, seed)
    for t in trials:
        t.meta["entropy"] = condition
    return trials


def relabs_set(k: int = 50, seed: int = 0, conjunctions: Sequence[Conj] = RELABS_CONJUNCTIONS) -> list[Trial]:
    """Relative vs absolute position (§4.1): 4 objects in one of four 2x2 arrangements of a 3x3 grid, each holding
    the centre; the prompt describes 3, the target is the 4th. K x 4 x 4 trials per arrangement.

    meta adds ``arrangement`` (0..3 = top-left, top-right, bottom-left, bottom-right quadrant), ``absolute_cell``
    (on the 3x3 grid) and ``relative_cell`` (row, col within the 2x2).
    """
    trials = []
    for a, (r0, c0) in enumerate(RELABS_ORIGINS):
        cells = [(r0 + r, c0 + c) for r in range(2) for c in range(2)]
        for t in knn_protocol(conjunctions, cells, (3, 3), k, seed * 4 + a):
            r, c = t.target.cell
            t.meta.update(arrangement=a, absolute_cell=[r, c], relative_cell=[r - r0, c - c0])
            trials.append(t)
    return trials


def _random_conjunctions(rng: random.Random, n: int, entropy: str | None, colors: Sequence[str],
                         shapes: Sequence[str]) -> list[Conj]:
    colors, shapes = list(colors), list(shapes)
    if entropy == "high":
        if n > min(len(colors), len(shapes)):
            raise UserError(f"high entropy with {n} objects needs {n} colours and {n} shapes")
        return list(zip(rng.sample(colors, n), rng.sample(shapes, n)))
    if entropy == "low":
        m = math.isqrt(n - 1) + 1  # smallest m with m*m >= n
        if m > min(len(colors), len(shapes)):
            raise UserError(f"low entropy with {n} objects needs {m} colours and {m} shapes")
        cs, ss = rng.sample(colors, m), rng.sample(shapes, m)
        pool = [(c, s) for c in cs for s in ss]
        return rng.sample(pool, n)
    if entropy is not None:
        raise UserError(f"entropy must be None, 'low' or 'high', got {entropy!r}")
    pool = [(c, s) for c in colors for s in shapes]
    if n > len(pool):
        raise UserError(f"{n} unique objects need more than {len(colors)} colours x {len(shapes)} shapes")
    return rng.sample(pool, n)


def scene_description_set(n: int, grid: tuple[int, int] = (2, 2), n_objects: int | None = None, seed: int = 0,
                          entropy: str | None = None, colors: Sequence[str] = tuple(COLORS),
                          shapes: Sequence[str] = SHAPES) -> list[Trial]:
    """``n`` random scene-description trials: ``n_objects`` (default: every cell) unique objects on random cells,
    a random target, the others described in random order.

    ``entropy``: None = any unique conjunctions; "high" = all colours and all shapes distinct; "low" = conjunctions
    drawn from the m x m conjunctions of m random colours and m random shapes, m the smallest with m*m >= n_objects.
    """
    grid = tuple(grid)
    cells = all_cells(grid)
    if n_objects is not None and n_objects < 2:
        raise UserError(f"a scene needs at least 2 objects, asked for {n_objects}")
    n_objects = len(cells) if n_objects is None else n_objects
    if max(n_objects, 2) > len(cells):
        raise UserError(f"a {grid[0]}x{grid[1]} grid has {len(cells)} cell(s), too few for {max(n_objects, 2)} "
                        "objects; use a larger grid")
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        conj = _random_conjunctions(rng, n_objects, entropy, colors, shapes)
        objs = [Obj(c, s, p) for (c, s), p in zip(conj, rng.sample(cells, n_objects))]
        target = rng.choice(objs)
        described = [o for o in objs if o != target]
        rng.shuffle(described)
        trial = scene_description(_scene(objs, grid), target, described)
        trial.meta.update(trial=i, target_cell=list(target.cell), entropy=entropy)
        trials.append(trial)
    return trials


def color_retrieval_set(n: int, grid: tuple[int, int] = (2, 2), seed: int = 0, n_objects: int = 2,
                        colors: Sequence[str] = RETRIEVAL_COLORS,
                        shapes: Sequence[str] = RETRIEVAL_SHAPES) -> list[Trial]:
    """``n`` colour-retrieval trials: ``n_objects`` objects with distinct colours and distinct shapes on random
    cells; the question asks the colour of a random one of them."""
    grid = tuple(grid)
    cells = all_cells(grid)
    if not 1 <= n_objects <= min(len(cells), len(colors), len(shapes)):
        raise UserError(f"{n_objects} objects need that many cells, colours and shapes")
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        conj = _random_conjunctions(rng, n_objects, "high", colors, shapes)
        objs = [Obj(c, s, p) for (c, s), p in zip(conj, rng.sample(cells, n_objects))]
        target = rng.choice(objs)
        trial = color_retrieval(_scene(objs, grid), target)
        trial.meta.update(trial=i, target_cell=list(target.cell))
        trials.append(trial)
    return trials


def spatial_relation_set(n: int, seed: int = 0, grid: tuple[int, int] = (3, 3),
                         colors: Sequence[str] = tuple(COLORS), shapes: Sequence[str] = SHAPES) -> list[Trial]:
    """``n`` spatial-relation trials: every cell filled, all colours distinct (random subset of ``colors``), shapes
    drawn independently; a random reference and a random relation that points at a cell of the grid."""
    grid = tuple(grid)
    cells = all_cells(grid)
    if len(cells) > len(colors):
        raise UserError(f"a {grid[0]}x{grid[1]} grid needs {len(cells)} distinct colours, got {len(colors)}")
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        objs = [Obj(c, rng.choice(list(shapes)), p) for c, p in zip(rng.sample(list(colors), len(cells)), cells)]
        scene = _scene(objs, grid)
        ref = rng.choice(objs)
        valid = [rel for rel in RELATIONS if relation_target(scene, ref, rel) is not None]
        if not valid:
            raise UserError(f"a {grid[0]}x{grid[1]} grid has no neighbouring cells")
        trial = spatial_relation(scene, ref, rng.choice(valid))
        trial.meta.update(trial=i, ref_cell=list(ref.cell), target_cell=list(trial.target.cell))
        trials.append(trial)
    return trials


def counting_set(n: int, seed: int = 0, grid: tuple[int, int] = (3, 3), min_objects: int = 3,
                 max_objects: int = 8, colors: Sequence[str] = COUNTING_COLORS,
                 shapes: Sequence[str] = COUNTING_SHAPES) -> list[Trial]:
    """``n`` counting trials (App. C): a uniform number of unique objects in [min_objects, max_objects] on random
    cells; meta ``count``."""
    grid = tuple(grid)
    cells = all_cells(grid)
    if not 1 <= min_objects <= max_objects <= len(cells):
        raise UserError(f"object counts [{min_objects}, {max_objects}] do not fit {len(cells)} cells")
    rng = random.Random(seed)
    trials = []
    for i in range(n):
        count = rng.randint(min_objects, max_objects)
        conj = _random_conjunctions(rng, count, None, colors, shapes)
        objs = [Obj(c, s, p) for (c, s), p in zip(conj, rng.sample(cells, count))]
        trial = counting(_scene(objs, grid))
        trial.meta.update(trial=i, count=count)
        trials.append(trial)
    return trials
