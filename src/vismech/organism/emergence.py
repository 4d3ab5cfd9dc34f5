"""The emergence figure: held-out accuracy per task over training, from organisms' ``emergence.jsonl`` files.

Each line of ``emergence.jsonl`` is one snapshot ``{"step": s, "accuracy": {group: value}, ...}`` taken at
log-spaced steps by the trainer; with ``organism.snapshot.AnalysisSnapshot`` (the CLI default) it also holds
``rsa`` (peak r and layer of the three Fig. 1c curves) and ``cma`` (significant heads per condition), drawn as
further rows of panels. ``seed_table`` summarises several runs of one architecture (final snapshot per
run: mean and standard deviation across seeds, per group).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


STAGE_LABELS = {"id_retrieval": "ID retrieval", "id_selection": "ID selection",
                "feature_retrieval": "feature retrieval"}
RSA_LABELS = {"position_prompt": "position, prompt tokens", "position_last": "position, last token",
              "features_last": "features, last token"}


def _panels(snaps: list[dict]) -> list[str]:
    return ["accuracy"] + [k for k in ("rsa", "cma") if any(k in s for s in snaps)]


def plot_emergence(runs: dict[str, str | Path], groups: list[str] | None = None):
    """One column per run, one row per kind of summary the snapshots hold: held-out accuracy per group; when
    present, the peak RSA value of the three Fig. 1c curves; and the number of heads with significant CMA scores
    per condition (``organism.snapshot``). x: training step (log scale; step 0 drawn at 1)."""
    import matplotlib.pyplot as plt

    data = {name: read(path) for name, path in runs.items()}
    rows = max((_panels(s) for s in data.values()), key=len)
    fig, axes = plt.subplots(len(rows), len(runs), figsize=(5.5 * len(runs), 3.2 * len(rows)), squeeze=False,
                             sharex="col", sharey="row")
    for j, (name, snaps) in enumerate(data.items()):
        steps = np.array([max(s["step"], 1) for s in snaps])
        for i, kind in enumerate(rows):
            ax = axes[i][j]
            if kind == "accuracy":
                for k in groups or list(snaps[-1]["accuracy"]):
                    ax.plot(steps, [s["accuracy"].get(k, np.nan) for s in snaps], marker="o", ms=3, label=k)
                ax.set_ylim(-0.03, 1.03)
            elif kind == "rsa":
                for k, label in RSA_LABELS.items():
                    ax.plot(steps, [(s.get("rsa", {}).get(k) or {}).get("peak_r", np.nan) or np.nan for s in snaps],
                            marker="o", ms=3, label=label)
                ax.axhline(0, color="grey", lw=0.6)
            else:
                for k, label in STAGE_LABELS.items():
                    ax.plot(steps, [(s.get("cma", {}).get(k) or {}).get("n_significant", np.nan) for s in snaps],
                            marker="o", ms=3, label=label)
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(name)
            if i == len(rows) - 1:
                ax.set_xlabel("training step")
    ylabels = {"accuracy": "held-out first-token accuracy", "rsa": "peak RSA r (Fig. 1c curves)",
               "cma": "significant CMA heads (BH q=0.05)"}
    for i, kind in enumerate(rows):
        axes[i][0].set_ylabel(ylabels[kind])
        axes[i][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Emergence over training (organisms)")
    fig.tight_layout()
    return fig


def flat_summary(snap: dict) -> dict[str, float]:
    """A snapshot as ``{name: number}``: ``accuracy`` groups by name, then ``rsa/<curve>/<field>`` and
    ``cma/<condition>/<field>`` (None, e.g. the mean layer of zero heads, becomes nan)."""
    out = {g: float(v) for g, v in snap["accuracy"].items()}
    for kind in ("rsa", "cma"):
        for key, fields in snap.get(kind, {}).items():
            for f, v in fields.items():
                out[f"{kind}/{key}/{f}"] = float("nan") if v is None else float(v)
    return out


def seed_table(paths: list[str | Path], step: int | None = None) -> list[dict]:
    """Per summary (``flat_summary``): each run's value at its last snapshot (or at ``step``, which every run must
    have), their mean and standard deviation (ddof=1) over the runs where it is defined (NaN where fewer than two
    runs define it)."""
    snaps = []
    for p in paths:
        runs = read(p)
        pick = runs[-1] if step is None else next((s for s in runs if s["step"] == step), None)
        if pick is None:
            raise ValueError(f"{p} has no snapshot at step {step}")
        snaps.append(pick)
    finals = [flat_summary(s) for s in snaps]
    rows = []
    for g in finals[0]:
        vals = np.array([f.get(g, np.nan) for f in finals], dtype=float)
        ok = vals[np.isfinite(vals)]
        rows.append({"group": g, "runs": len(vals), "steps": [s["step"] for s in snaps],
                     "values": vals.round(3).tolist(), "mean": float(ok.mean()) if ok.size else float("nan"),
                     "sd": float(ok.std(ddof=1)) if ok.size > 1 else float("nan")})
    return rows
