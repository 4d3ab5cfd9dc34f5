"""The plain data of a stimulus: objects, scenes, token geometry and trials.

Everything here is a frozen dataclass with no torch dependency, so stimuli can be generated, saved and compared
without a model. A *trial* is one (image, prompt, answer) item; the prompt carries the character spans of every
object mention and of the token that follows it (the paper's "comma" tokens), so that a model adapter can find
those positions with any tokenizer through its offset mapping.

A trial's image is either drawn from its scene (flat shapes on a grid, aligned to a model's tokens: ``render``) or,
when ``Trial.picture`` is set, an image file (a photorealistic render, a photograph, a user's own stimulus) with each
object's ``Region`` in it (a pixel box, optionally a mask file); a model adapter then finds an object's image tokens
from its region (``scenes.regions``). Either way an object's ``cell`` is its position ID (left = (0, 0), right =
(0, 1) in two-object pictures, as in the paper's PUG images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vismech.errors import UserError


@dataclass(frozen=True, order=True)
class Obj:
    """A coloured shape at a grid cell (row, col). In pictures ``shape`` is the object's class ("cube", "dog") and
    ``color`` may be empty (an object named by its class alone)."""

    color: str
    shape: str
    cell: tuple[int, int]

    @property
    def name(self) -> str:
        """The phrase that names the object in a prompt or an answer, e.g. ``"red square"`` (``"dog"`` without a
        colour)."""
        return f"{self.color} {self.shape}" if self.color else self.shape

    def to_json(self) -> dict[str, Any]:
        return {"color": self.color, "shape": self.shape, "cell": list(self.cell)}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Obj":
        return Obj(d["color"], d["shape"], tuple(d["cell"]))


@dataclass(frozen=True)
class Scene:
    """Objects on a ``grid`` of (rows, cols) cells; at most one object per cell."""

    objects: tuple[Obj, ...]
    grid: tuple[int, int]

    def __post_init__(self) -> None:
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell in {cells}")
        for r, c in cells:
            if not (0 <= r < self.grid[0] and 0 <= c < self.grid[1]):
                raise ValueError(f"cell {(r, c)} lies outside the {self.grid[0]}x{self.grid[1]} grid")

    def at(self, cell: tuple[int, int]) -> Obj | None:
        for o in self.objects:
            if o.cell == tuple(cell):
                return o
        return None

    def to_json(self) -> dict[str, Any]:
        return {"grid": list(self.grid), "objects": [o.to_json() for o in self.objects]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Scene":
        return Scene(tuple(Obj.from_json(o) for o in d["objects"]), tuple(d["grid"]))


@dataclass(frozen=True)
class Geometry:
    """How a model sees pixels: ``token_px`` pixels per image-token side.

    ``canvas_tokens`` is set for models that resize every image to one fixed size (LLaVA-1.5: 24 tokens of 14 px
    = 336 px); there the object size is the largest whole number of tokens that fits the grid. Otherwise the canvas
    is sized to the grid with objects of ``obj_tokens`` tokens (Qwen2-VL: 2 tokens of 28 px = 56 px objects).
    In both cases a grid of n cells per side spans (2n+1) object sizes: a margin of one object size, and one
    object size between neighbours, which gives the paper's 280 px (2x2) and 392 px (3x3) canvases for Qwen.
    """

    token_px: int
    canvas_tokens: int | None = None
    obj_tokens: int = 2
    #: side of the square image the model is fed, when larger than the token canvas (LLaVA-OneVision: 27 tokens
    #: of 14 px = 378 px drawn, padded white right and bottom to its 384 px input); None: the canvas itself
    input_px: int | None = None

    def layout(self, rows: int, cols: int) -> "Layout":
        span = 2 * max(rows, cols) + 1
        if self.canvas_tokens is None:
            s = self.obj_tokens
            grid_tokens = span * s
            offset = 0
        else:
            s = self.canvas_tokens // span
            if s < 1:
                raise UserError(
                    f"a {rows}x{cols} grid needs at least {span} image tokens per side, but this model sees "
                    f"{self.canvas_tokens}; use a smaller grid"
                )
            grid_tokens = self.canvas_tokens
            offset = (self.canvas_tokens - span * s) // 2
        return Layout(rows=rows, cols=cols, token_px=self.token_px, grid_tokens=grid_tokens, obj_tokens=s,
                      offset_tokens=offset)

    def to_json(self) -> dict[str, Any]:
        out = {"token_px": self.token_px, "canvas_tokens": self.canvas_tokens, "obj_tokens": self.obj_tokens}
        return out | ({"input_px": self.input_px} if self.input_px else {})


@dataclass(frozen=True)
class Layout:
    """Pixel and token placement of a rows x cols grid on a square canvas of ``grid_tokens`` tokens per side."""

    rows: int
    cols: int
    token_px: int
    grid_tokens: int
    obj_tokens: int
    offset_tokens: int

    @property
    def canvas_px(self) -> int:
        return self.grid_tokens * self.token_px

    def cell_token_origin(self, cell: tuple[int, int]) -> tuple[int, int]:
        """(row, col) in tokens of the top-left token of the object at ``cell``."""
        r, c = cell
        s = self.obj_tokens
        return self.offset_tokens + s + 2 * s * r, self.offset_tokens + s + 2 * s * c

    def cell_box(self, cell: tuple[int, int]) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) pixel box of the object at ``cell``; x1, y1 exclusive."""
        tr, tc = self.cell_token_origin(cell)
        p, s = self.token_px, self.obj_tokens
        return tc * p, tr * p, (tc + s) * p, (tr + s) * p

    def cell_tokens(self, cell: tuple[int, int]) -> list[int]:
        """Row-major flat indices, over the grid_tokens x grid_tokens token grid, of the tokens the object covers."""
        tr, tc = self.cell_token_origin(cell)
        s, g = self.obj_tokens, self.grid_tokens
        return [(tr + i) * g + (tc + j) for i in range(s) for j in range(s)]


@dataclass(frozen=True)
class Region:
    """Where an object is in a picture: ``box`` = (x0, y0, x1, y1) in pixels of the image file (x1, y1 exclusive;
    fractions allowed) and optionally ``mask``, the path of a grey-scale image of the same size whose non-zero
    pixels are the object (then ``box`` is the mask's bounding box)."""

    box: tuple[float, float, float, float]
    mask: str | None = None

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.box
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"box {list(self.box)} is empty: give [x0, y0, x1, y1] with x1 > x0 and y1 > y0")

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) of the box centre in pixels."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def to_json(self) -> dict[str, Any]:
        return {"box": list(self.box), **({"mask": self.mask} if self.mask else {})}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Region":
        return Region(tuple(float(x) for x in d["box"]), d.get("mask"))


@dataclass(frozen=True)
class Picture:
    """A trial's image when it is a file rather than a drawing of its scene: the file's ``path`` and the
    ``regions`` of the scene's objects in it, as (cell, Region) pairs in the order of the scene's objects."""

    path: str
    regions: tuple[tuple[tuple[int, int], Region], ...] = ()

    def region(self, cell: tuple[int, int]) -> Region:
        for c, r in self.regions:
            if c == tuple(cell):
                return r
        raise ValueError(f"the picture {self.path} has no region for the object at cell {tuple(cell)}")

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "regions": [[list(c), r.to_json()] for c, r in self.regions]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Picture":
        return Picture(d["path"], tuple((tuple(c), Region.from_json(r)) for c, r in d["regions"]))


@dataclass(frozen=True)
class Trial:
    """One stimulus: a scene, a prompt and the expected answer.

    ``mentions`` are character spans (start, end) in ``prompt`` of each described object's phrase, in order, and
    ``mentioned`` the objects they name; ``commas`` are the character spans of the token that follows each mention
    (a comma, or "and" after the last one): the paper reads the described objects' positions there. ``target`` is
    the object the answer names (None for counting), ``answer`` the full answer string and ``task`` the task name.
    ``meta`` holds set-specific labels (entropy condition, arrangement, relation, ...). ``picture`` is None for a
    scene drawn on the model's token grid, else the image file and object regions the trial shows.
    """

    task: str
    scene: Scene
    prompt: str
    answer: str
    target: Obj | None = None
    mentioned: tuple[Obj, ...] = ()
    mentions: tuple[tuple[int, int], ...] = ()
    commas: tuple[tuple[int, int], ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    picture: Picture | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            **({"picture": self.picture.to_json()} if self.picture is not None else {}),
            "task": self.task,
            "scene": self.scene.to_json(),
            "prompt": self.prompt,
            "answer": self.answer,
            "target": None if self.target is None else self.target.to_json(),
            "mentioned": [o.to_json() for o in self.mentioned],
            "mentions": [list(s) for s in self.mentions],
            "commas": [list(s) for s in self.commas],
            "meta": self.meta,
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> "Trial":
        return Trial(
            task=d["task"],
            scene=Scene.from_json(d["scene"]),
            prompt=d["prompt"],
            answer=d["answer"],
            target=None if d["target"] is None else Obj.from_json(d["target"]),
            mentioned=tuple(Obj.from_json(o) for o in d["mentioned"]),
            mentions=tuple(tuple(s) for s in d["mentions"]),
            commas=tuple(tuple(s) for s in d["commas"]),
            meta=dict(d.get("meta", {})),
            picture=Picture.from_json(d["picture"]) if d.get("picture") else None,
        )


@dataclass(frozen=True)
class CounterfactualPair:
    """A clean trial c1 and a counterfactual c2 for one causal-mediation condition.

    ``condition`` is ``id_retrieval``, ``id_selection`` or ``feature_retrieval``. ``answer`` is a1 (the clean
    answer), ``answer_star`` is a1* (the answer expected once the mediating heads carry c2's values). Both are full
    answer strings, scored as ``models.answers`` says (the colour word, by its first token where that is exact).
    """

    condition: str
    clean: Trial
    counterfactual: Trial
    answer: str
    answer_star: str

    def to_json(self) -> dict[str, Any]:
        return {"condition": self.condition, "clean": self.clean.to_json(),
                "counterfactual": self.counterfactual.to_json(), "answer": self.answer,
                "answer_star": self.answer_star}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "CounterfactualPair":
        return CounterfactualPair(d["condition"], Trial.from_json(d["clean"]), Trial.from_json(d["counterfactual"]),
                                  d["answer"], d["answer_star"])
