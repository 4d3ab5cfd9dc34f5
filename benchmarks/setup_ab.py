"""Benchmark: one CMA condition as `run cma` runs it (baseline, scores, re-paired null), with and without each of
three engine choices, interleaved in one process (the order turning each round): the prefix cache cut from the
clean forward's keys and values (``replay.lm_inputs(keys=True)``) against a separate run of the prefix; the
shared-prefix attention's products in the model's precision with float32 accumulation
(``cascade_attention(low=True)``, the CUDA default) against products in float32; the patched rows' logits of the
answers' token ids alone (``replay.output_logits(vocab=...)``) against the whole vocabulary's.

    python benchmarks/setup_ab.py --model random:Qwen2.5-VL-7B --device cuda --dtype bf16   # GPU
    python benchmarks/setup_ab.py --model tiny:qwen2_5_vl --pairs 4                          # smoke (CPU)
"""

from __future__ import annotations

import time

import torch

import bench_args
from vismech.engine import cascade, mediation, patching, replay
from vismech.scenes.counterfactual import CONDITIONS, cma_pairs


def main(argv=None) -> int:
    ap = bench_args.parser(__doc__)
    ap.add_argument("--condition", default="id_selection", choices=CONDITIONS)
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    vlm = bench_args.model(args)
    pairs = cma_pairs(args.condition, args.pairs, seed=0, grid=(3, 3))
    real_inputs, real_attention, real_reader = replay.lm_inputs, cascade.cascade_attention, patching._reader

    def variant(keys: bool, low: bool | None, part: bool = True):
        patching.lm_inputs = (real_inputs if keys else  # what the engine's set-up calls
                              lambda vlm, batch, logits=True, keys=False: real_inputs(vlm, batch, logits))
        cascade.cascade_attention = (real_attention if low is None else
                                     lambda *a, **k: real_attention(*a, **{**k, "low": low}))
        patching._reader = real_reader if part else lambda *a: (*real_reader(*a)[:5], None)

    variants = {"as shipped": (True, None), "prefix run again": (False, None), "float32 products": (True, False),
                "whole vocabulary": (True, None, False)}
    times = {name: [] for name in variants}
    scores = {}
    try:
        variant(True, None)
        mediation.condition_scores(vlm, pairs[:4], args.condition, batch_size=4)  # warm-up
        names = list(variants)
        for rep in range(args.repeats):  # the order turns each round, so no variant always runs first
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                how = variants[name]
                variant(*how)
                if vlm.device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                scores[name] = mediation.condition_scores(vlm, pairs, args.condition, batch_size=len(pairs))
                if vlm.device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - t0)
    finally:
        patching.lm_inputs, cascade.cascade_attention, patching._reader = real_inputs, real_attention, real_reader
    base = min(times["as shipped"])
    print(f"{args.model} {args.dtype}, {args.condition}, {args.pairs} pairs, baseline + scores + null, best of "
          f"{args.repeats}:")
    for name, ts in times.items():
        diff = max(float(abs(a - b).max()) for a, b in zip(scores[name], scores["as shipped"]))
        print(f"  {name:<18}{min(ts):8.2f} s  ({min(ts) / base:.2f}x the shipped time; largest score difference "
              f"{diff:.2e}; runs {', '.join(f'{t:.2f}' for t in ts)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
