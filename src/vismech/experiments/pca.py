"""``pca`` (Fig. 1b): at which layer does the last-token state separate by target position, and where by features?

Stimuli: the paper's PCA set (``scenes.sets.pca_set``): 6 conjunctions on the 3x2 layout (left and right columns
of a 3x3 grid), K trials per (object, target cell) combination (option ``n`` = K; the paper's 200 gives 7,200
trials, the default 4 gives 144 for a quick run). Representation: the residual stream at the last token after every
layer (``activations``; memmapped under ``<run>/cache`` when large, read one layer at a time).

Per layer: the top-2 principal components (``analysis.pca.pca``) and two separability scores for each label
(target position = its cell, 6 classes; target features = its colour-shape conjunction, 6 classes):

- ``silhouette``: mean silhouette coefficient of the trials in the 2-D PC space (what the paper's scatter shows);
- ``probe_accuracy``: stratified ``folds``-fold accuracy of an L2-regularised multinomial logistic-regression probe
  on the full state, with its standard error over folds and the chance (majority-class) rate. The paper runs no
  probes; this is an addition that does not depend on the top-2 PCs.

The "position layer" and "feature layer" are the arg-max over layers of the position and feature scores of the
measure ``select_by`` (default ``silhouette``, which matches the scatter; ``probe`` saturates at 1.0 on real
models, so its arg-max is the first saturated layer). Both measures' arg-maxes are in the summary. Qwen2-VL in the
paper: position at layer 19, features at layer 27.

Speed: the probe makes thousands of small matrix products, which a multi-threaded OpenBLAS runs many times slower
than one thread does (a 5-fold probe of 288 x 3,584 states: 8 s with 16 threads on the GPU host, 0.4 s on one
thread here). While probing (only), the OpenBLAS libraries numpy and scipy loaded are set to ``blas_threads``
threads (default 1; ``null`` leaves them) through ``threadpoolctl``, and restored after; results are unchanged.

``stimuli`` (``experiments.sources``): ``"grid"`` (the PCA set) or a stimulus folder, whose trials with a target are
used as they are (target position = the target's ID, target features = its name).

Outputs: ``pca.csv`` (one row per layer x label x measure), ``pca_trials.csv`` (PC1/PC2 of every trial at the two
selected layers), figure ``pca`` (scatter at the position layer coloured by target position, scatter at the
feature layer coloured and marked by target object, separability by layer).
"""

from __future__ import annotations

import contextlib

import numpy as np

from vismech.engine import activations
from vismech.analysis.pca import chance_accuracy, pca, probe_accuracy, silhouette
from vismech.analysis.stats import finite as _f, rate
from vismech.errors import UserError
from vismech.experiments import figures as F
from vismech.experiments.common import Context
from vismech.experiments.options import Opt
from vismech.experiments.sources import folder_trials
from vismech.scenes.sets import pca_set
from vismech.store.results import cell_columns
from vismech.scenes.vocab import COLORS

NAME = "pca"
DESCRIPTION = "Fig. 1b: last-token PCA on the 3x2 set; separability of target position and features by layer"
DEFAULTS = {"n": 4, "folds": 5, "select_by": "silhouette", "blas_threads": 1, "act_dtype": "float32",
            "memmap_mb": 512, "stimuli": "grid"}
LIMITS = {"select_by": Opt("str", choices=("silhouette", "probe"))}

LABELS = ("position", "features")
MEASURES = ("silhouette", "probe_accuracy")
MARKERS = {"circle": "o", "triangle": "^", "square": "s", "star": "*", "heart": "v", "cross": "X",
           "diamond": "D", "pentagon": "p", "hexagon": "h"}


@contextlib.contextmanager
def blas_threads(n: int | None):
    """Run the block with ``n`` BLAS threads in every BLAS library loaded (``threadpoolctl``; None: unchanged);
    the old counts are restored after."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=int(n), user_api="blas"):
        yield


def labels_of(trials) -> dict[str, np.ndarray]:
    return {"position": np.array([f"{t.target.cell[0]},{t.target.cell[1]}" for t in trials]),
            "features": np.array([t.target.name for t in trials])}


def layer_scores(X, labels: dict, folds: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """PC scores [n, 2], explained-variance ratios [2] and {(label, measure): (value, se, chance)} of one layer
    (under whatever BLAS thread limit the caller set: ``run`` sets ``blas_threads`` around all layers)."""
    X = np.asarray(X, dtype=np.float64)
    scores, _, ratio = pca(X, 2)
    out = {}
    for name, y in labels.items():
        out[(name, "silhouette")] = (silhouette(scores, y), np.nan, np.nan)
        acc, se = probe_accuracy(X, y, folds=min(folds, len(y)), seed=seed)
        out[(name, "probe_accuracy")] = (acc, se, chance_accuracy(y))
    return scores, ratio, out


@F.paper_style
def plot(st) -> dict:
    """Figure ``pca`` from the stored tables: the scatter at the position layer coloured by target cell, the
    scatter at the feature layer coloured and marked by target object, separability by layer."""
    sm, rows, pts = st.summary, st.table("pca"), st.table("pca_trials")
    lp, lf, n_layers = sm["position_layer"], sm["feature_layer"], sm["n_layers"]
    fig, axes = F.figure(3, 1, w=2.6, h=2.5)
    ax = axes[0, 0]
    at = F.where(pts, selected_for="position")
    cells = sorted({(r["target_row"], r["target_col"]) for r in at})
    colours = list(F.PALETTE.values())
    for i, c in enumerate(cells):
        m = [r for r in at if (r["target_row"], r["target_col"]) == c]
        ax.scatter(F.column(m, "pc1"), F.column(m, "pc2"), s=6, alpha=0.8, color=colours[i % 8],
                   label=f"({c[0]}, {c[1]})", lw=0)
    ax.set_title(f"Layer {lp}: target position")
    F.legend_below(ax, ncol=3, drop=0.3, markerscale=1.5, handletextpad=0.1, columnspacing=0.8,
                   title="target cell (row, col)", title_fontsize=7)
    ax = axes[0, 1]
    at = F.where(pts, selected_for="features")
    for obj in sorted({(r["target_color"], r["target_shape"], r["target_features"]) for r in at}):
        m = F.where(at, target_features=obj[2])
        rgb = np.array(COLORS.get(obj[0], (80, 80, 80))) / 255  # the object's own colour: the label is the colour
        ax.scatter(F.column(m, "pc1"), F.column(m, "pc2"), s=9, alpha=0.8, color=rgb,
                   marker=MARKERS.get(obj[1], "o"), label=obj[2], lw=0.3, edgecolors="0.2")
    ax.set_title(f"Layer {lf}: target features")
    F.legend_below(ax, ncol=2, drop=0.3, markerscale=1.5, handletextpad=0.1, columnspacing=0.8,
                   title="target object", title_fontsize=7)
    for a in axes[0, :2]:
        a.set_xlabel("PC1")
        a.set_ylabel("PC2")
        a.set_xticks([])
        a.set_yticks([])
    ax = axes[0, 2]
    x = np.arange(n_layers)
    for name, color in zip(LABELS, (F.CURVE_STYLE["position_last"]["color"], F.CURVE_STYLE["features_last"]["color"])):
        sil = F.column(sorted(F.where(rows, label=name, measure="silhouette"), key=lambda r: r["layer"]), "value")
        acc = sorted(F.where(rows, label=name, measure="probe_accuracy"), key=lambda r: r["layer"])
        v, se = F.column(acc, "value"), F.column(acc, "se")
        ax.plot(x, sil, color=color, label=f"{name}: silhouette (PC1-2)")
        F.interval_line(ax, x, v, v - se, v + se, color=color, ls="--", lw=1.0, label=f"{name}: probe accuracy")
    ax.axhline(sm["probe_chance"]["position"], color="0.5", lw=0.7, ls=":", label="probe chance")
    ax.set_xlabel("Layer")
    ax.set_ylabel("Separability")
    ax.set_title("Separability by layer")
    if n_layers <= 12:
        ax.set_xticks(x)
    F.legend_below(ax, ncol=1)
    fig.tight_layout()
    return {"pca": fig}


def run(ctx: Context) -> dict:
    k, folds, select = int(ctx.opt("n")), int(ctx.opt("folds")), ctx.opt("select_by")
    if select not in ("silhouette", "probe"):
        raise UserError(f"select_by must be 'silhouette' or 'probe', not {select!r}")
    trials = folder_trials(ctx, NAME) or pca_set(k=k, seed=ctx.seed)
    acts = activations.for_context(ctx, trials, commas=False, z=False, desc="pca capture")
    labels = labels_of(trials)
    last = acts.last()
    L = acts.n_layers
    table, ratios, scores = [], [], []
    # layer by layer, in one thread: the probe's optimiser holds the GIL between its many small products, so a
    # thread pool over layers made this step 2-3x slower on a 16-core GPU host (32-44 s against 19 s in `run all`
    # on Qwen2.5-VL-7B; benchmarks/README.md), though 1.2x faster on 2 cores
    with ctx.progress(L, "pca layers") as update, blas_threads(ctx.opt("blas_threads")):
        for layer in range(L):
            s, ratio, out = layer_scores(last[layer], labels, folds, ctx.seed)
            table.append(out)
            ratios.append(ratio)
            scores.append(s.astype(np.float32))  # [n, 2] per layer: small
            update(1)
    rows = []
    for layer, out in enumerate(table):
        for (label, measure), (v, se, chance) in out.items():
            rows.append({"measure": measure, "value": _f(v), "n": len(trials), "layer": layer, "label": label,
                         "se": _f(se), "chance": _f(chance), "folds": folds if "probe" in measure else "",
                         "explained_pc1": _f(ratios[layer][0]), "explained_pc2": _f(ratios[layer][1])})
    ctx.save_table("pca", rows)
    measure = "silhouette" if select == "silhouette" else "probe_accuracy"

    def argmax(label, m):
        v = np.array([t[(label, m)][0] for t in table], dtype=float)
        return int(np.nanargmax(v)) if np.isfinite(v).any() else 0

    lp, lf = argmax("position", measure), argmax("features", measure)
    ctx.save_table("pca_trials", [
        {"trial": i, "layer": layer, "selected_for": sel, "pc1": float(scores[layer][i, 0]),
         "pc2": float(scores[layer][i, 1]), **cell_columns("target", trials[i].target.cell),
         "target_features": labels["features"][i], "target_color": trials[i].target.color,
         "target_shape": trials[i].target.shape}
        for sel, layer in (("position", lp), ("features", lf)) for i in range(len(trials))])

    def at(layer):
        return {f"{label}_{m}": _f(table[layer][(label, m)][0]) for label in LABELS for m in MEASURES}

    return {"k": k, "n_trials": len(trials), "n_layers": L, "folds": folds, "select_by": select,
            "position_layer": lp, "feature_layer": lf,
            "position_layer_by": {m: argmax("position", m) for m in MEASURES},
            "feature_layer_by": {m: argmax("features", m) for m in MEASURES},
            "at_position_layer": at(lp), "at_feature_layer": at(lf),
            "probe_chance": {label: _f(table[0][(label, "probe_accuracy")][2]) for label in LABELS},
            "explained_variance": {"position_layer": [_f(x) for x in ratios[lp]],
                                   "feature_layer": [_f(x) for x in ratios[lf]]},
            "first_token_accuracy": rate(int(np.sum(acts.correct)), len(acts.correct)),
            "paper_qwen2_vl": {"position_layer": 19, "feature_layer": 27}}


def report_rows(st):
    """For the report: both scores of both labels at the selected position and feature layers."""
    rows, sm = st.table("pca"), st.summary
    out = []
    for which, layer in (("position layer", sm["position_layer"]), ("feature layer", sm["feature_layer"])):
        out += [{"at": which, **{k: r[k] for k in ("layer", "label", "measure", "value", "se", "chance", "n")}}
                for r in F.where(rows, layer=layer)]
    return "Separability at the selected layers", out, "results/pca.csv (every layer)"


def caption(summary: dict) -> str:
    """One sentence of what this model shows, from the stored summary."""
    at_p, at_f = summary["at_position_layer"], summary["at_feature_layer"]
    ch = summary["probe_chance"]
    return (f"Target position separates best at layer {summary['position_layer']} (silhouette "
            f"{at_p['position_silhouette']:.2f}, probe {100 * at_p['position_probe_accuracy']:.0f}% vs chance "
            f"{100 * ch['position']:.0f}%) and target features at layer {summary['feature_layer']} (silhouette "
            f"{at_f['features_silhouette']:.2f}, probe {100 * at_f['features_probe_accuracy']:.0f}% vs "
            f"{100 * ch['features']:.0f}%); n={summary['n_trials']} trials.")
