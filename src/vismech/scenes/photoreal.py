"""Photorealistic two-object scenes in the design of the paper's PUG images (§4.2, Fig. 3b), rendered with Mitsuba 3.

The paper steers models on PUG renders of two animals, one clearly left and one clearly right, three colours, three
environments, positions jittered; left is position ID 0 and right ID 1. Here each scene has two objects on a floor,
a class from ``CLASSES`` (cube, sphere, cylinder, cone, torus: distinct 3-D shapes, procedural meshes) in a colour
from ``COLORS_3D`` (single words), in one of ``ENVIRONMENTS`` (studio, tiles, outdoor: floor material, lighting and
backdrop differ; ``mitsuba_scene``), with every object's position (left in x in [-1.3, -0.75], right in [0.75, 1.3];
depth in [-0.7, 0.5]), turn and size (0.85-1.1) drawn from the seed. The left object has cell (0, 0), the right one
(0, 1): a ``Trial`` of a photoreal scene is an ordinary scene-description trial on a 1x2 grid whose ``picture`` is the
rendered image with each object's rendered mask, so every experiment finds the objects' image tokens from the masks.

- ``photoreal_trials(n, seed)``: "In this image there is a {A} and a" -> B, A and B with different colours and
  classes, the described side drawn at random, environments in turn;
- ``photoreal_pairs(condition, n, seed)``: CMA pairs as ``counterfactual.cma_pairs`` builds them: the ID conditions
  swap the two objects' places, feature retrieval replaces the target by another colour and class at its place;
- ``render_items(items, size)``: renders every scene (``size`` x ``size`` px, a model's patch-aligned canvas:
  ``canvas_px``) with a progress bar, and returns the items bound to their images. Renders are deterministic (fixed
  sampler seed) and cached on disk (``cache_dir()``: ``$VISMECH_CACHE/photoreal``, default
  ``~/.cache/vismech/photoreal``) under a SHA-256 of everything that sets the pixels (scene, size, samples per
  pixel, Mitsuba version, ``RENDER_VERSION``), so a repeated run renders nothing; each render's seconds are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from vismech.errors import UserError
from .core import CounterfactualPair, Geometry, Obj, Picture, Region, Scene, Trial
from .mitsuba_scene import CAMERA, ENVIRONMENTS, MESHES
from .tasks import SCENE_DESCRIPTION, description_prompt

COLORS_3D: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
CLASSES: tuple[str, ...] = tuple(MESHES)
#: bump when the meshes, materials, lights or camera change, so cached renders are not reused
RENDER_VERSION = 1
DEFAULT_SPP = 64
#: image tokens per side of a photoreal canvas for models without a fixed input size (Qwen: 14 x 28 = 392 px)
DEFAULT_TOKENS = 14
LEFT, RIGHT = (0, 0), (0, 1)


@dataclass(frozen=True)
class Placement:
    """One object of a photoreal scene: its look and where it stands on the floor."""

    color: str
    shape: str
    x: float
    z: float
    yaw: float
    scale: float

    def to_json(self) -> dict:
        return {"color": self.color, "shape": self.shape, "x": round(self.x, 4), "z": round(self.z, 4),
                "yaw": round(self.yaw, 2), "scale": round(self.scale, 4)}


@dataclass(frozen=True)
class PhotoScene:
    left: Placement
    right: Placement
    environment: str

    def to_json(self) -> dict:
        return {"camera": {k: list(v) if isinstance(v, tuple) else v for k, v in CAMERA.items()},
                "environment": self.environment, "objects": [self.left.to_json(), self.right.to_json()]}

    def objects(self) -> tuple[Obj, Obj]:
        return Obj(self.left.color, self.left.shape, LEFT), Obj(self.right.color, self.right.shape, RIGHT)


def canvas_px(geometry: Geometry, tokens: int = DEFAULT_TOKENS) -> int:
    """The side of a square photoreal image aligned to a model's image tokens: its fixed input size, or ``tokens``
    tokens per side."""
    return (geometry.canvas_tokens or tokens) * geometry.token_px


def _check(colors: Sequence[str], classes: Sequence[str], environments: Sequence[str], need: int) -> None:
    from .vocab import check_color

    for c in colors:
        check_color(c)
    for s in classes:
        if s not in MESHES:
            raise UserError(f"unknown photoreal class {s!r}; classes are {', '.join(MESHES)}")
    for e in environments:
        if e not in ENVIRONMENTS:
            raise UserError(f"unknown environment {e!r}; environments are {', '.join(ENVIRONMENTS)}")
    if len(set(colors)) < need or len(set(classes)) < need:
        raise UserError(f"this set needs at least {need} colours and {need} classes")


def _place(rng: random.Random, side: int, look: tuple[str, str]) -> Placement:
    x = rng.uniform(0.75, 1.3) * (1 if side else -1)
    return Placement(look[0], look[1], x, rng.uniform(-0.7, 0.5), rng.uniform(0, 360), rng.uniform(0.85, 1.1))


def _trial(scene: PhotoScene, described_cell: tuple[int, int], meta: dict) -> Trial:
    left, right = scene.objects()
    a, b = (left, right) if described_cell == LEFT else (right, left)
    text, mentions, commas = description_prompt([a.name])
    return Trial(SCENE_DESCRIPTION, Scene((left, right), (1, 2)), text, b.name, b, (a,), mentions, commas,
                 meta={**meta, "environment": scene.environment, "photoreal": scene.to_json(),
                       "described_cell": list(a.cell), "target_cell": list(b.cell)})


def _draw(i: int, rng: random.Random, colors, classes, environments, need: int):
    cols, shapes = rng.sample(list(colors), need), rng.sample(list(classes), need)
    scene = PhotoScene(_place(rng, 0, (cols[0], shapes[0])), _place(rng, 1, (cols[1], shapes[1])),
                       environments[i % len(environments)])
    return scene, rng.choice([LEFT, RIGHT]), cols[2:], shapes[2:]


def photoreal_trials(n: int, seed: int = 0, colors: Sequence[str] = COLORS_3D, classes: Sequence[str] = CLASSES,
                     environments: Sequence[str] = ENVIRONMENTS) -> list[Trial]:
    """``n`` two-object scene-description trials (not rendered yet: see ``render_items``)."""
    _check(colors, classes, environments, 2)
    rng = random.Random(seed)
    out = []
    for i in range(n):
        scene, described, _, _ = _draw(i, rng, colors, classes, environments, 2)
        out.append(_trial(scene, described, {"trial": i}))
    return out


def photoreal_pairs(condition: str, n: int, seed: int = 0, colors: Sequence[str] = COLORS_3D,
                    classes: Sequence[str] = CLASSES, environments: Sequence[str] = ENVIRONMENTS
                    ) -> list[CounterfactualPair]:
    """``n`` CMA pairs for ``condition`` on photoreal scenes (not rendered yet)."""
    from .counterfactual import CONDITIONS

    if condition not in CONDITIONS:
        raise UserError(f"unknown CMA condition {condition!r}; conditions are {', '.join(CONDITIONS)}")
    need = 3 if condition == "feature_retrieval" else 2
    _check(colors, classes, environments, need)
    rng = random.Random(f"photoreal-pairs-{seed}")  # a stream apart from photoreal_trials': no shared scenes
    pairs = []
    for i in range(n):
        scene, described, xc, xs = _draw(i, rng, colors, classes, environments, need)
        meta = {"condition": condition, "pair": i}
        clean = _trial(scene, described, meta)
        a, b = clean.mentioned[0], clean.target
        if condition == "feature_retrieval":
            side = "right" if b.cell == RIGHT else "left"
            cf_scene = replace(scene, **{side: replace(getattr(scene, side), color=xc[0], shape=xs[0])})
            cf = _trial(cf_scene, described, meta)
            star = cf.target.name
        else:  # the two objects change places: A now stands where B stood, and the other way round
            cf_scene = replace(scene, left=replace(scene.left, color=scene.right.color, shape=scene.right.shape),
                               right=replace(scene.right, color=scene.left.color, shape=scene.left.shape))
            cf = _trial(cf_scene, b.cell, meta)
            star = a.name
        assert clean.prompt == cf.prompt
        pairs.append(CounterfactualPair(condition, clean, cf, answer=b.name, answer_star=star))
    return pairs


# -- rendering and the cache ---------------------------------------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("VISMECH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / \
        "vismech"
    return Path(root) / "photoreal"


def render_key(spec: dict, size: int, spp: int) -> str:
    """The content hash naming a render in the cache."""
    import mitsuba

    blob = json.dumps({"scene": spec, "size": size, "spp": spp, "mitsuba": mitsuba.__version__,
                       "render_version": RENDER_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def render_scene(spec: dict, size: int, spp: int = DEFAULT_SPP, cache: Path | None = None
                 ) -> tuple[Picture, float | None]:
    """The cached render of ``spec`` (rendering it first if needed) as a ``Picture`` with both objects' masks, and
    the seconds the render took (None when it came from the cache)."""
    from PIL import Image

    from .mitsuba_scene import _mitsuba, render

    _mitsuba()
    cache = Path(cache) if cache is not None else cache_dir()
    key = render_key(spec, size, spp)
    paths = [cache / f"{key}.png", cache / f"{key}-0.png", cache / f"{key}-1.png"]
    seconds = None
    if not all(p.exists() for p in paths):
        cache.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        rgb, masks = render(spec, size, spp)
        seconds = time.perf_counter() - t0
        for path, arr in zip(paths, [rgb] + [m.astype(np.uint8) * 255 for m in masks]):
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            Image.fromarray(arr).save(tmp, format="PNG")
            tmp.replace(path)  # atomic: a cache entry is whole or absent
        (cache / f"{key}.json").write_text(json.dumps({"seconds": seconds, "size": size, "spp": spp}))
    regions = []
    for cell, path in ((LEFT, paths[1]), (RIGHT, paths[2])):
        with Image.open(path) as im:
            m = np.asarray(im) > 127
        ys, xs = np.nonzero(m)
        if not len(xs):
            raise UserError(f"the {'left' if cell == LEFT else 'right'} object of a photoreal scene is not visible "
                             f"in its render {paths[0]}")
        regions.append((cell, Region((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)),
                                     str(path))))
    return Picture(str(paths[0]), tuple(regions)), seconds


def render_items(items: list, size: int, spp: int = DEFAULT_SPP, cache: Path | None = None, progress: bool = True
                 ) -> tuple[list, list[float]]:
    """``items`` (photoreal trials and pairs) bound to their renders, and the seconds of every render made now."""
    from tqdm import tqdm

    trials = [t for it in items for t in ((it.clean, it.counterfactual) if isinstance(it, CounterfactualPair)
                                          else (it,))]
    specs = {json.dumps(t.meta["photoreal"], sort_keys=True): t.meta["photoreal"] for t in trials}
    pictures, seconds = {}, []
    for key, spec in tqdm(specs.items(), desc="photoreal renders", unit="image", disable=not progress,
                          leave=False):
        pictures[key], s = render_scene(spec, size, spp, cache)
        if s is not None:
            seconds.append(s)

    def bind(t: Trial) -> Trial:
        return replace(t, picture=pictures[json.dumps(t.meta["photoreal"], sort_keys=True)])

    out = [replace(it, clean=bind(it.clean), counterfactual=bind(it.counterfactual))
           if isinstance(it, CounterfactualPair) else bind(it) for it in items]
    return out, seconds


def set_names() -> tuple[str, ...]:
    """The photoreal sets ``vismech stimuli`` writes: ``photoreal`` trials and ``photoreal-cma-CONDITION`` pairs."""
    from .counterfactual import CONDITIONS

    return ("photoreal", *(f"photoreal-cma-{c}" for c in CONDITIONS))


def generate(name: str, n: int, seed: int = 0) -> list:
    """The unrendered items of the photoreal set ``name`` (``set_names()``)."""
    if name == "photoreal":
        return photoreal_trials(n, seed)
    if name.startswith("photoreal-cma-"):
        return photoreal_pairs(name[len("photoreal-cma-"):], n, seed)
    raise UserError(f"unknown photoreal set {name!r}; sets are {', '.join(set_names())}")
