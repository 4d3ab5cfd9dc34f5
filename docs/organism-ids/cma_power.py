"""How CMA's recall of the planted heads depends on the number of pairs and on the seed, and what the pooled null
costs it. Reads recovery runs made by

    for n in 10 20 30 50 80; do for s in 0 1 2; do
      vismech run recovery --model organism-ids --device cpu --seed $s --set cma_n=$n --set rsa_n=16 --out DIR/$n-$s
    done; done
    PYTHONPATH=src python docs/organism-ids/cma_power.py DIR

For each run and stage: precision and recall as `recovery` reports them (the pooled re-paired null, BH q = 0.05);
then, from the same stored scores, a per-head paired test (each head's per-pair score minus its own re-paired
control score, mean > 0 by a sign-flip test of 2,000 patterns, BH q = 0.05), which measures a head against its own
control patch instead of every head's; and, per run, the heads whose control patches have the largest mean score
(what fills the pooled null's tail).
"""
import glob
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from vismech.analysis.stats import benjamini_hochberg

STAGES = ("id_retrieval", "id_selection", "feature_retrieval")


def paired(s, nl, seed):
    d = s - nl
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(2000, d.shape[-1]))
    flipped = np.einsum("pn,lhn->plh", signs, d) / d.shape[-1]
    p = ((flipped >= d.mean(-1) - 1e-12).sum(0) + 1) / (len(signs) + 1)
    return benjamini_hochberg(p, 0.05)[0]


def pr(found, declared):
    hit = found & declared
    return (f"{len(hit) / len(found):.2f}" if found else "n/a") + f" / {len(hit) / len(declared):.2f}"


root = Path(sys.argv[1])
print("run (pairs-seed): per stage, precision / recall with the pooled null | with the paired test")
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
        paired_found = {(int(a), int(b)) for a, b in zip(*np.nonzero(paired(s, nl, seed)))}
        parts.append(f"{c} {pr(found, declared)} | {pr(paired_found, declared)}")
        m = nl.mean(-1)
        top = np.dstack(np.unravel_index(np.argsort(-m.ravel())[:2], m.shape))[0]
        tails.append(f"{c}: " + ", ".join(f"L{a}H{b} {m[a, b]:.1f}" for a, b in top))
    print(f"{run.name}: " + "; ".join(parts))
    print("    largest control-patch means: " + "; ".join(tails))
