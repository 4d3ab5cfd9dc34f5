"""Benchmark: the full causal-mediation head sweep, naive vs batched rows vs the fast engine vs attribution.

Everything runs in one process on one device, so the printed ratios compare like with like. The naive engine is
one full model forward (vision tower included) per head and condition, with all pairs of the condition in the
batch (generous to the baseline: per-pair forwards would be slower still); its full-sweep time is scaled from
``--sample-heads`` heads per condition. "Batched rows without cache" stacks heads as rows but recomputes every
position; its full-sweep time is scaled from a sample of chunks. The fast engine (prefix cache + batched rows +
vision once) and the attribution screen run the complete sweep.

    python benchmarks/cma_engine.py --model random:Qwen2.5-VL-7B --dtype bf16 --device cuda   # the GPU target
    python benchmarks/cma_engine.py --model tiny:qwen2_5_vl --device cpu --pairs 8             # smoke / CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vismech.engine import patching
from vismech.engine.attribution import attribution_scores
from vismech.models.load import load_vlm
from vismech.scenes.counterfactual import CONDITIONS, cma_pairs


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev):
    sync(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t


def positions_for(batch, condition):
    return [m[0] for m in batch.mentions] if condition == "id_retrieval" else [[batch.last]] * len(batch)


def matmul_rate(dev, dtype) -> float:
    """Measured dense matrix-multiply rate (FLOP/s) on this device and dtype."""
    n = 8192 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 10 if dev.type == "cuda" else 3
    _, t = timed(lambda: [a @ b for _ in range(reps)], dev)
    return 2 * n ** 3 * reps / t


def floor_flops(vlm, batch, condition) -> float:
    """FLOPs the sweep must spend: for each head (l, h) and pair, positions p0..T-1 through layers l..L-1."""
    tc = vlm.text_config
    d, f, L = tc.hidden_size, tc.intermediate_size, vlm.n_layers
    kv = vlm.n_kv_heads * vlm.head_dim
    per_token_layer = 2 * (2 * d * d + 2 * d * kv + 3 * d * f)  # q,o + k,v projections + gated MLP
    pos = positions_for(batch, condition)
    T = batch.length
    total = 0.0
    for p in pos:
        n_tok = T - min(p)
        attn = 4 * vlm.n_heads * vlm.head_dim * T * n_tok  # scores and weighted sum against T keys
        for layer in range(L):
            total += vlm.n_heads * (L - layer) * (n_tok * per_token_layer + attn)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:Qwen2.5-VL-7B")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--grid", default="3x3")
    ap.add_argument("--sample-heads", type=int, default=6)
    ap.add_argument("--sample-chunks", type=int, default=2)
    ap.add_argument("--rows", type=int, default=None, help="heads stacked per forward (default: automatic)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    grid = tuple(int(x) for x in args.grid.split("x"))

    vlm = load_vlm(args.model, dtype=args.dtype, device=args.device)
    dev = vlm.device
    heads = [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)]
    print(f"model {args.model} ({vlm.n_layers}x{vlm.n_heads} heads) {args.dtype} on {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    rate = matmul_rate(dev, vlm.dtype)
    print(f"measured matmul rate: {rate / 1e12:.1f} TFLOP/s")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    setup = {}
    for cond in CONDITIONS:
        pairs = cma_pairs(cond, args.pairs, seed=0, grid=grid)
        clean = vlm.encode([p.clean for p in pairs])
        cf = vlm.encode([p.counterfactual for p in pairs])
        a1, a1s = vlm.first_token_pairs(clean, [p.answer for p in pairs], [p.answer_star for p in pairs])
        pos = positions_for(clean, cond)
        counts = {len(p) for p in pos}
        if len(counts) > 1:  # keep the most common mention length (the benchmark needs one group)
            keep = max(counts, key=lambda c: sum(len(p) == c for p in pos))
            idx = [i for i, p in enumerate(pos) if len(p) == keep]
            clean = vlm.encode([pairs[i].clean for i in idx])
            cf = vlm.encode([pairs[i].counterfactual for i in idx])
            a1, a1s, pos = a1[idx], a1s[idx], [pos[i] for i in idx]
        src = patching.capture_z(vlm, cf, pos)
        setup[cond] = (clean, src, pos, torch.stack([a1, a1s], 1))
    seq = setup["id_selection"][0].length
    print(f"{args.pairs} pairs x 3 conditions x {len(heads)} heads; sequence length {seq} tokens")

    res = {"model": args.model, "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda"
           else "cpu", "pairs": args.pairs, "heads": len(heads), "seq_len": seq, "matmul_tflops": rate / 1e12}

    # naive: one full forward per head, scaled from a sample
    t_naive = 0.0
    for cond, (clean, src, pos, tid) in setup.items():
        sample = heads[:: max(1, len(heads) // args.sample_heads)][: args.sample_heads]
        patching.naive_head_patch(vlm, clean, src, pos, tid, heads=sample[:1])  # warm-up
        _, t = timed(lambda: patching.naive_head_patch(vlm, clean, src, pos, tid, heads=sample), dev)
        t_naive += t / len(sample) * len(heads)
    res["naive_s"] = t_naive

    # batched rows without cache, scaled from a few chunks
    t_rows = 0.0
    for cond, (clean, src, pos, tid) in setup.items():
        r = args.rows or patching.default_rows_per_forward(vlm, clean, clean.length)
        sample = heads[: r * args.sample_chunks]
        patching.head_patch(vlm, clean, src, pos, tid, heads=heads[:r], rows_per_forward=r, use_cache=False)
        _, t = timed(lambda: patching.head_patch(vlm, clean, src, pos, tid, heads=sample, rows_per_forward=r,
                                                 use_cache=False), dev)
        t_rows += t / len(sample) * len(heads)
    res["rows_no_cache_s"] = t_rows

    # the fast engine, complete sweep
    t_fast, floor = 0.0, 0.0
    outs = {}
    for cond, (clean, src, pos, tid) in setup.items():
        patching.head_patch(vlm, clean, src, pos, tid, heads=heads[:8], rows_per_forward=args.rows)  # warm-up
        outs[cond], t = timed(lambda: patching.head_patch(vlm, clean, src, pos, tid, rows_per_forward=args.rows),
                              dev)
        t_fast += t
        floor += floor_flops(vlm, clean, cond)
    res["fast_s"] = t_fast
    res["floor_s"] = floor / rate
    res["fast_share_of_floor"] = res["floor_s"] / t_fast

    # attribution screen, complete
    t_attr = 0.0
    rho = {}
    from scipy.stats import spearmanr

    from vismech.analysis.cma import logit_diff_score

    for cond, (clean, src, pos, tid) in setup.items():
        est, t = timed(lambda: attribution_scores(vlm, clean, src, pos, tid[:, 0], tid[:, 1]), dev)
        t_attr += t
        base = vlm.logits(clean).gather(1, tid.to(vlm.input_device)).cpu()
        exact = logit_diff_score(base.numpy(), outs[cond].numpy(), [0] * len(clean), [1] * len(clean)).mean(1)
        rho[cond] = float(spearmanr(exact, est.reshape(len(heads), -1).mean(1).numpy()).statistic)
    res["attribution_s"] = t_attr
    res["attribution_spearman"] = rho
    if dev.type == "cuda":
        res["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30

    print(f"naive (one full forward per head, scaled):   {t_naive:9.1f} s")
    print(f"batched rows, no cache (scaled):              {t_rows:9.1f} s")
    print(f"fast engine (complete sweep):                 {t_fast:9.1f} s")
    print(f"attribution screen (complete):                {t_attr:9.1f} s")
    print(f"speed-up fast vs naive: {t_naive / t_fast:.1f}x; fast vs rows without cache: {t_rows / t_fast:.1f}x")
    print(f"FLOP floor {res['floor_s']:.2f} s at the measured rate: fast engine reaches "
          f"{100 * res['fast_share_of_floor']:.0f}% of it")
    print("attribution vs exact, Spearman rho by condition: "
          + ", ".join(f"{k} {v:.2f}" for k, v in rho.items()))
    if "peak_gpu_gib" in res:
        print(f"peak GPU memory {res['peak_gpu_gib']:.1f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
