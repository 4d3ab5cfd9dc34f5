"""How CMA's recall of the planted heads depends on the number of pairs and on the seed, and what the pooled null
costs it. Reads recovery runs made by

    for n in 10 20 30 50 80; do for s in 0 1 2; do
      vismech run recovery --model organism-ids --device cpu --seed $s --set cma_n=$n --set rsa_n=16 --out DIR/$n-$s
    done; done
    PYTHONPATH=src python docs/organism-ids/cma_power.py DIR

For each run and stage: precision and recall as `recovery` reports them (the pooled re-paired null, BH q = 0.05);
then, from the same stored scores, `cma`'s option test="paired" (``analysis.cma.paired_significance``: each head's
per-pair score minus its own re-paired control score, mean > 0 by sign flips, BH q = 0.05, and a mean score above the
pooled null's 0.95 quantile), and the same test without that floor; and, per run, the heads whose control patches have
the largest mean score (what fills the pooled null's tail).
"""
import glob
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from vismech.analysis.cma import head_significance, null_mean_scores, paired_significance

STAGES = ("id_retrieval", "id_selection", "feature_retrieval")


def heads(mask):
    return {(int(a), int(b)) for a, b in zip(*np.nonzero(mask))}


def pr(found, declared):
    hit = found & declared
    return (f"{len(hit) / len(found):.2f}" if found else "n/a") + f" / {len(hit) / len(declared):.2f}"


root = Path(sys.argv[1])
print("run (pairs-seed): per stage, precision / recall with the pooled null | the paired test | the paired test "
      "without its floor")
runs = [p for p in root.iterdir() if (p / "results" / "recovery.json").exists()]
for run in sorted(runs, key=lambda p: tuple(int(x) for x in p.name.split("-"))):
    summary = json.loads((run / "results" / "recovery.json").read_text())
    seed = int(run.name.split("-")[1])
    parts, tails = [], []
    for c in STAGES:
        declared = {tuple(h) for h in summary["cma"][c]["declared"]}
        found = {tuple(h) for h in summary["cma"][c]["found"]}
        unit = load_file(glob.glob(str(run / "units" / f"cma-{c}-*.safetensors"))[0])
        s, nl = unit["t0"], unit["t1"]
        floor = head_significance(s, null_mean_scores(nl, 2000, seed), q=0.05)["threshold"]
        with_floor = heads(paired_significance(s, nl, 0.05, floor=floor, seed=seed)["mask"])
        without = heads(paired_significance(s, nl, 0.05, seed=seed)["mask"])
        parts.append(f"{c} {pr(found, declared)} | {pr(with_floor, declared)} | {pr(without, declared)}")
        m = nl.mean(-1)
        top = np.dstack(np.unravel_index(np.argsort(-m.ravel())[:2], m.shape))[0]
        tails.append(f"{c}: " + ", ".join(f"L{a}H{b} {m[a, b]:.1f}" for a, b in top))
    print(f"{run.name}: " + "; ".join(parts))
    print("    largest control-patch means: " + "; ".join(tails))
