"""Benchmark and check: vismech beyond one GPU.

Five stages, each in fresh processes so every one sees only the GPUs it is given (``CUDA_VISIBLE_DEVICES``):

1. **sharding equality**: the CMA sweep (all heads, the three conditions, ``--eq-pairs`` pairs, scores only) of
   ``--eq-model`` on one GPU, then the same model sharded over two GPUs with ``--device-map auto``; prints the
   largest score difference (0 expected: same weights, same kernels, only where the layers sit differs).
2. **large model sharded**: ``--big-model`` (default random:Qwen2.5-VL-32B, bf16) over two GPUs, the same sweep
   with ``--big-pairs`` pairs; prints where the layers went, the peak memory per GPU and the time.
3. **both** (``combo``): two torchrun processes, each with the equality model sharded over its own two GPUs;
   scores compared with the one-GPU run of stage 1.
4. **data parallel**: ``torchrun --nproc-per-node N`` for N in ``--procs`` (1 first: the baseline in the same
   script), the full CMA sweep of ``--dp-model`` (three conditions x ``--dp-pairs`` pairs x every head, with the
   re-paired null, i.e. what ``vismech run cma`` computes); the sweep is timed inside the processes after the
   model is built (between barriers); prints the speed-up over one process and the largest score difference from
   the one-process scores (in bf16 a few rounding steps of the logits, see stage 5).
5. **data-parallel equality** (``dpeq``): the equality model in ``--eq-dtype`` (fp32), ``--eq-pairs`` pairs in
   chunks of half as many, with the null, in 1 and in 2 processes (the chunks split between them): 0 expected.

    PYTHONPATH=src python benchmarks/multi_gpu.py --out runs/multi_gpu          # all stages, >= 4 GPUs for N=4

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0`` and its PyTorch/NVSHMEM equivalents are set for every child
process unless already set).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# -- one process (or one torchrun rank) --------------------------------------------------------------------------
def sweep(args) -> None:
    import torch

    from vismech import distributed
    from vismech.engine.mediation import condition_scores
    from vismech.models.load import load_vlm
    from vismech.scenes.counterfactual import CONDITIONS, cma_pairs

    distributed.init()
    cuda = torch.cuda.is_available()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    vlm = load_vlm(args.model, dtype=args.dtype, device_map=args.device_map)
    build = time.perf_counter() - t0
    warm = cma_pairs("id_selection", 2, 99, (3, 3))
    condition_scores(vlm, warm, "id_selection", batch_size=2, null=False)  # kernels and allocator warmed
    sync()
    distributed.barrier()
    t1 = time.perf_counter()
    out = {}
    for c in CONDITIONS:
        pairs = cma_pairs(c, args.pairs, c == "feature_retrieval", (3, 3))
        s, n = condition_scores(vlm, pairs, c, batch_size=args.batch_size, null=args.null, seed=0)
        out[c] = s
        if n is not None:
            out[c + "_null"] = n
    sync()
    distributed.barrier()
    seconds = time.perf_counter() - t1
    if distributed.is_main():
        devices = sorted({str(p.device) for p in vlm.model.parameters()})
        peak = [torch.cuda.max_memory_allocated(i) / 2 ** 30 for i in range(torch.cuda.device_count())] if cuda else []
        meta = {"model": args.model, "dtype": args.dtype, "device_map": args.device_map, "world": distributed.world(),
                "pairs": args.pairs, "null": args.null, "sweep_seconds": seconds, "build_seconds": build,
                "devices": devices, "peak_gib_per_visible_gpu": [round(x, 1) for x in peak],
                "layers": vlm.n_layers, "heads": vlm.n_heads,
                "gpu": torch.cuda.get_device_name(0) if cuda else "cpu"}
        np.savez_compressed(args.save, **out)
        Path(args.save).with_suffix(".json").write_text(json.dumps(meta))
        print(json.dumps(meta), flush=True)
    distributed.shutdown()


# -- the driver ----------------------------------------------------------------------------------------------------
def _run(cmd: list[str], gpus: str, log: Path) -> int:
    env = {**os.environ, **{k: os.environ.get(k, v) for k, v in SAFE_ENV.items()}, "CUDA_VISIBLE_DEVICES": gpus}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")])
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    print(f"  [{' '.join(cmd[-12:])}] on GPUs {gpus}: exit {rc} in {time.perf_counter() - t:.0f} s (log {log})",
          flush=True)
    if rc != 0:
        print("  " + "\n  ".join(log.read_text().splitlines()[-15:]), flush=True)
    return rc


def _child(args, model, pairs, device_map, null, save, dtype="bf16", batch_size=None) -> list[str]:
    cmd = [__file__, "sweep", "--model", model, "--pairs", str(pairs), "--save", str(save),
           "--batch-size", str(batch_size or args.batch_size), "--dtype", dtype]
    if device_map:
        cmd += ["--device-map", device_map]
    if null:
        cmd += ["--null"]
    return cmd


def _load(save: Path):
    return dict(np.load(save)), json.loads(save.with_suffix(".json").read_text())


def _max_diff(a: dict, b: dict) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)


def main_driver(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    stages = {"equality": _equality, "big": _big, "combo": _combo, "dp": _data_parallel, "dpeq": _dp_equality}
    for name in args.stages:
        stages[name](args, out, report)
        (out / "multi_gpu.json").write_text(json.dumps(report, indent=1))
    print(f"report: {out / 'multi_gpu.json'}")


PY = [sys.executable]


def _torchrun(n: int) -> list[str]:
    return PY + ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]


def _equality(args, out, report):
    print(f"sharding equality: {args.eq_model} ({args.eq_dtype}), {args.eq_pairs} pairs x 3 conditions", flush=True)
    one, two = out / "eq_1gpu.npz", out / "eq_2gpu.npz"
    ok = _run(PY + _child(args, args.eq_model, args.eq_pairs, None, False, one, args.eq_dtype), "0",
              out / "eq_1gpu.log") == 0
    ok = ok and _run(PY + _child(args, args.eq_model, args.eq_pairs, "auto", False, two, args.eq_dtype), "0,1",
                     out / "eq_2gpu.log") == 0
    if ok:
        (a, ma), (b, mb) = _load(one), _load(two)
        d = _max_diff(a, b)
        scale = max(float(np.abs(v).max()) for v in a.values())
        report["equality"] = {"model": args.eq_model, "max_abs_diff": d, "max_abs_score": scale,
                              "one_gpu": ma, "two_gpus": mb}
        print(f"   devices {mb['devices']}; largest |score| {scale:.4g}; largest difference {d:.3g}", flush=True)


def _big(args, out, report):
    print(f"{args.big_model} sharded over 2 GPUs, {args.big_pairs} pairs x 3 conditions", flush=True)
    save = out / "big_2gpu.npz"
    if _run(PY + _child(args, args.big_model, args.big_pairs, "auto", False, save), "0,1",
            out / "big_2gpu.log") == 0:
        s, m = _load(save)
        report["big"] = {**m, "finite": bool(all(np.isfinite(v).all() for v in s.values()))}
        print(f"   {m['layers']}x{m['heads']} heads on {m['devices']}, peak GiB {m['peak_gib_per_visible_gpu']}, "
              f"sweep {m['sweep_seconds']:.1f} s, build {m['build_seconds']:.0f} s", flush=True)


def _combo(args, out, report):
    if not (out / "eq_1gpu.npz").exists():
        print("both: skipped (needs the equality stage's one-GPU scores)")
        return
    print("both: 2 processes x a model sharded over 2 GPUs each (4 GPUs), the equality sweep", flush=True)
    save = out / "combo.npz"
    cmd = _torchrun(2) + _child(args, args.eq_model, args.eq_pairs, "auto", False, save, args.eq_dtype)
    if _run(cmd, "0,1,2,3", out / "combo.log") == 0:
        (a, _), (b, mb) = _load(out / "eq_1gpu.npz"), _load(save)
        report["combo"] = {**mb, "max_abs_diff_vs_1gpu": _max_diff(a, b)}
        print(f"   rank 0 on {mb['devices']}; largest difference vs one GPU {_max_diff(a, b):.3g}", flush=True)


def _data_parallel(args, out, report):
    print(f"data parallel: {args.dp_model}, 3 conditions x {args.dp_pairs} pairs x all heads, null on", flush=True)
    runs = {}
    for n in args.procs:
        save = out / f"dp_{n}.npz"
        cmd = _torchrun(n) + _child(args, args.dp_model, args.dp_pairs, None, True, save)
        if _run(cmd, ",".join(str(i) for i in range(n)), out / f"dp_{n}.log") == 0:
            runs[n] = _load(save)
    if 1 in runs:
        base_s, base_m = runs[1]
        rows = []
        for n, (s, m) in sorted(runs.items()):
            rows.append({"procs": n, "sweep_seconds": m["sweep_seconds"],
                         "speedup": base_m["sweep_seconds"] / m["sweep_seconds"],
                         "max_abs_diff_vs_1": _max_diff(base_s, s), "gpu": m["gpu"]})
            print(f"   {n} GPU(s): {m['sweep_seconds']:.1f} s, speed-up {rows[-1]['speedup']:.2f}x, "
                  f"largest score difference vs 1 process {rows[-1]['max_abs_diff_vs_1']:.3g}", flush=True)
        report["data_parallel"] = rows


def _dp_equality(args, out, report):
    half = max(1, args.eq_pairs // 2)
    print(f"data-parallel equality: {args.eq_model} ({args.eq_dtype}), {args.eq_pairs} pairs in chunks of {half} "
          "x 3 conditions, null on, 1 and 2 processes", flush=True)
    runs = {}
    for n in (1, 2):
        save = out / f"dpeq_{n}.npz"
        cmd = _torchrun(n) + _child(args, args.eq_model, args.eq_pairs, None, True, save, args.eq_dtype, half)
        if _run(cmd, ",".join(str(i) for i in range(n)), out / f"dpeq_{n}.log") == 0:
            runs[n] = _load(save)[0]
    if len(runs) == 2:
        d = _max_diff(runs[1], runs[2])
        scale = max(float(np.abs(v).max()) for v in runs[1].values())
        report["dp_equality"] = {"model": args.eq_model, "dtype": args.eq_dtype, "pairs": args.eq_pairs,
                                 "chunk": half, "max_abs_diff": d, "max_abs_score": scale}
        print(f"   largest |score| {scale:.4g}; largest difference 2 vs 1 process {d:.3g}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    s = sub.add_parser("sweep", help="(internal) one process of a stage")
    s.add_argument("--model", required=True)
    s.add_argument("--pairs", type=int, default=8)
    s.add_argument("--device-map", default=None)
    s.add_argument("--null", action="store_true")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--save", required=True)
    s.add_argument("--dtype", default="bf16")
    ap.add_argument("--out", default="runs/multi_gpu")
    ap.add_argument("--stages", nargs="+", default=["equality", "dpeq", "dp", "big", "combo"],
                    choices=["equality", "dpeq", "dp", "big", "combo"])
    ap.add_argument("--eq-model", default="random:Qwen2.5-VL-7B")
    ap.add_argument("--eq-pairs", type=int, default=8)
    ap.add_argument("--eq-dtype", default="fp32", help="dtype of the equality and combined stages: in bf16 a "
                    "random model's scores are single rounding steps of its logits, so any change in how rows are "
                    "grouped shows; fp32 compares the placements themselves")
    ap.add_argument("--big-model", default="random:Qwen2.5-VL-32B")
    ap.add_argument("--big-pairs", type=int, default=4)
    ap.add_argument("--dp-model", default="random:Qwen2.5-VL-7B")
    ap.add_argument("--dp-pairs", type=int, default=64)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per chunk, the same in every run (the one-GPU "
                    "baseline included); data parallel splits chunks, so --dp-pairs / --batch-size should be a "
                    "multiple of the largest --procs (64 / 16 = 4)")
    args = ap.parse_args()
    if args.cmd == "sweep":
        sweep(args)
    else:
        main_driver(args)


if __name__ == "__main__":
    main()
