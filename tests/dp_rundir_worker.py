"""Worker for the data-parallel run-directory test: under torchrun, every rank-sensitive step of a run (directory
checks, the lock, the manifest, stored units, recomputing a damaged unit, refusing a second run) is taken ROUNDS
times into fresh directories by all processes at once, then activations are captured to memmaps three times; each
rank writes what it saw to OUT/rank{R}.json."""

import json
import os
import sys
from pathlib import Path

import numpy as np

from vismech import distributed
from vismech.app import runner
from vismech.errors import UserError
from vismech.experiments.common import Context
from vismech.store.io import write_json
from vismech.store.rundir import Ledger

ROUNDS = 12
distributed.init()
root, rank = Path(sys.argv[1]), distributed.rank()
seen = []
for i in range(ROUNDS):
    out = root / f"run{i}" / "nested"  # neither it nor its parent exists yet
    identity = {k: i for k in runner.IDENTITY}
    row = {}
    opened = runner._agree(runner._open_run, out, identity, False)
    row["opened"] = opened is not None
    old, lock, _ = opened if opened else (None, None, False)
    manifest = {**identity, "round": i}
    ledger = Ledger(out, manifest.setdefault("checksums", {}), lambda: write_json(manifest, out / "manifest.json"))
    ctx = Context(None, out, {}, ledger=ledger, show_progress=False)
    calls = []
    first = ctx.unit("u", lambda: calls.append(1) or {"round": i, "x": np.arange(4) * i})
    distributed.barrier()
    again = ctx.unit("u", lambda: calls.append(2) or {"round": -1, "x": np.zeros(4)})  # stored: loaded, not computed
    distributed.barrier()
    if distributed.is_main():  # damage the stored unit; every process must then compute it again
        p = out / "units" / "u.safetensors"
        p.write_bytes(p.read_bytes()[:20])
    distributed.barrier()
    third = ctx.unit("u", lambda: calls.append(3) or {"round": i, "x": np.arange(4) * i})
    row["values"] = [int(v["x"].sum()) for v in (first, again, third)]
    row["calls"] = calls
    try:  # a second run into the directory while this one holds its lock
        runner._agree(runner._open_run, out, identity, True)
        row["second"] = "accepted"
    except UserError as e:
        row["second"] = str(e)
    if lock is not None:
        lock.release()
    distributed.barrier()
    row["files"] = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    seen.append(row)
# activation memmaps: every process captures the same trials into its own files (never one file written twice)
from vismech import activations  # noqa: E402
from vismech.models.load import load_vlm  # noqa: E402
from vismech.scenes.sets import scene_description_set  # noqa: E402

ctx = Context(load_vlm("tiny:llava", device="cpu"), root / "acts", {"memmap_mb": 0}, show_progress=False)
sums = []
for rep in range(3):
    ctx.shared = {}
    acts = activations.for_context(ctx, scene_description_set(4, (2, 2), seed=rep))
    sums.append(float(np.asarray(acts.resid, dtype=np.float64).sum()))
    distributed.barrier()
files = sorted(p.relative_to(root / "acts").as_posix() for p in (root / "acts").rglob("*.npy"))
(root / f"rank{rank}.json").write_text(json.dumps({"world": distributed.world(), "rounds": seen, "sums": sums,
                                                   "memmaps": files}))
distributed.shutdown()
sys.stdout.flush()
os._exit(0)  # see dp_worker.py: gloo's threads may abort in the interpreter's teardown
