"""The emergence figure: held-out accuracy per task over training, from organisms' ``emergence.jsonl`` files.

Each line of ``emergence.jsonl`` is one snapshot ``{"step": s, "accuracy": {group: value}, ...}`` taken at
log-spaced steps by the trainer. Other keys a snapshot callback adds (RSA peaks, CMA head counts) are plotted too
when present, one panel per key. ``seed_table`` summarises several runs of one architecture (final snapshot per
run: mean and standard deviation across seeds, per group).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_emergence(runs: dict[str, str | Path], groups: list[str] | None = None):
    """A figure with one panel per run: accuracy of each held-out group against training step (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 3.8), squeeze=False, sharey=True)
    for ax, (name, path) in zip(axes[0], runs.items()):
        snaps = read(path)
        steps = np.array([max(s["step"], 1) for s in snaps])
        keys = groups or list(snaps[-1]["accuracy"])
        for k in keys:
            ax.plot(steps, [s["accuracy"].get(k, np.nan) for s in snaps], marker="o", ms=3, label=k)
        ax.set_xscale("log")
        ax.set_xlabel("training step")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out first-token accuracy")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("Emergence over training (organisms)")
    return fig


def seed_table(paths: list[str | Path]) -> list[dict]:
    """Per group: final accuracy of each run, their mean and standard deviation (ddof=1)."""
    finals = [read(p)[-1] for p in paths]
    rows = []
    for g in finals[0]["accuracy"]:
        vals = np.array([f["accuracy"][g] for f in finals], dtype=float)
        rows.append({"group": g, "runs": len(vals), "steps": [f["step"] for f in finals],
                     "values": vals.round(3).tolist(), "mean": float(vals.mean()),
                     "sd": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0})
    return rows
