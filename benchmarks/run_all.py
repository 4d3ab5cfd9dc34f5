"""Benchmark: `vismech run all` on one model, timed per experiment, with each experiment's peak GPU memory.

Runs the CLI exactly as a user would (a fresh run directory, default trial counts unless ``--set``/``--n`` say
otherwise) and reads the run's manifest (``wall_seconds``, ``peak_gpu_gib``); prints a table, the total, and the
issue's targets (whole run <= ``--target-total`` s, no experiment over ``--target-each`` s).

    python benchmarks/run_all.py --model random:Qwen2.5-VL-7B --dtype bf16 --out $OUT/run_all_qwen7b   # GPU
    python benchmarks/run_all.py --model tiny:qwen2_5_vl --device cpu --n 2 --out /tmp/ra  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:Qwen2.5-VL-7B")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", required=True, help="run directory (must not exist: the run starts fresh)")
    ap.add_argument("--experiments", nargs="+", default=["all"])
    ap.add_argument("--n", default=None, help="trials per experiment (default: each experiment's own)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--batch-size", default=None)
    ap.add_argument("--target-total", type=float, default=180.0)
    ap.add_argument("--target-each", type=float, default=45.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; give a fresh --out (the benchmark times a run from scratch)", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "vismech", "run", *args.experiments, "--model", args.model, "--dtype", args.dtype,
           "--out", str(out)]
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--n", args.n] if args.n else []
    cmd += ["--batch-size", args.batch_size] if args.batch_size else []
    for kv in args.set:
        cmd += ["--set", kv]
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env=os.environ.copy())
    wall = time.perf_counter() - t0
    mpath = out / "manifest.json"
    if not mpath.exists():
        print(f"error: the run wrote no manifest (exit status {rc})", file=sys.stderr)
        return 1
    manifest = json.loads(mpath.read_text())
    secs, peaks = manifest.get("wall_seconds", {}), manifest.get("peak_gpu_gib", {})
    print(f"\n{'experiment':<20}{'seconds':>10}{'peak GPU GiB':>14}")
    for name, t in sorted(secs.items(), key=lambda kv: -kv[1]):
        peak = peaks.get(name)
        print(f"{name:<20}{t:>10.1f}{'-' if peak is None else f'{peak:.1f}':>14}")
    total = sum(secs.values())
    worst = max(secs.items(), key=lambda kv: kv[1]) if secs else ("-", 0.0)
    print(f"{'total (experiments)':<20}{total:>10.1f}\n{'wall (with loading)':<20}{wall:>10.1f}")
    ok_total, ok_each = total <= args.target_total, worst[1] <= args.target_each
    print(f"targets: total <= {args.target_total:g} s: {'met' if ok_total else 'missed'}; no experiment over "
          f"{args.target_each:g} s: {'met' if ok_each else f'missed ({worst[0]} {worst[1]:.1f} s)'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "dtype": args.dtype, "device": manifest.get(
            "device"), "wall_seconds": secs, "peak_gpu_gib": peaks, "total_s": total, "wall_s": wall,
            "exit_status": rc}, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
