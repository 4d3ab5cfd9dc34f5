"""Draw a scene as a PIL image aligned to a model's image-token grid.

Each object is a flat-coloured shape drawn without anti-aliasing strictly inside its pixel box
``layout.cell_box(cell)``, which covers whole image tokens (see ``core.Layout``), so every coloured pixel belongs to
image tokens of exactly one object. Shapes fill the box as far as they can: the square is the box, the circle, the
diamond, the cross, the triangle and the heart touch all four sides, the star, pentagon and hexagon keep their
regular proportions and touch two opposite sides, centred; all are exactly left-right symmetric. Every shape is
first drawn on a mask the size of the box and pasted, so nothing can leak outside it. Rendering is deterministic:
the same scene gives the same bytes. Assumes square object boxes of at least 3 px.
"""

from __future__ import annotations

import functools
import math

from PIL import Image, ImageDraw, ImageOps

from .core import Layout, Scene
from .vocab import check_color, check_shape

Point = tuple[float, float]


def _fit(points: list[Point], size: int, keep_aspect: bool) -> list[Point]:
    """Scale ``points`` into the pixel range [0, size-1] on both axes (uniformly and centred if ``keep_aspect``)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    last = size - 1
    sx, sy = last / (x1 - x0), last / (y1 - y0)
    if keep_aspect:
        sx = sy = min(sx, sy)
    dx = (last - sx * (x1 - x0)) / 2
    dy = (last - sy * (y1 - y0)) / 2
    return [(dx + sx * (x - x0), dy + sy * (y - y0)) for x, y in points]


def _regular(n: int, inner: float | None = None) -> list[Point]:
    """A regular n-gon (or an n-pointed star with inner radius ``inner``) with a vertex on top; y grows down."""
    pts: list[Point] = []
    step = math.pi / n if inner is not None else 2 * math.pi / n
    for i in range(2 * n if inner is not None else n):
        r = inner if (inner is not None and i % 2) else 1.0
        a = -math.pi / 2 + i * step
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _heart() -> list[Point]:
    pts = []
    for i in range(96):
        t = 2 * math.pi * i / 96
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append((x, -y))
    return pts


_STAR_INNER = (3 - math.sqrt(5)) / 2  # inner/outer radius of a regular pentagram (~0.382)


def shape_mask(shape: str, size: int) -> Image.Image:
    """A ``size`` x ``size`` 1-bit-like ("L", 0 or 255) mask of ``shape`` filling the square as far as it can (a new
    image the caller may change; drawn once per shape and size)."""
    return _mask(shape, size).copy()


@functools.lru_cache(maxsize=256)
def _mask(shape: str, size: int) -> Image.Image:
    check_shape(shape)
    if size < 3:
        raise ValueError(f"objects must be at least 3 px wide to be drawn, got {size} px; use a larger geometry")
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    last = size - 1
    if shape == "square":
        d.rectangle([0, 0, last, last], fill=255)
    elif shape == "circle":
        d.ellipse([0, 0, last, last], fill=255)
    elif shape == "cross":
        arm = size // 3
        if (size - arm) % 2:
            arm += 1
        a0 = (size - arm) // 2
        d.rectangle([a0, 0, a0 + arm - 1, last], fill=255)
        d.rectangle([0, a0, last, a0 + arm - 1], fill=255)
    else:
        polys = {
            "triangle": ([(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)], False),
            "diamond": ([(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)], False),
            "heart": (_heart(), False),
            "star": (_regular(5, _STAR_INNER), True),
            "pentagon": (_regular(5), True),
            "hexagon": (_regular(6), True),
        }
        pts, keep = polys[shape]
        d.polygon(_fit(pts, size, keep), fill=255)
        # Rasterising a vertex that falls on a half pixel is not mirror symmetric; every shape here is, so copy
        # the left half (with the middle column when size is odd) onto the right.
        half = (size + 1) // 2
        mask.paste(ImageOps.mirror(mask.crop((0, 0, half, size))), (size - half, 0))
    return mask


def render(scene: Scene, layout: Layout, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """The RGB image of ``scene`` on a ``layout.canvas_px`` square canvas; objects at ``layout.cell_box``."""
    if tuple(scene.grid) != (layout.rows, layout.cols):
        raise ValueError(
            f"the scene is on a {scene.grid[0]}x{scene.grid[1]} grid but the layout is for "
            f"{layout.rows}x{layout.cols}; build the layout with geometry.layout(*scene.grid)"
        )
    img = Image.new("RGB", (layout.canvas_px, layout.canvas_px), tuple(background))
    for obj in scene.objects:
        rgb = check_color(obj.color)
        x0, y0, x1, y1 = layout.cell_box(obj.cell)
        if x1 - x0 != y1 - y0:
            raise ValueError(f"object box {(x0, y0, x1, y1)} is not square")
        img.paste(rgb, (x0, y0, x1, y1), _mask(obj.shape, x1 - x0))
    return img


def pad_to(img: Image.Image, px: int, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``img`` on a ``px`` square canvas, padded right and bottom (what a model with a fixed input size is fed)."""
    if img.size == (px, px):
        return img
    if px < max(img.size):
        raise ValueError(f"the {img.width}px canvas is larger than this model's {px}px input")
    canvas = Image.new("RGB", (px, px), tuple(background))
    canvas.paste(img, (0, 0))
    return canvas
