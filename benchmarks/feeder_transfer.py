"""Benchmark: what receiving a planting batch from a data worker costs the training process.

The training loop's process gets each batch from a worker (``data.Feeder``) and frees it after the step; that time
is spent beside the loop that launches the model's kernels (a thread of the same process unpickles the results).
This script lets ``--workers`` workers build ``--batches`` planting batches of the recipe in use (after the invariance
step: the largest batches) while the training process only waits, and reports that process's CPU time per batch
received and freed, with each batch crossing as one shared buffer (``transfer``, the default) and as one shared
tensor at a time (the baseline), in alternating rounds from one pool of workers, and the ratio.

    PYTHONPATH=src python benchmarks/feeder_transfer.py

On this project's 2-core AMD EPYC CPU machine (1 worker, 12 batches of 32 bases, 3 rounds, idle): 8.0 ms a batch
against 19.0 ms (2.4x; another run 9.2 against 20.7 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def receive(pool, one_buffer: bool, a, first: int) -> float:
    """The training process's CPU seconds per batch received and freed, ``one_buffer`` or one tensor at a time:
    ``a.batches`` batches from step ``first`` on, asked for at once; the clock runs while they arrive (this process's
    result thread unpickles them), are unpacked and are freed."""
    from vismech.organism import data, transfer

    t = time.process_time()  # the threads of this process only, not the workers'
    for task in [pool.apply_async(data._make, (first + i, one_buffer)) for i in range(a.batches)]:
        batch = task.get()
        batch = transfer.unpack(batch) if one_buffer else batch
        del batch
    return (time.process_time() - t) / a.batches


def _pool(a):
    """The data workers of a ``Feeder`` of the recipe in use (after the invariance step: the largest batches)."""
    import torch

    from vismech.organism import data
    from vismech.organism.config import END_TOKEN
    from vismech.organism.plant import PlantSpec

    w = dict(PlantSpec().weights, invariance_s=1.0, balance=1.0)
    spec = PlantSpec(weights=tuple(w.items()), full_scenes=0.3, drop_late_mlps=True, invariance_from=0, solo=0.5)
    return data.Feeder(a.arch, 0, a.batch_size, END_TOKEN[a.arch], workers=a.workers, pixel_dtype=torch.bfloat16,
                       label_mentions=True, plant=spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen2_5_vl")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    got: dict[str, list[float]] = {"one buffer": [], "one tensor at a time": []}
    with _pool(a) as feeder:  # one pool for both ways: the workers are the same
        [task.get() for task in [feeder.pool.apply_async(_warm_up, ()) for _ in range(a.workers)]]
        step = 10
        for r in range(a.rounds):
            for name in got:
                got[name].append(receive(feeder.pool, name == "one buffer", a, step))
                step += a.batches
            print(f"round {r + 1}/{a.rounds} done", flush=True)
    print(f"training process CPU per planting batch received and freed (batch {a.batch_size}, {a.workers} worker(s), "
          f"median of {a.rounds} rounds x {a.batches} batches; {os.cpu_count()} cores):")
    med = {name: statistics.median(s) for name, s in got.items()}
    for name, s in med.items():
        print(f"  {name:<22} {s * 1000:6.2f} ms")
    print(f"  ratio (one tensor at a time / one buffer): {med['one tensor at a time'] / med['one buffer']:.1f}x")
    return 0


def _warm_up() -> None:
    from vismech.organism import data

    data._make(1)  # a fresh worker's caches


if __name__ == "__main__":
    sys.exit(main())
