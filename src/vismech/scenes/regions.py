"""Which of a model's image tokens show an object given by a pixel box or a mask in an image file.

A model's image processor maps an image file onto its input canvas by a scale and an offset per axis (resizing,
padding to a square, centre cropping); the canvas is cut into square tokens. A ``View`` holds that map and the token
grid (the model's family builds it: ``models.families``). ``coverage`` gives, for every token, the fraction of the
token's area that the object covers: the exact area of the box, or of the mask's pixels (each pixel a unit square
weighted by its grey level / 255), inside the token, after the map. ``object_tokens`` keeps the tokens covered at
least ``min_coverage`` (default 0.5), or the single most covered token when none is; an object outside the part of
the image the model sees is an error. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vismech.errors import UserError

from .core import Region

#: Tokens an object covers at least this fraction of are its tokens (``object_tokens``).
MIN_COVERAGE = 0.5


@dataclass(frozen=True)
class View:
    """How one image reaches one token grid: canvas = ``offset`` + ``scale`` * image pixel coordinates, per axis
    (x, y); the canvas holds ``rows`` x ``cols`` tokens of ``token_px`` canvas pixels each. ``base`` and
    ``row_stride`` place token (r, c) at offset ``base + r * row_stride + c`` of the image's token run. ``tile`` =
    (tile_px, tokens per tile) when the canvas is cut into tiles whose tokens do not fill them (a 384 px tile of
    27 tokens of 14 px): token i then starts at (i // n) * tile_px + (i % n) * token_px. ``tile_major``: the run
    holds the tiles' tokens one tile after another (tiles row-major, each tile's n x n tokens row-major), as
    processors that cut an image into tiles write them, instead of row-major over the whole grid."""

    rows: int
    cols: int
    token_px: float
    scale: tuple[float, float]
    offset: tuple[float, float] = (0.0, 0.0)
    base: int = 0
    row_stride: int | None = None
    tile: tuple[float, int] | None = None
    tile_major: bool = False

    def starts(self, n: int) -> np.ndarray:
        """Canvas coordinate where each of ``n`` tokens along an axis begins."""
        i = np.arange(n, dtype=np.float64)
        if self.tile is None:
            return i * self.token_px
        tile_px, per = self.tile
        return (i // per) * tile_px + (i % per) * self.token_px

    def token_offset(self, r: int, c: int) -> int:
        if self.tile_major:
            n = self.tile[1]
            (tr, r), (tc, c) = divmod(r, n), divmod(c, n)
            return self.base + (tr * (self.cols // n) + tc) * n * n + r * n + c
        return self.base + r * (self.cols if self.row_stride is None else self.row_stride) + c


def _overlap(starts: np.ndarray, token_px: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """[n_tokens, len(lo)]: length of [lo_j, hi_j) inside token i's interval [starts_i, starts_i + token_px)."""
    a = starts[:, None]
    return np.clip(np.minimum(a + token_px, hi[None]) - np.maximum(a, lo[None]), 0.0, None)


def load_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """[H, W] float weights in [0, 1] of a grey-scale mask image (grey level / 255); must be ``size`` (W, H)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            m = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the mask {path}: {e}") from None
    if (m.shape[1], m.shape[0]) != tuple(size):
        raise UserError(f"the mask {path} is {m.shape[1]}x{m.shape[0]} px but its image is {size[0]}x{size[1]}; "
                         "a mask must have its image's size")
    return m


def coverage(region: Region | np.ndarray, view: View, root: str | Path | None = None,
             image_size: tuple[int, int] | None = None) -> np.ndarray:
    """[rows, cols]: the fraction of each token of ``view`` that the object covers. ``region`` is a ``Region``
    (its mask, read from ``root / mask`` with ``image_size`` checked, when it has one, else its box) or an [H, W]
    array of per-pixel weights."""
    sx, sy = view.scale
    ox, oy = view.offset
    t = float(view.token_px)
    if isinstance(region, Region) and region.mask is not None:
        if image_size is None:
            raise UserError("a mask region needs the size of its image")
        region = load_mask(Path(root or ".") / region.mask, image_size)
    if isinstance(region, Region):
        x0, y0, x1, y1 = region.box
        ax = _overlap(view.starts(view.cols), t, np.array([ox + sx * x0]), np.array([ox + sx * x1]))
        ay = _overlap(view.starts(view.rows), t, np.array([oy + sy * y0]), np.array([oy + sy * y1]))
        return (ay @ ax.T) / (t * t)
    m = np.asarray(region, dtype=np.float64)
    xs, ys = np.arange(m.shape[1], dtype=np.float64), np.arange(m.shape[0], dtype=np.float64)
    ax = _overlap(view.starts(view.cols), t, ox + sx * xs, ox + sx * (xs + 1))
    ay = _overlap(view.starts(view.rows), t, oy + sy * ys, oy + sy * (ys + 1))
    return (ay @ m @ ax.T) / (t * t)


def object_tokens(cov: np.ndarray, view: View, min_coverage: float = MIN_COVERAGE, what: str = "the object"
                  ) -> list[tuple[int, float]]:
    """(token offset, coverage) of the tokens ``cov`` marks as the object's: coverage >= ``min_coverage``, else the
    most covered token; row-major order. A clear error when the object covers no token of the view."""
    if not cov.size or cov.max() <= 0:
        raise UserError(f"{what} lies outside the part of the image this model sees (its processor crops or "
                         "resizes it away); move the box or mask inside the image the model is given")
    rows, cols = np.nonzero(cov >= min_coverage - 1e-9)
    if not len(rows):
        r, c = np.unravel_index(int(np.argmax(cov)), cov.shape)
        rows, cols = np.array([r]), np.array([c])
    return [(view.token_offset(int(r), int(c)), float(min(1.0, cov[r, c]))) for r, c in zip(rows, cols)]
