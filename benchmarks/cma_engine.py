"""Benchmark: the full causal-mediation head sweep, naive vs batched rows vs the engine before shared-prefix
attention vs the fast engine (with and without the re-paired null) vs attribution; and fast == naive on the
sampled heads.

Everything runs in one process on one device, so the printed ratios compare like with like. The naive engine is
one full model forward (vision tower included) per head and condition, with all pairs of the condition in the
batch (generous to the baseline: per-pair forwards would be slower still); its full-sweep time is scaled from
``--sample-heads`` heads per condition. "Batched rows without cache" stacks heads as rows but recomputes every
position; its full-sweep time is scaled from a sample of chunks. "Copied prefix" is the engine before shared-prefix
attention (``head_patch(shared_prefix=False)``: every row gets its own copy of the prefix cache and runs every
layer), complete or scaled from ``--before-heads`` heads per condition. The fast engine (shared-prefix attention,
rows joining at their layer, vision once) and the attribution screen run the complete sweep; ``--null`` also times
the sweep as ``run cma`` does it (``mediation.condition_scores``, the re-paired null included).

Fast vs naive: the CMA scores of the naive sample's heads from both engines; the largest absolute difference is
printed, and in fp32 it must stay within ``--tol`` (exit status 1 otherwise). In bf16 it is printed beside the
spread (standard deviation) of the null scores, so the rounding can be told from the effects.

    python benchmarks/cma_engine.py --model random:Qwen2.5-VL-7B --dtype bf16 --device cuda --null  # the GPU target
    python benchmarks/cma_engine.py --model random:Qwen2.5-VL-7B --dtype fp32 --pairs 8 --only-check  # fp32 check
    python benchmarks/cma_engine.py --model tiny:qwen2_5_vl --device cpu --pairs 4                   # smoke / CPU
    python benchmarks/cma_engine.py --model random:Qwen2.5-VL-7B --profile id_retrieval  # where the time goes
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from vismech.analysis.cma import logit_diff_score
from vismech.engine import mediation, patching
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


def score_of(base, logits):
    """CMA scores [heads, pairs] of patched logits [heads, pairs, 2] against clean logits [pairs, 2]."""
    n = base.shape[0]
    return logit_diff_score(base.numpy(), logits.numpy(), [0] * n, [1] * n)


def profile(vlm, setup, heads) -> int:
    """Where the fast engine's time goes: operations by self device time (CPU time on the CPU), and how much of the
    wall time the device was busy (a low share: launch- or host-bound)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    clean, src, pos, tid, _ = setup
    dev = vlm.device
    patching.head_patch(vlm, clean, src, pos, tid, heads=heads[:8])  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        _, wall = timed(lambda: patching.head_patch(vlm, clean, src, pos, tid, heads=heads), dev)
    ev = prof.key_averages()
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(ev.table(sort_by=key, row_limit=25, max_name_column_width=60))
    if dev.type == "cuda":  # the kernels alone (an operator's row repeats its kernels' time)
        from torch.autograd import DeviceType

        busy = sum(e.self_device_time_total for e in ev if e.device_type == DeviceType.CUDA) / 1e6
    else:
        busy = sum(e.self_cpu_time_total for e in ev) / 1e6
    print(f"{len(heads)} heads x {len(clean)} pairs: wall {wall:.2f} s, {'device' if dev.type == 'cuda' else 'CPU'} "
          f"busy (self time summed) {busy:.2f} s = {100 * busy / wall:.0f}% of the wall time")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:Qwen2.5-VL-7B")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--pairs", type=int, default=50)
    ap.add_argument("--grid", default="3x3")
    ap.add_argument("--sample-heads", type=int, default=6, help="naive heads per condition (timed and checked)")
    ap.add_argument("--sample-chunks", type=int, default=2, help="chunks of the batched-rows engine timed")
    ap.add_argument("--before-heads", type=int, default=0,
                    help="heads per condition the copied-prefix engine is timed on (0: the complete sweep)")
    ap.add_argument("--rows", type=int, default=None, help="heads stacked per forward (default: automatic)")
    ap.add_argument("--null", action="store_true", help="also time the sweep with the re-paired null")
    ap.add_argument("--only-check", action="store_true", help="only the fast-vs-naive check (and the fast sweep)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: rows, before, fast (the complete "
                    "sweep without the null; the check still runs on the sampled heads), attribution")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest fp32 fast-vs-naive score difference allowed")
    ap.add_argument("--profile", default=None, nargs="+", choices=CONDITIONS, help="instead of the benchmark: "
                    "profile the fast engine on every 4th head of each of these conditions (torch.profiler) and print "
                    "its 25 costliest operations and the device-busy share")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    grid = tuple(int(x) for x in args.grid.split("x"))
    skip = set(filter(None, args.skip.split(",")))
    if args.only_check:
        skip |= {"rows", "before", "attribution"}
    if "fast" in skip:
        skip.add("attribution")  # its rank correlation needs the complete sweep

    vlm = load_vlm(args.model, dtype=args.dtype, device=args.device)
    dev = vlm.device
    heads = [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)]
    print(f"model {args.model} ({vlm.n_layers}x{vlm.n_heads} heads, {vlm.n_kv_heads} kv heads) {vlm.dtype} on {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""), flush=True)
    rate = matmul_rate(dev, vlm.dtype)
    print(f"measured matmul rate: {rate / 1e12:.1f} TFLOP/s", flush=True)
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
        setup[cond] = (clean, src, pos, torch.stack([a1, a1s], 1), pairs)
    seq = setup["id_selection"][0].length
    print(f"{args.pairs} pairs x 3 conditions x {len(heads)} heads; sequence length {seq} tokens", flush=True)

    if args.profile:
        for cond in args.profile:
            print(f"== profile: {cond}", flush=True)
            profile(vlm, setup[cond], heads[::4])
        return 0
    res = {"model": args.model, "dtype": str(vlm.dtype), "device": str(dev),
           "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "pairs": args.pairs,
           "heads": len(heads), "seq_len": seq, "matmul_tflops": rate / 1e12}
    sample = heads[:: max(1, len(heads) // args.sample_heads)][: args.sample_heads]
    where = [heads.index(h) for h in sample]

    # naive: one full forward per head, scaled from a sample (kept for the fast-vs-naive check)
    t_naive, naive = 0.0, {}
    for cond, (clean, src, pos, tid, _) in setup.items():
        patching.naive_head_patch(vlm, clean, src, pos, tid, heads=sample[:1])  # warm-up
        naive[cond], t = timed(lambda: patching.naive_head_patch(vlm, clean, src, pos, tid, heads=sample), dev)
        t_naive += t / len(sample) * len(heads)
    res["naive_s"] = t_naive

    t_rows = None
    if "rows" not in skip:  # batched rows without cache, scaled from a few chunks
        t_rows = 0.0
        for cond, (clean, src, pos, tid, _) in setup.items():
            r = args.rows or patching.default_rows_per_forward(vlm, clean, clean.length)
            part = heads[: r * args.sample_chunks]
            patching.head_patch(vlm, clean, src, pos, tid, heads=heads[:r], rows_per_forward=r, use_cache=False)
            _, t = timed(lambda: patching.head_patch(vlm, clean, src, pos, tid, heads=part, rows_per_forward=r,
                                                     use_cache=False), dev)
            t_rows += t / len(part) * len(heads)
        res["rows_no_cache_s"] = t_rows

    t_before = None
    if "before" not in skip:  # the engine before shared-prefix attention (copied prefix, every layer)
        t_before = 0.0
        for cond, (clean, src, pos, tid, _) in setup.items():
            part = heads if not args.before_heads else heads[:: max(1, len(heads) // args.before_heads)]
            patching.head_patch(vlm, clean, src, pos, tid, heads=heads[:8], shared_prefix=False)  # warm-up
            _, t = timed(lambda: patching.head_patch(vlm, clean, src, pos, tid, heads=part,
                                                     rows_per_forward=args.rows, shared_prefix=False), dev)
            t_before += t / len(part) * len(heads)
        res["copied_prefix_s"] = t_before

    # the fast engine, complete sweep (with --skip fast: the naive sample's heads only, for the check)
    t_fast, floor = (None if "fast" in skip else 0.0), 0.0
    outs, diffs, bases = {}, {}, {}
    for cond, (clean, src, pos, tid, _) in setup.items():
        floor += floor_flops(vlm, clean, cond)
        bases[cond] = vlm.logits(clean).gather(1, tid.to(vlm.input_device)).float().cpu()
        if t_fast is None:
            got = patching.head_patch(vlm, clean, src, pos, tid, heads=sample, rows_per_forward=args.rows)
        else:
            patching.head_patch(vlm, clean, src, pos, tid, heads=heads[:8], rows_per_forward=args.rows)  # warm-up
            outs[cond], t = timed(lambda: patching.head_patch(vlm, clean, src, pos, tid,
                                                              rows_per_forward=args.rows), dev)
            t_fast += t
            print(f"  fast engine, {cond}: {t:.1f} s", flush=True)  # as it goes: a run cut short still reports
            got = outs[cond][where]
        diffs[cond] = float(abs(score_of(bases[cond], got) - score_of(bases[cond], naive[cond])).max())
    res["floor_s"] = floor / rate
    if t_fast is not None:
        res["fast_s"] = t_fast
        res["fast_share_of_floor"] = res["floor_s"] / t_fast
    res["fast_vs_naive_max_abs_score_diff"] = diffs
    worst = max(diffs.values())

    t_null = None
    if args.null:  # the sweep as `run cma` runs it: baseline, scores and the re-paired null
        t_null, spread = 0.0, {}
        for cond, (clean, _, _, _, pairs) in setup.items():
            (_, nl), t = timed(lambda: mediation.condition_scores(vlm, pairs, cond, batch_size=len(pairs), seed=0), dev)
            t_null += t
            print(f"  with the null, {cond}: {t:.1f} s", flush=True)
            spread[cond] = float(nl.std())
        res["fast_with_null_s"] = t_null
        res["null_sd"] = spread

    t_attr = None
    if "attribution" not in skip:  # attribution screen, complete
        from scipy.stats import spearmanr

        t_attr, rho = 0.0, {}
        for cond, (clean, src, pos, tid, _) in setup.items():
            est, t = timed(lambda: attribution_scores(vlm, clean, src, pos, tid[:, 0], tid[:, 1]), dev)
            t_attr += t
            exact = score_of(bases[cond], outs[cond]).mean(1)
            rho[cond] = float(spearmanr(exact, est.reshape(len(heads), -1).mean(1).numpy()).statistic)
        res["attribution_s"] = t_attr
        res["attribution_spearman"] = rho
    if dev.type == "cuda":
        res["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30

    lines = [("naive (one full forward per head, scaled)", t_naive),
             ("batched rows, no cache (scaled)", t_rows),
             ("copied prefix per row, every layer" + (" (scaled)" if args.before_heads else ""), t_before),
             ("fast engine (complete sweep)", t_fast),
             ("fast engine with the re-paired null (as run)", t_null),
             ("attribution screen (complete)", t_attr)]
    for name, t in lines:
        if t is not None:
            print(f"{name + ':':<48}{t:9.1f} s")
    if t_fast is not None:
        print(f"speed-up fast vs naive: {t_naive / t_fast:.1f}x"
              + (f"; vs rows without cache: {t_rows / t_fast:.1f}x" if t_rows else "")
              + (f"; vs copied prefix: {t_before / t_fast:.1f}x" if t_before else ""))
        print(f"FLOP floor {res['floor_s']:.2f} s at the measured rate: fast engine reaches "
              f"{100 * res['fast_share_of_floor']:.0f}% of it")
    if t_null is not None:
        print(f"FLOP floor of the sweep with the null (twice the scores' floor): {2 * res['floor_s']:.2f} s; the "
              f"run reaches {100 * 2 * res['floor_s'] / t_null:.0f}% of it")
    print(f"fast vs naive, {len(sample)} heads x {args.pairs} pairs x 3 conditions: largest |score difference| "
          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
          + (f"; null score spread (sd) " + ", ".join(f"{k} {v:.2e}" for k, v in res["null_sd"].items())
             if t_null is not None else ""))
    if t_attr is not None:
        print("attribution vs exact, Spearman rho by condition: "
              + ", ".join(f"{k} {v:.2f}" for k, v in res["attribution_spearman"].items()))
    if "peak_gpu_gib" in res:
        print(f"peak GPU memory {res['peak_gpu_gib']:.1f} GiB")
    failed = vlm.dtype == torch.float32 and worst > args.tol
    res["check"] = "skipped (not fp32)" if vlm.dtype != torch.float32 else ("FAIL" if failed else "ok")
    print(f"fp32 fast == naive within {args.tol:g}: {res['check']} (largest difference {worst:.2e})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
