"""Benchmark: the permutation null of layerwise RSA (``analysis.rsa.permutation_null``, the RSA and rsa-relative
experiments' ``n_null``) against the reference that gathers every permuted target pair by pair and correlates in
full (the implementation before 2026-12-02), in one process; prints both times, the ratio and the largest
difference.

    python benchmarks/rsa_null.py [--n 2048] [--layers 8] [--d 256] [--perm 20]

Workload: rsa-relative's last-token targets on ``n`` trials (features of 7 colours x 7 shapes, absolute cells of
a 3x3 grid, relative cells of a 2x2 arrangement), activations of ``layers`` layers of width ``d`` (the shipped
organisms: 8 x 256) with a position signal."""

from __future__ import annotations

import argparse
import time

import numpy as np

from vismech.analysis.rsa import _pearson, cosine_rsm, feature_rsm, permutation_null, position_rsm


def reference(X, targets: dict, n_perm: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every permuted target gathered pair by pair, Pearson's r in full (same permutations as the engine)."""
    L, n = X.shape[0], X.shape[1]
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n) for _ in range(n_perm)]
    a, b = np.tril_indices(n, -1)
    out = {k: np.empty((n_perm, L)) for k in targets}
    for layer in range(L):
        x = cosine_rsm(X[layer])[a, b]
        for k, t in targets.items():
            for i, p in enumerate(perms):
                out[k][i, layer] = _pearson(x, t[p[a], p[b]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--perm", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    cells = rng.integers(0, 3, size=(args.n, 2))
    targets = {"features": feature_rsm(rng.integers(0, 7, args.n), rng.integers(0, 7, args.n)),
               "absolute": position_rsm(cells), "relative": position_rsm(cells % 2)}
    code = rng.normal(size=(9, args.d))
    X = rng.normal(size=(args.layers, args.n, args.d)) + code[cells[:, 0] * 3 + cells[:, 1]]
    t = time.perf_counter()
    ref = reference(X, targets, args.perm)
    t_ref = time.perf_counter() - t
    t = time.perf_counter()
    got = permutation_null(X, targets, args.perm)
    t_new = time.perf_counter() - t
    diff = max(float(np.abs(got[k] - ref[k]).max()) for k in targets)
    print(f"{args.n} trials, {args.layers} layers x {args.d}, {args.perm} permutations, targets {list(targets)}")
    print(f"reference (gathered pair by pair): {t_ref:.2f} s")
    print(f"permutation_null:                  {t_new:.2f} s   ratio {t_ref / t_new:.1f}x; "
          f"largest difference {diff:.1e}")


if __name__ == "__main__":
    main()
