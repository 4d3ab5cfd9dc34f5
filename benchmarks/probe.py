"""Benchmark: the linear probe of ``analysis.pca.probe_accuracy`` (PCA experiment, binding errors) on real-size
hidden states, fitted in the full space vs in the span of the training rows (``pca._fit_in_row_span``), in one
process; prints both times, the ratio and whether the fold accuracies agree.

    python benchmarks/probe.py [--n 200] [--d 3584] [--classes 6]

Workload: the PCA experiment's default (k = 200 trials of the paper's 6-cell layout, Qwen2.5-VL-7B's 3584 hidden
units), two labels (position, features) per layer, 5 folds; synthetic states with a class signal."""

from __future__ import annotations

import argparse
import importlib
import time

import numpy as np

P = importlib.import_module("vismech.analysis.pca")


def timed_accuracies(data, fit_in_span) -> tuple[float, list[float]]:
    """Seconds and fold-mean accuracies of ``probe_accuracy`` over ``data``, with the span fit on or off."""
    saved = P._fit_in_row_span
    if not fit_in_span:
        P._fit_in_row_span = P._fit_logreg  # the same signature: the fit in the full space
    try:
        t = time.perf_counter()
        accs = [P.probe_accuracy(X, y, folds=5, seed=0)[0] for X, y in data]
        return time.perf_counter() - t, accs
    finally:
        P._fit_in_row_span = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--d", type=int, default=3584)
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--signal", type=float, default=0.05, help="class signal per unit (0.05: accuracy well below 1)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    data = []
    for _ in range(args.layers):
        y = rng.integers(0, args.classes, args.n)
        centres = rng.normal(size=(args.classes, args.d))
        data.append((rng.normal(size=(args.n, args.d)) + args.signal * centres[y], y))
    t_full, a_full = timed_accuracies(data, False)
    t_span, a_span = timed_accuracies(data, True)
    print(f"probe, {args.layers} layers x 5 folds, n={args.n}, d={args.d}, {args.classes} classes")
    print(f"  full space  {t_full:7.2f} s   fold-mean accuracies {np.round(a_full, 3).tolist()}")
    print(f"  row span    {t_span:7.2f} s   fold-mean accuracies {np.round(a_span, 3).tolist()}")
    print(f"speed-up: {t_full / t_span:.1f}x; largest accuracy difference "
          f"{np.abs(np.subtract(a_full, a_span)).max():.3f}")


if __name__ == "__main__":
    main()
