"""Where the relative-looking geometry of ``rsa-relative`` enters: its RSA (cosine model RSM against the absolute and
relative position RSMs of the target, ``analysis.rsa``) on the last token's residual stream of every layer and on the
outputs of each declared stage's heads there, on the relabs scenes; and the test's verdict on synthetic codes
(one-hot absolute, one-hot relative), to show it can call a pure code of either kind by its name.

    PYTHONPATH=src python docs/organism-ids/relabs/rsa_heads.py [MODEL] [K]

Runs on the CPU (``relabs_set(k=K)``: 64 K trials; K = 2 is ``rsa-relative``'s default).
"""
import sys

import numpy as np
import torch

from vismech.analysis.rsa import cosine_rsm, position_rsm, rsa_score
from vismech.engine import hooks
from vismech.models.load import load_vlm
from vismech.scenes.sets import relabs_set


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else "organism-ids"
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    trials = relabs_set(k=k, seed=0)
    targets = {w: position_rsm([t.meta[f"{w}_cell"] for t in trials]) for w in ("absolute", "relative")}

    def score(x):
        m = cosine_rsm(np.asarray(x, dtype=np.float64))
        return "  ".join(f"{w} {rsa_score(m, t):+.2f}" for w, t in targets.items())

    rng = np.random.default_rng(0)
    for name, key, size in (("one-hot absolute code", "absolute_cell", 3), ("one-hot relative code", "relative_cell", 2)):
        e = rng.standard_normal((size * size, 64))
        print(f"synthetic {name}: {score(np.stack([e[t.meta[key][0] * size + t.meta[key][1]] for t in trials]))}")
    vlm = load_vlm(model, device="cpu")
    L = vlm.n_layers
    resid, z = {l: [] for l in range(L)}, {l: [] for l in range(L)}
    for s in range(0, len(trials), 32):
        b = vlm.encode(trials[s:s + 32])
        pos = torch.tensor([[b.last]] * len(b))
        sites = [("resid", l) for l in range(L)] + [("z", l) for l in range(L)]
        with torch.no_grad(), hooks.capture(vlm, sites, positions=pos, to_cpu=True) as got:
            vlm.logits(b)
        for l in range(L):
            resid[l].append(got[("resid", l)].reshape(len(b), -1).float())
            z[l].append(got[("z", l)].reshape(len(b), vlm.n_heads, -1).float())
    print(f"{model}, {len(trials)} relabs trials, last token:")
    for l in range(L):
        print(f"  layer {l} residual stream: {score(torch.cat(resid[l]))}")
    gt = vlm.ground_truth
    parts = {**gt.stages["id_selection"].parts, "feature retrieval": gt.stages["feature_retrieval"].heads}
    for name, heads in parts.items():
        x = torch.cat([torch.cat(z[l])[:, h] for l, h in heads], 1)
        print(f"  {name} heads {[list(h) for h in heads]}, outputs: {score(x)}")


if __name__ == "__main__":
    main()
