"""The one figure style of vismech, and the plotting helpers every experiment's ``plot(stored)`` uses.

Figures are drawn at paper size (a single panel about 3.4 x 2.6 inches, fonts 7-9 pt, DejaVu Sans), so they stay
readable when placed in a two-column layout; colours come from the Okabe-Ito palette (``PALETTE``), which stays
distinct under the common colour-vision deficiencies, and head maps use ``RdBu_r`` (diverging, colour-blind safe)
or ``viridis``. Every line that carries an interval is drawn with its interval shaded; a permutation-null band,
where given, is grey and lies under the lines. Draw inside ``paper_style`` (a decorator); nothing here switches the
matplotlib backend.
"""

from __future__ import annotations

import functools

import matplotlib.pyplot as plt
import numpy as np
from cycler import cycler
from matplotlib.transforms import offset_copy

#: Okabe & Ito (2008): eight colours told apart with any common colour-vision deficiency
PALETTE = {"blue": "#0072B2", "vermillion": "#D55E00", "green": "#009E73", "orange": "#E69F00",
           "purple": "#CC79A7", "sky": "#56B4E9", "yellow": "#F0E442", "black": "#000000", "grey": "#999999",
           "light": "#CCCCCC"}
#: what each role is drawn in, in every figure: an edit, its random-direction control, no edit
ROLE = {"edit": PALETTE["blue"], "control": PALETTE["grey"], "none": PALETTE["light"],
        "top": PALETTE["vermillion"], "bottom": PALETTE["blue"], "high": PALETTE["blue"], "low": PALETTE["orange"],
        "patch": PALETTE["green"]}
#: the three CMA stages (Fig. 1d), as in the stage map
STAGE = {"id_retrieval": PALETTE["vermillion"], "id_selection": PALETTE["green"],
         "feature_retrieval": PALETTE["blue"]}

PAPER_RC = {"font.family": "DejaVu Sans", "font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8,
            "legend.fontsize": 7, "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.spines.top": False,
            "axes.spines.right": False, "lines.linewidth": 1.4, "legend.frameon": False, "image.cmap": "viridis",
            "axes.prop_cycle": cycler(color=[PALETTE[c] for c in ("blue", "vermillion", "green", "orange",
                                                                  "purple", "sky", "black", "grey")]),
            "savefig.dpi": 200, "figure.dpi": 100}

# Line styles per RSA curve (the three Fig. 1c curves first).
CURVE_STYLE = {
    "position_prompt": dict(color=PALETTE["blue"], label="Position (Prompt Tokens)"),
    "position_last": dict(color=PALETTE["vermillion"], label="Position (Last Token)"),
    "features_last": dict(color=PALETTE["green"], label="Feature (Last Token)"),
    "features_prompt": dict(color=PALETTE["purple"], label="Feature (Prompt Tokens)", ls="--", lw=1.0),
    "color_last": dict(color=PALETTE["orange"], label="Colour (Last Token)", ls=":", lw=1.0),
    "shape_last": dict(color=PALETTE["sky"], label="Shape (Last Token)", ls="-.", lw=1.0),
}


def paper_style(fn):
    """Decorator: draw inside the paper's rc settings (text sizes are fixed when artists are created)."""
    @functools.wraps(fn)
    def wrapped(*a, **kw):
        with plt.rc_context(PAPER_RC):
            return fn(*a, **kw)
    return wrapped


def figure(ncols: int = 1, nrows: int = 1, w: float = 3.4, h: float = 2.6, **kw):
    """A figure of ``nrows`` x ``ncols`` panels of ``w`` x ``h`` inches each (call inside ``paper_style``)."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols, h * nrows), squeeze=False, **kw)
    return fig, axes


def interval_line(ax, x, r, lo, hi, label=None, color=None, ls="-", lw=1.4, marker=None):
    """A line with its interval shaded."""
    x = np.asarray(x)
    line, = ax.plot(x, r, ls=ls, lw=lw, color=color, label=label, marker=marker, ms=3, zorder=3)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, lw=0, zorder=2)
    return line


def null_band(ax, x, lo, hi, label="permutation null (95%)"):
    """A grey band under every line (hatched, so a line inside it stays visible)."""
    ax.fill_between(np.asarray(x), lo, hi, facecolor="0.85", edgecolor="0.6", hatch="////", lw=0, zorder=1,
                    label=label)


def legend_below(ax, ncol: int = 2, drop: float = 0.45, **kw):
    """A frameless legend ``drop`` inches under the axes (clear of tick labels and x label): it hides no curve."""
    tr = offset_copy(ax.transAxes, fig=ax.figure, y=-drop, units="inches")
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=tr, ncol=ncol, **kw)


def figure_legend(fig, axes, ncol: int = 3, drop: float = 0.02):
    """One frameless legend under the whole figure: every labelled line or band of ``axes`` once, in first-drawn
    order (panels that share entries do not repeat them side by side)."""
    seen: dict[str, object] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, h)
    fig.legend(list(seen.values()), list(seen), loc="upper center", bbox_to_anchor=(0.5, drop), ncol=ncol,
               frameon=False)


def rsa_axes(ax, n_layers: int, title: str | None = None):
    ax.axhline(0, color="0.3", lw=0.6)
    ax.set_xlabel("Layer")
    ax.set_ylabel("RSA (Pearson r)")
    ax.set_xlim(-0.3, n_layers - 0.7)
    if n_layers <= 12:
        ax.set_xticks(range(n_layers))
    if title:
        ax.set_title(title)


@paper_style
def head_maps(maps: dict[str, np.ndarray], titles: dict[str, str] | None = None, w: float = 3.0):
    """Side-by-side [L, H] heatmaps (layers on y, heads on x) on one symmetric colour scale."""
    names = list(maps)
    L, H = next(iter(maps.values())).shape
    h = min(4.5, max(1.6, 0.1 * L + 1.0))
    fig, axes = figure(len(names), 1, w=w, h=h)
    vmax = max(float(np.nanmax(np.abs(m))) if np.isfinite(m).any() else 0.0 for m in maps.values()) or 1.0
    im = None
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        im = ax.imshow(maps[name], aspect="auto", origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax,
                       interpolation="nearest")
        ax.set_xlabel("Head")
        if i == 0:
            ax.set_ylabel("Layer")
        ax.set_title((titles or {}).get(name, name))
    fig.colorbar(im, ax=list(axes[0]), shrink=0.9, label="RSA (Pearson r)")
    return fig


def bars(ax, groups: list[str], series: dict[str, tuple], colors: dict[str, str] | None = None,
         ylabel: str = "", title: str | None = None):
    """Grouped bars with asymmetric error bars: ``series[name] = (values, lo, hi)``, one value per group."""
    k = len(series)
    width = 0.8 / max(k, 1)
    x = np.arange(len(groups))
    for i, (name, (v, lo, hi)) in enumerate(series.items()):
        v, lo, hi = (np.asarray(a, dtype=float) for a in (v, lo, hi))
        err = np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])
        ax.bar(x + (i - (k - 1) / 2) * width, v, width, yerr=np.nan_to_num(err), capsize=2, label=name,
               color=(colors or {}).get(name), error_kw={"lw": 0.8})
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)


def where(rows: list[dict], **match) -> list[dict]:
    """The rows of a stored table whose columns equal ``match``."""
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def column(rows: list[dict], key: str) -> np.ndarray:
    """One column of stored rows as floats (empty cells are NaN)."""
    return np.array([np.nan if r[key] == "" else r[key] for r in rows], dtype=float)


def error(v, lo, hi) -> np.ndarray:
    """[2, n] error-bar lengths of values ``v`` with interval [lo, hi] (never negative, NaN as 0)."""
    v, lo, hi = (np.asarray(a, dtype=float) for a in (v, lo, hi))
    return np.clip(np.nan_to_num(np.vstack([v - lo, hi - v])), 0, None)
