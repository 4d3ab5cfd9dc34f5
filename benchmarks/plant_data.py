"""Benchmark: one data worker building planting batches, per batch, before and after the invariance step.

Times what each ``data.Feeder`` worker runs (``data._init_worker``, then ``data._make`` for each step) in one
process, for the planting recipe in use (``--plant ids --plant-full-scenes 0.3 --plant-drop-late-mlps --plant-weight
invariance_s=1 --plant-invariance-from 2000 --plant-weight balance=1 --plant-solo 0.5``, bf16 pixels, mentions
labelled), at steps before ``invariance_from`` and after it (the later batches hold the solo rows, the invariance
sources and the balance fields). With ``--against REV`` the source tree of git revision REV is timed too: each tree
runs in its own subprocess, in alternating rounds (a load that comes and goes falls on both), and the report gives
each tree's median per batch, the ratio, and whether the two trees built equal batches (a digest of every tensor).

    PYTHONPATH=src python benchmarks/plant_data.py --against 436486a

On this project's 2-core AMD EPYC CPU machine, idle: 436486a 822 ms a batch before the invariance step and 959 ms
after it; the table look-up, packed frames, shared tokenizations and distinct M-RoPE rows 270 and 321 ms (3.0x),
the batches equal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def digest(batch: dict) -> str:
    """sha256 of a batch: its keys in order, every tensor's dtype, shape and bytes, every other value's repr."""
    import torch

    h = hashlib.sha256()
    for k, v in batch.items():
        h.update(k.encode())
        if torch.is_tensor(v):
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            h.update(v.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()


def child(a) -> dict:
    """Per-batch seconds of each regime (and the batches' digests), as one worker builds them."""
    import torch

    from vismech.organism import data
    from vismech.organism.config import END_TOKEN
    from vismech.organism.plant import PlantSpec

    w = dict(PlantSpec().weights)
    w.update(invariance_s=1.0, balance=1.0)
    spec = PlantSpec(weights=tuple(w.items()), full_scenes=0.3, drop_late_mlps=True,
                     invariance_from=a.invariance_from, solo=0.5)
    dtype = torch.bfloat16 if a.pixel_dtype == "bf16" else None
    data._init_worker(a.arch, None, a.seed, a.batch_size, END_TOKEN[a.arch], dtype, data.MIXTURE, True, None, spec)
    data._make(0)  # untimed: the caches of a fresh worker
    out = {"seconds": {}, "digests": {}}
    for regime, first in (("before", a.invariance_from // 2), ("after", a.invariance_from + 10)):
        out["seconds"][regime], out["digests"][regime] = [], []
        for step in range(first, first + a.batches):
            t = time.perf_counter()
            batch = data._make(step)
            out["seconds"][regime].append(time.perf_counter() - t)
            if isinstance(batch, tuple):  # a worker's batch as one shared buffer (``transfer.pack``, from 2026-12-02)
                from vismech.organism.transfer import unpack

                batch = unpack(batch)
            out["digests"][regime].append(digest(batch))
    return out


def _run(tree: Path, a) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    args = [sys.executable, __file__, "--child", "--arch", a.arch, "--batch-size", str(a.batch_size), "--batches",
            str(a.batches), "--seed", str(a.seed), "--invariance-from", str(a.invariance_from), "--pixel-dtype",
            a.pixel_dtype]
    p = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.splitlines()[-1])


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen2_5_vl")
    ap.add_argument("--batch-size", type=int, default=32, help="base trials per batch (the recipe's 32)")
    ap.add_argument("--batches", type=int, default=4, help="batches per regime per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--invariance-from", type=int, default=2000)
    ap.add_argument("--pixel-dtype", choices=("bf16", "fp32"), default="bf16", help="bf16 as on a GPU")
    ap.add_argument("--against", default=None, metavar="REV", help="also time the source tree of this git revision")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a)))
        return 0
    print(f"{_machine()}; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    trees = {"this tree": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if a.against:
            archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.against, "src"], capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            trees = {a.against: Path(tmp), **trees}
        runs: dict[str, list[dict]] = {name: [] for name in trees}
        for r in range(a.rounds):
            for name, tree in trees.items():
                runs[name].append(_run(tree, a))
            print(f"round {r + 1}/{a.rounds} done", flush=True)
    res = {"machine": _machine(), "batch_size": a.batch_size, "pixel_dtype": a.pixel_dtype, "trees": {}}
    for name, got in runs.items():
        res["trees"][name] = {regime: statistics.median(s for g in got for s in g["seconds"][regime])
                              for regime in ("before", "after")}
    print(f"\nper batch, one worker, batch {a.batch_size} ({a.pixel_dtype} pixels), median of {a.rounds} rounds x "
          f"{a.batches} batches; load average at end {os.getloadavg()[0]:.2f}")
    for name, t in res["trees"].items():
        print(f"  {name:<12} before step {a.invariance_from}: {t['before'] * 1000:6.0f} ms   after: "
              f"{t['after'] * 1000:6.0f} ms")
    if a.against:
        old, new = res["trees"][a.against], res["trees"]["this tree"]
        res["ratio"] = {k: old[k] / new[k] for k in old}
        res["equal"] = runs[a.against][0]["digests"] == runs["this tree"][0]["digests"]
        print(f"  ratio ({a.against} / this tree): before {res['ratio']['before']:.2f}x, after "
              f"{res['ratio']['after']:.2f}x; batches equal: {res['equal']}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
