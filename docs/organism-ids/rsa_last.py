"""Where the last token's position RSA is lost: the recovery experiment's RSA of the target's cell (3x3
random-vocabulary scenes, 5 objects, all but one described, 192 trials, the same draw) on the residual stream after
each layer and on the outputs (site ``z``) of the declared gathering, selection and feature heads at the last token,
each alone; and for the selection heads, against the target's row alone and its column alone (the same RSM with the
other coordinate set to 0).

    PYTHONPATH=src python docs/organism-ids/rsa_last.py [MODEL ...]
"""
import sys

import numpy as np
import torch

from vismech.engine import activations
from vismech.experiments.recovery import rsa_trials
from vismech.experiments.rsa import object_targets, position_rsm, rsa_by_layer
from vismech.models.load import load_vlm

for model in sys.argv[1:] or ["organism-ids"]:
    vlm = load_vlm(model, dtype="fp32", device="cpu")
    gt = vlm.ground_truth
    trials = rsa_trials((3, 3), 5, 192, 0)  # recovery's defaults (seed 0)
    resid, z = [], []
    for s in range(0, len(trials), 32):
        b = vlm.encode(trials[s:s + 32])
        r, zz, _ = activations.forward_positions(vlm, b, torch.tensor([[b.last]] * len(b.texts)), with_z=True)
        resid.append(r[:, 0])  # [B, L, d]
        z.append(zz[:, 0])  # [B, L, H, dh]
    resid, z = torch.cat(resid).numpy(), torch.cat(z).numpy()
    target = {"position": object_targets([t.target for t in trials])["position"]}
    curve = rsa_by_layer(resid.transpose(1, 0, 2), target, 200, 0)["position"]
    print(f"{model}: target-cell RSA at the last token, {len(trials)} trials (bootstrap 95%)")
    for layer in range(vlm.n_layers):
        print(f"  residual stream after layer {layer}: {curve['r'][layer]:+.2f} "
              f"[{curve['lo'][layer]:+.2f}, {curve['hi'][layer]:+.2f}]")
    parts = gt.stages["id_selection"].parts
    groups = {"gathering": parts.get("gathering"), "selection": parts.get("selection"),
              "feature retrieval": gt.stages["feature_retrieval"].heads}
    for name, heads in groups.items():
        if not heads:
            continue
        x = np.concatenate([z[:, layer, head] for layer, head in heads], -1)[None]
        c = rsa_by_layer(x, target, 200, 0)["position"]
        print(f"  {name} heads {[list(h) for h in heads]}, outputs: {c['r'][0]:+.2f} [{c['lo'][0]:+.2f}, "
              f"{c['hi'][0]:+.2f}]")
        if name == "selection":
            cells = [t.target.cell for t in trials]
            for what, coords in (("row", [(r, 0) for r, _ in cells]), ("column", [(0, c) for _, c in cells])):
                c = rsa_by_layer(x, {"position": position_rsm(coords)}, 200, 0)["position"]
                print(f"    against the target's {what} alone: {c['r'][0]:+.2f} [{c['lo'][0]:+.2f}, "
                      f"{c['hi'][0]:+.2f}]")
