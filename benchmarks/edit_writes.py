"""Benchmark: the CMA head sweep (``patching.head_patch``, every head, one condition) with each hook call's edits
joined into one write on one copy (``hooks.merged``, the default) vs one copy and one write per edit, their index
tensors moved to the device on every forward (the engine before), in one process; prints both times, the ratio and
the largest score difference (must be 0).

    python benchmarks/edit_writes.py [--model organism] [--device cpu] [--dtype fp32] [--pairs 16]
    python benchmarks/edit_writes.py --model random:Qwen2.5-VL-7B --device cuda --dtype bf16 --pairs 50   # GPU
"""

from __future__ import annotations

import contextlib
import time

import torch

import bench_args

from vismech.engine import hooks, mediation, patching
from vismech.scenes.counterfactual import cma_pairs


@contextlib.contextmanager
def one_by_one(vlm, edits):
    """``hooks.intervene`` as it was: every edit its own copy of the tensor and its own write, its index tensors and
    values moved to the device on every forward."""
    groups: dict = {}
    for e in edits:
        groups.setdefault((e.site, e.layer), []).append(e)
    with contextlib.ExitStack() as stack:
        for (site, layer), es in groups.items():
            def fn(x, es=es):
                for e in es:
                    r, p, h = (torch.as_tensor(t, device=x.device) for t in (e.rows, e.positions, e.heads))
                    v = e.values.to(device=x.device, dtype=x.dtype)
                    x = x.clone()
                    if e.mode == "set":
                        x[r, p, h] = v.expand_as(x[r, p, h])
                    else:
                        x[r, p, h] += v.expand_as(x[r, p, h])
                return x

            stack.enter_context(hooks.hooked(vlm, site, layer, fn))
        yield


def main() -> None:
    ap = bench_args.parser(__doc__)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--condition", default="id_retrieval")
    a = ap.parse_args()
    vlm = bench_args.model(a)
    pairs = cma_pairs(a.condition, a.pairs, seed=0)
    clean, cf = vlm.encode([p.clean for p in pairs]), vlm.encode([p.counterfactual for p in pairs])
    pos, _ = patching.pad_positions(mediation.condition_positions(clean, a.condition))
    src = patching.capture_z(vlm, cf, pos)
    answers = vlm.answers(clean, [[p.answer, p.answer_star] for p in pairs])
    joined = hooks.intervene

    def timed(join: bool):
        hooks.intervene = joined if join else one_by_one
        try:
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = patching.head_patch(vlm, clean, src, pos, answers)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t, out
        finally:
            hooks.intervene = joined

    timed(True)  # warm-up
    t0, before = timed(False)
    t1, after = timed(True)
    print(f"model {a.model} {a.dtype} on {a.device}: {a.pairs} pairs x {vlm.n_layers * vlm.n_heads} heads, "
          f"{a.condition}")
    print(f"one copy and write per edit: {t0:.2f} s")
    print(f"edits joined:                {t1:.2f} s")
    print(f"ratio {t0 / t1:.2f}x; largest score difference {float((before - after).abs().max()):.3g}")


if __name__ == "__main__":
    main()
