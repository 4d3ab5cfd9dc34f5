"""Benchmark: counting-ablation's settings (``counting_ablation.accuracies``) against the way they ran before (each
pass encoded again, a scoring forward for the first-token hits, then generation), in one process; prints both
times, the ratio, whether the hits agree, and where one pass's time goes (vision tower, prefill, decode steps).

    python benchmarks/counting.py [--model organism] [--device cpu] [--dtype fp32] [--n 8]
    python benchmarks/counting.py --model random:Qwen2.5-VL-7B --device cuda --dtype bf16 --n 32   # GPU

Workload: counting-ablation's defaults: ``--n`` App. C counting trials in batches of ``--batch-size``, the head
sets of its K grid (top, bottom and 3 random draws per K; here the heads are ranked in a fixed random order, as no
CMA ranking is at hand), greedy generation of ``--max-new-tokens`` tokens."""

from __future__ import annotations

import time

import numpy as np
import torch

import bench_args

from vismech.engine import decode
from vismech.engine import interventions as iv
from vismech.engine import patching, replay
from vismech.experiments import counting_ablation as ca
from vismech.scenes import answers
from vismech.scenes.sets import counting_set


def before(vlm, batches, head_sets, max_new_tokens, rows, resize):
    """The baseline: counting-ablation's passes as they ran before (encode, score, generate)."""
    out = [([], []) for _ in head_sets]
    for b, _ in batches:
        s = 0
        while s < len(head_sets):
            group = head_sets[s:s + max(1, rows // len(b))]
            if vlm.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(vlm.device)
                before_bytes = torch.cuda.memory_allocated(vlm.device)
            bb = vlm.encode(list(b.trials) * len(group))
            with iv.zero_heads_per_block(vlm, group, len(b)):
                first = vlm.score_answers(bb, [[t.answer] for t in bb.trials]).greedy[:, 0].int().tolist()
                texts = vlm.generate(bb, max_new_tokens)
            for g in range(len(group)):
                out[s + g][0].extend(first[g * len(b):(g + 1) * len(b)])
                out[s + g][1].extend(int(answers.is_correct(t, x))
                                     for t, x in zip(b.trials, texts[g * len(b):(g + 1) * len(b)]))
            s += len(group)
            if resize is not None:
                peak = torch.cuda.max_memory_allocated(vlm.device) - before_bytes
                rows = resize(rows, len(bb), peak)
    return out


def main() -> None:
    ap = bench_args.parser(__doc__)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=ca.DEFAULTS["max_new_tokens"])
    a = ap.parse_args()
    vlm = bench_args.model(a)
    cuda = vlm.device.type == "cuda"
    total = vlm.n_layers * vlm.n_heads
    rng = np.random.default_rng(0)
    order = [(int(i // vlm.n_heads), int(i % vlm.n_heads)) for i in rng.permutation(total)]
    sets = []
    for k in ca.k_grid(total):
        sets += [order[:k], order[::-1][:k]] + [[order[i] for i in sorted(rng.choice(total, k, replace=False))]
                                                for _ in range(3)]
    sets = [list(s) for s in dict.fromkeys(tuple(sorted(s)) for s in sets)]
    trials = counting_set(a.n, seed=0, grid=(3, 3))
    batches = []
    for s in range(0, len(trials), a.batch_size):
        b = vlm.encode(trials[s:s + a.batch_size])
        batches.append((b, vlm.answers(b, [[t.answer] for t in b.trials])))
    rows = 4 * a.batch_size

    def resize(r, ran, peak):
        return patching.rows_from_memory(patching.free_bytes(vlm.device), peak / ran, r) if peak else r

    def timed(fn, *args):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        got = fn(*args)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t, got

    print(f"model {a.model} {a.dtype} on {vlm.device}: {len(trials)} trials x {len(sets)} head sets, "
          f"{a.max_new_tokens} new tokens, prompt {batches[0][0].length} tokens", flush=True)
    # where one pass's time goes: all sets on the first trial batch (as the memory-sized passes run on a GPU)
    b = batches[0][0]
    bb = b.take(list(range(len(b))) * len(sets))
    vision = vlm.model.get_submodule(f"model.{vlm.family.vision_modules[0]}")
    spent = {"vision": 0.0}

    def pre(*_):
        if cuda:
            torch.cuda.synchronize()
        spent["t"] = time.perf_counter()

    def post(*_):
        if cuda:
            torch.cuda.synchronize()
        spent["vision"] += time.perf_counter() - spent["t"]

    handles = [vision.register_forward_pre_hook(pre), vision.register_forward_hook(post)]
    timed(vlm.logits, b)  # warm-up
    spent["vision"] = 0.0
    with iv.zero_heads_per_block(vlm, sets, len(b)):
        t_prefill, full = timed(vlm.logits, bb)
        t_vision = spent["vision"]
        t_gen, ids = timed(vlm.generate_ids, bb, a.max_new_tokens)
    for h in handles:
        h.remove()
    inp = replay.lm_inputs(vlm, b)[0]
    with iv.zero_heads_per_block(vlm, sets, len(b)):
        t_dec, ids2 = timed(decode.greedy, vlm, inp.repeat(len(sets)), b.inputs["attention_mask"].repeat(len(sets), 1),
                            a.max_new_tokens)
    prompt_diff = float((ids2.logits - full).abs().max())
    ids2 = ids2.ids
    steps = ids.shape[1]
    print(f"one pass of {len(bb)} rows: prefill {t_prefill:.2f} s (vision tower {t_vision:.2f} s); generation of "
          f"{steps} tokens: generate {t_gen:.2f} s ({1000 * (t_gen - t_prefill) / max(1, steps - 1):.1f} ms a "
          f"decode step), engine.decode.greedy {t_dec:.2f} s (equal: {torch.equal(ids, ids2)})", flush=True)
    if not torch.equal(ids, ids2):  # where the two continuations part, and how far apart the prompt's logits are
        w = min(ids.shape[1], ids2.shape[1])
        differ = (ids[:, :w] != ids2[:, :w]).cpu()
        first = [int(r.nonzero()[0]) for r in differ if r.any()]
        print(f"  {len(first)} of {len(ids)} rows differ, first at token {min(first)} (median "
              f"{int(np.median(first))}); prompt logits differ by up to {prompt_diff:.3g} (a vision pass of "
              f"{len(b)} images vs {len(bb)}; {vlm.dtype})", flush=True)
    t_old, old = timed(before, vlm, batches, sets, a.max_new_tokens, rows, resize if cuda else None)
    print(f"before (encode, score, generate per pass): {t_old:.2f} s", flush=True)
    t_new, new = timed(ca.accuracies, vlm, batches, sets, True, a.max_new_tokens, rows)
    print(f"now (counting_ablation.accuracies):         {t_new:.2f} s")
    print(f"ratio {t_old / t_new:.2f}x; generation hits equal: {[g for _, g in old] == [g for _, g in new]}; "
          f"first-token hits equal: {[f for f, _ in old] == [f for f, _ in new]}")


if __name__ == "__main__":
    main()
