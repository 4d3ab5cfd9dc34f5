"""Plotting helpers shared by the representational experiments (PCA Fig. 1b, RSA Figs. 1c/2, entropy Figs. 6-7).

Figures are drawn at paper size (a single panel about 3.4 x 2.6 inches, fonts 7-9 pt) with the Agg backend, so they
stay readable when placed in a two-column layout. Every line that carries a bootstrap interval is drawn with its
interval shaded; a permutation-null band, where given, is grey.
"""

from __future__ import annotations

import functools

import matplotlib.pyplot as plt
import numpy as np  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402

PAPER_RC = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
            "xtick.labelsize": 7, "ytick.labelsize": 7, "axes.spines.top": False, "axes.spines.right": False,
            "lines.linewidth": 1.4}

# Line styles per RSA curve (the three Fig. 1c curves first).
CURVE_STYLE = {
    "position_prompt": dict(color="#1f77b4", label="Position (Prompt Tokens)"),
    "position_last": dict(color="#d62728", label="Position (Last Token)"),
    "features_last": dict(color="#2ca02c", label="Feature (Last Token)"),
    "features_prompt": dict(color="#9467bd", label="Feature (Prompt Tokens)", ls="--", lw=1.0),
    "color_last": dict(color="#8c564b", label="Colour (Last Token)", ls=":", lw=1.0),
    "shape_last": dict(color="#7f7f7f", label="Shape (Last Token)", ls="-.", lw=1.0),
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
    line, = ax.plot(x, r, ls=ls, lw=lw, color=color, label=label, marker=marker, ms=3)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, lw=0)
    return line


def null_band(ax, x, lo, hi, label="permutation null (95%)"):
    ax.fill_between(np.asarray(x), lo, hi, color="0.6", alpha=0.25, lw=0, label=label)


def legend_below(ax, ncol: int = 2, drop: float = 0.45, **kw):
    """A frameless legend ``drop`` inches under the axes (clear of tick labels and x label): it hides no curve."""
    tr = offset_copy(ax.transAxes, fig=ax.figure, y=-drop, units="inches")
    ax.legend(frameon=False, loc="upper center", bbox_to_anchor=(0.5, 0.0), bbox_transform=tr, ncol=ncol, **kw)


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
        ax.bar(x + (i - (k - 1) / 2) * width, v, width, yerr=err, capsize=2, label=name,
               color=(colors or {}).get(name), error_kw={"lw": 0.8})
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
