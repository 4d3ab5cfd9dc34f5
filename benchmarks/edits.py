"""Benchmark: the ID-intervention edits (``id_intervention.edit_hits``) with every setting of a batch stacked into
few forwards (``EditedRuns.scores_many``) vs one forward per setting, in one process; prints both times, the ratio,
the forwards each made, and whether the hit counts agree (they must be equal).

    python benchmarks/edits.py [--model organism] [--device cpu] [--dtype fp32] [--n 32]
    python benchmarks/edits.py --model random:Qwen2.5-VL-7B --device cuda --dtype bf16   # GPU

Workload: id-intervention's default alphas (7) x 2 directions x head sets of the first 1, 2, 5, 10 and 20 heads
(in layer order) of the ID-selection condition, on ``--n`` held-out two-object trials (vectors from as many)."""

from __future__ import annotations

import time

import torch

import bench_args

from vismech.engine import hooks
from vismech.engine import interventions as iv
from vismech.experiments import id_intervention as idi
from vismech.scenes.sets import scene_description_set


def main() -> None:
    ap = bench_args.parser(__doc__)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    a = ap.parse_args()
    vlm = bench_args.model(a)
    c = "id_selection"
    trials = scene_description_set(2 * a.n, (1, 2), n_objects=2, seed=0, entropy="high")
    est, held = trials[:a.n], trials[a.n:]
    heads = [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)][:20]
    vecs = {c: iv.id_vectors(vlm, est, [idi.id_labels(t, c)[0] for t in est], idi.SITE[c], heads,
                             lambda b: idi.condition_positions(b, c), a.batch_size)}
    head_sets = {(c, f"k{k}"): heads[:k] for k in (1, 2, 5, 10, 20)}
    alphas = idi.DEFAULTS["alphas"]
    forwards = {"n": 0}
    count = lambda *_: forwards.__setitem__("n", forwards["n"] + 1)  # noqa: E731
    handle = hooks.language_model(vlm).register_forward_pre_hook(count)
    stacked_many = iv.EditedRuns.scores_many

    def timed(one_each: bool):
        iv.EditedRuns.scores_many = ((lambda self, sets, blocks=None: stacked_many(self, sets, 1)) if one_each
                                     else stacked_many)
        forwards["n"] = 0
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        hits = idi.edit_hits(vlm, held, vecs, head_sets, alphas, a.batch_size, 0)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, forwards["n"], hits

    try:
        timed(False)  # warm-up (first allocations, kernel choice)
        t1, f1, h1 = timed(True)
        t2, f2, h2 = timed(False)
    finally:
        iv.EditedRuns.scores_many = stacked_many
        handle.remove()
    n_set = len(head_sets) * len(alphas) * 2
    print(f"model {a.model} {a.dtype} on {a.device}: {len(held)} trials x {n_set} settings, batch {a.batch_size}")
    print(f"one forward per setting: {t1:.2f} s, {f1} language-model forwards")
    print(f"settings stacked:        {t2:.2f} s, {f2} language-model forwards")
    print(f"ratio {t1 / t2:.2f}x; hit counts equal: {h1 == h2}")


if __name__ == "__main__":
    main()
