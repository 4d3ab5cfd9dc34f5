"""One registry of every stimulus set, and saving/loading a set as PNG images plus a JSON manifest.

``TASK_GENERATORS[name](grid, n, seed)`` returns a list of ``Trial`` (or of ``CounterfactualPair`` for the ``cma-*``
names). ``grid=None`` picks the set's default grid. What ``n`` counts:

- ``scene_description``, ``color_retrieval``, ``spatial_relation``, ``counting``: the number of trials;
- ``pca``, ``relabs``, ``entropy-low``, ``entropy-high`` (K x N x N sets): K, the trials per (object identity,
  target cell); the set has K*N*N trials (times 4 arrangements for relabs);
- ``cma-id_retrieval``, ``cma-id_selection``, ``cma-feature_retrieval``: the number of pairs.

``write_stimuli`` renders each distinct scene once (named ``000000.png``, ... in order of first use) and writes
``manifest.json`` (the folder format of ``scenes.manifest``, with every object's pixel box) with sorted keys, so the
same items give byte-identical files (images that an older set written to the same folder listed and this set lacks
are removed); ``load_stimuli`` reads such a folder back, or any user's folder in the same
format. Assumes every item's scene can be laid out by ``layout_for_grid`` (a ``Geometry`` or a function from a
(rows, cols) grid to a ``Layout``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence, Union

from vismech.errors import UserError

from .core import CounterfactualPair, Geometry, Layout, Scene, Trial
from .counterfactual import CONDITIONS, cma_pairs
from .manifest import MANIFEST, load_layouts, load_stimuli, trial_record, write_manifest  # noqa: F401
from .render import pad_to, render
from .sets import (color_retrieval_set, counting_set, entropy_set, pca_set, relabs_set, scene_description_set,
                   spatial_relation_set)

Item = Union[Trial, CounterfactualPair]
Grid = Union[tuple[int, int], None]


def _fixed(name: str, grid: Grid, fixed: tuple[int, int]) -> None:
    if grid is not None and tuple(grid) != fixed:
        raise UserError(f"the {name} set is defined on a {fixed[0]}x{fixed[1]} grid only, got {tuple(grid)}")


def _pca(grid: Grid, n: int, seed: int) -> list[Trial]:
    _fixed("pca", grid, (3, 3))
    return pca_set(k=n, seed=seed)


def _relabs(grid: Grid, n: int, seed: int) -> list[Trial]:
    _fixed("relabs", grid, (3, 3))
    return relabs_set(k=n, seed=seed)


def _entropy(condition: str) -> Callable[[Grid, int, int], list[Trial]]:
    return lambda grid, n, seed: entropy_set(tuple(grid or (3, 3)), condition, k=n, seed=seed)


def _cma(condition: str) -> Callable[[Grid, int, int], list[CounterfactualPair]]:
    return lambda grid, n, seed: cma_pairs(condition, n, seed, grid=tuple(grid or (2, 2)))


TASK_GENERATORS: dict[str, Callable[[Grid, int, int], list]] = {
    "scene_description": lambda grid, n, seed: scene_description_set(n, tuple(grid or (2, 2)), seed=seed),
    "color_retrieval": lambda grid, n, seed: color_retrieval_set(n, tuple(grid or (2, 2)), seed=seed),
    "spatial_relation": lambda grid, n, seed: spatial_relation_set(n, seed=seed, grid=tuple(grid or (3, 3))),
    "counting": lambda grid, n, seed: counting_set(n, seed=seed, grid=tuple(grid or (3, 3))),
    "pca": _pca,
    "relabs": _relabs,
    "entropy-low": _entropy("low"),
    "entropy-high": _entropy("high"),
    **{f"cma-{c}": _cma(c) for c in CONDITIONS},
}


def generate(name: str, grid: Grid, n: int, seed: int) -> list:
    """``TASK_GENERATORS[name](grid, n, seed)`` with a clear error for an unknown name."""
    if name not in TASK_GENERATORS:
        raise UserError(f"unknown stimulus set {name!r}; sets are {', '.join(TASK_GENERATORS)}")
    return TASK_GENERATORS[name](grid, n, seed)


def _scene_key(scene: Scene) -> str:
    """The same string for scenes that draw the same image, whatever the order of their objects."""
    return json.dumps([list(scene.grid), sorted([*o.cell, o.color, o.shape] for o in scene.objects)])


def _old_images(out: Path) -> set[str]:
    """The image files an earlier ``write_stimuli`` listed in ``out``'s manifest (none if it has no readable one)."""
    try:
        old = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        names = {t["image"] for t in old["trials"]}
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    return {n for n in names if isinstance(n, str) and n == Path(n).name and n.endswith(".png")}


def write_stimuli(items: Sequence[Item], layout_for_grid: Union[Geometry, Callable[[tuple[int, int]], Layout]],
                  out_dir: Union[str, Path]) -> Path:
    """Render every distinct scene of ``items`` to ``out_dir`` (a trial with a ``picture`` has its image and masks
    copied instead) and write ``manifest.json``; returns its path.

    The manifest holds the geometry (if a ``Geometry`` was given), the layout of each grid, every trial's record
    (``scenes.manifest``: image file, prompt, answer, objects with their cells as IDs and pixel boxes, mentions), the
    pairs (condition, a1, a1*, indices of their clean and counterfactual trials) and the order of the items.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stale = _old_images(out)
    if isinstance(layout_for_grid, Geometry):
        geometry = layout_for_grid
        get_layout = lambda grid: geometry.layout(*grid)  # noqa: E731
    else:
        geometry, get_layout = None, layout_for_grid
    layouts: dict[str, Layout] = {}
    images: dict[str, str] = {}
    trials, pairs, order = [], [], []

    def add(trial: Trial, pair: int | None, role: str | None) -> int:
        if trial.picture is not None:  # an image file (a photoreal render): copied, with its objects' masks
            pic = trial.picture
            if pic.path not in images:
                images[pic.path] = name = f"{len(images):06d}.png"
                shutil.copyfile(pic.path, out / name)
                for j, (_, r) in enumerate(pic.regions):
                    if r.mask:
                        shutil.copyfile(r.mask, out / f"{name[:-4]}-{j}.png")
            name = images[pic.path]
            masks = {c: f"{name[:-4]}-{j}.png" for j, (c, r) in enumerate(pic.regions) if r.mask}
            rec = trial_record(trial, name, lambda o: pic.region(o.cell).box, lambda o: masks.get(o.cell))
            trials.append({**rec, "pair": pair, "role": role})
            return len(trials) - 1
        grid = tuple(trial.scene.grid)
        gkey = f"{grid[0]}x{grid[1]}"
        if gkey not in layouts:
            layouts[gkey] = get_layout(grid)
        key = gkey + _scene_key(trial.scene)
        if key not in images:
            images[key] = f"{len(images):06d}.png"
            img = render(trial.scene, layouts[gkey])
            if geometry is not None and geometry.input_px:  # exactly what the model is fed (VLM.render)
                img = pad_to(img, geometry.input_px)
            img.save(out / images[key], format="PNG")
        rec = trial_record(trial, images[key], lambda o: layouts[gkey].cell_box(o.cell))
        trials.append({**rec, "layout": gkey, "pair": pair, "role": role})
        return len(trials) - 1

    for item in items:
        if isinstance(item, CounterfactualPair):
            j = len(pairs)
            pairs.append({"condition": item.condition, "answer": item.answer, "answer_star": item.answer_star,
                          "clean": add(item.clean, j, "clean"),
                          "counterfactual": add(item.counterfactual, j, "counterfactual")})
            order.append(["pair", j])
        elif isinstance(item, Trial):
            order.append(["trial", add(item, None, None)])
        else:
            raise TypeError(f"write_stimuli takes Trials and CounterfactualPairs, got {type(item).__name__}")
    path = write_manifest(out, trials, pairs, order, geometry=None if geometry is None else geometry.to_json(),
                          layouts={k: asdict(v) | {"canvas_px": v.canvas_px} for k, v in layouts.items()})
    for name in stale - set(images.values()):  # images of an older set in the same folder that this set lacks
        (out / name).unlink(missing_ok=True)
    return path
