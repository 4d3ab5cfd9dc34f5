"""How much the planted heads' outputs and keys change with features they should not carry: the invariance and
guard terms of planting (``vismech.organism.invariance``) measured on trained organisms, over 4 planting batches of 16
bases (seed 123, the training mixture of each organism's own spec). ``invariance``: ID retrieval outputs at a
mention when that described object's features change; ``invariance_s``: gathering and selection outputs at the last
token when a described object's or the target's features change; ``invariance_k``: selection and feature heads'
keys at the target's image tokens when its features change (0: unchanged; 1: as different as unrelated vectors);
``guard``: the share of the mentioned objects' colours and shapes that a linear fit on the batch's ID-retrieval
outputs explains (R^2, 0: none).

    PYTHONPATH=src python docs/organism-ids/invariance_gaps.py MODEL [MODEL ...]
"""
import dataclasses
import sys

import torch

from vismech.models.load import load_vlm
from vismech.organism import invariance, plant, validate
from vismech.organism import plant_batch as pb

TERMS = ("invariance", "invariance_s", "invariance_k", "guard")
for m in sys.argv[1:]:
    vlm = load_vlm(m, dtype="fp32", device="cpu")
    own = validate.spec_of(vlm)
    spec = dataclasses.replace(own, weights=own.weights + tuple((t, 1.0) for t in TERMS), invariance_from=0)
    vals = {t: [] for t in TERMS}
    for step in range(4):
        b = pb.batch_of(vlm, spec, pb.step_plan(spec, 123, step, 16), validate.END.get(vlm.family.name, "<|im_end|>"))
        with torch.no_grad():
            _, z, _, _ = plant.clean_forward(vlm, spec, b)
            got = invariance.terms(spec, b, z, vlm.n_heads // vlm.n_kv_heads)
        for t in TERMS:
            vals[t].append(float(got[t]))
    print(f"{m}: " + ", ".join(f"{t} {sum(v) / len(v):.3f} (batches {min(v):.3f}-{max(v):.3f})"
                               for t, v in vals.items()))
