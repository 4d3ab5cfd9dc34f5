"""Benchmark: what receiving a planting batch from a data worker costs the training process.

The training loop's process gets each batch from a worker (``data.Feeder``) and frees it after the step; that time
is spent beside the loop that launches the model's kernels (a thread of the same process unpickles the results).
This script lets ``--workers`` workers build ``--batches`` planting batches of the recipe in use (after the invariance
step: the largest batches) while the training process only waits, and reports that process's CPU time per batch
received and freed, with each batch crossing as one shared buffer (``transfer``, the default) and as one shared
tensor at a time (the baseline), in alternating rounds in one process, and the ratio.

    PYTHONPATH=src python benchmarks/feeder_transfer.py

On this project's 2-core AMD EPYC CPU machine (1 worker, 12 batches of 32 bases, 3 rounds, idle): 10.5 ms a batch
against 22.4 ms (2.1x; another run 11.0 against 25.7 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def receive(one_buffer: bool, a) -> float:
    """The training process's CPU seconds per batch received and freed, ``one_buffer`` or one tensor at a time."""
    import torch

    from vismech.organism import data
    from vismech.organism.config import END_TOKEN
    from vismech.organism.plant import PlantSpec

    w = dict(PlantSpec().weights, invariance_s=1.0, balance=1.0)
    spec = PlantSpec(weights=tuple(w.items()), full_scenes=0.3, drop_late_mlps=True, invariance_from=0, solo=0.5)
    with data.Feeder(a.arch, 0, a.batch_size, END_TOKEN[a.arch], start=10, workers=a.workers, prefetch=a.batches,
                     pixel_dtype=torch.bfloat16, label_mentions=True, plant=spec, one_buffer=one_buffer) as feeder:
        next(feeder)  # untimed: the workers start, and the queue fills
        _wait(feeder)
        t = time.process_time()  # the threads of this process only, not the workers'
        for _ in range(a.batches):  # each call asks for one more batch
            batch = next(feeder)
            del batch
        _wait(feeder)  # those batches arrive: this process's result thread unpickles them
        return (time.process_time() - t) / a.batches


def _wait(feeder) -> None:
    while not all(p.ready() for p in feeder.pending):
        time.sleep(0.05)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen2_5_vl")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    got: dict[str, list[float]] = {"one buffer": [], "one tensor at a time": []}
    for r in range(a.rounds):
        for name in got:
            got[name].append(receive(name == "one buffer", a))
        print(f"round {r + 1}/{a.rounds} done", flush=True)
    print(f"training process CPU per planting batch received and freed (batch {a.batch_size}, {a.workers} worker(s), "
          f"median of {a.rounds} rounds x {a.batches} batches; {os.cpu_count()} cores):")
    med = {name: statistics.median(s) for name, s in got.items()}
    for name, s in med.items():
        print(f"  {name:<22} {s * 1000:6.2f} ms")
    print(f"  ratio (one tensor at a time / one buffer): {med['one tensor at a time'] / med['one buffer']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
