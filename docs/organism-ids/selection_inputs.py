"""What the selection heads' queries can read: is the target's cell linearly decodable where they look from?

    PYTHONPATH=src python docs/organism-ids/selection_inputs.py [MODEL] [TRIALS]

Random-vocabulary scene descriptions with every object but one described (2x2 with 4 objects, 3x3 with 4 and 9).
At the last token, 5-fold logistic-regression probes (``analysis.pca.probe_accuracy``) for the undescribed
(target) object's cell from: the residual stream entering the selection layer (what its query projection reads,
up to the norm's scale), the gathering heads' outputs, the selection heads' outputs, and, for reference, the sum
of the ID-retrieval heads' outputs over the mentions (what an ideal gathering would hand on), and that sum with
each output first reduced to its cell code (projected on the span of the per-cell mean outputs, fitted on every
mention of the set: what feature-free R outputs would give). CPU.
"""
import sys

import numpy as np
import torch

from vismech.analysis.pca import chance_accuracy, probe_accuracy
from vismech.engine import hooks
from vismech.models.load import load_vlm
from vismech.organism import validate
from vismech.scenes.sets import scene_description_set


def cell_code_sums(mentions) -> torch.Tensor:
    """Per trial, the sum over its mentions of each R output projected on the span of the per-cell mean outputs
    (centred): the part of the outputs that codes the cell."""
    x = torch.stack([v for ms in mentions for v, _ in ms]).double()
    c = torch.tensor([cell for ms in mentions for _, cell in ms])
    means = torch.stack([x[c == k].mean(0) for k in c.unique()])
    basis = torch.linalg.svd(means - means.mean(0), full_matrices=False)[2]  # [cells, d], rows orthonormal
    basis = basis[: len(means) - 1]
    return torch.stack([sum(basis.T @ (basis @ v.double()) for v, _ in ms) for ms in mentions]).float()


def main(model="organism-ids", n=256):
    vlm = load_vlm(model, dtype="fp32", device="cpu")
    spec = validate.spec_of(vlm)
    s_layer, g_layer = spec.selection[0][0], spec.gathering[0][0]
    g_heads = [h for l, h in spec.gathering if l == g_layer]
    s_heads = [h for l, h in spec.selection if l == s_layer]
    r_layer = spec.retrieval[0][0]
    r_heads = [h for l, h in spec.retrieval if l == r_layer]
    print("| scene | residual into the selection layer | gathering heads' outputs | selection heads' outputs | "
          "sum of the ID-retrieval outputs over the mentions | the same, cell code only | chance |")
    print("|---|---|---|---|---|---|---|")
    for grid, objects in (((2, 2), 4), ((3, 3), 4), ((3, 3), 9)):
        trials = scene_description_set(n, grid, n_objects=objects, seed=7)
        feats = {"resid": [], "gather": [], "select": [], "r_sum": []}
        cells, mentions = [], []  # per trial: (R output, cell index) of each mention
        for s in range(0, n, 16):
            chunk = trials[s:s + 16]
            b = vlm.encode(chunk)
            pos = torch.tensor([[b.last]] * len(chunk))
            sites = [("resid", s_layer - 1), ("z", g_layer), ("z", s_layer)]
            with torch.no_grad(), hooks.capture(vlm, sites, positions=pos) as got, \
                    hooks.capture(vlm, [("z", r_layer)], heads=torch.tensor(r_heads)) as whole:
                vlm.logits(b)
            rz = whole[("z", r_layer)]  # [B, T, R heads, dh]
            feats["r_sum"].append(torch.stack([sum(rz[j, m[-1]] for m in b.mentions[j]).flatten()
                                               for j in range(len(chunk))]))
            mentions += [[(rz[j, m[-1]].flatten(), o.cell[0] * grid[1] + o.cell[1])
                          for m, o in zip(b.mentions[j], t.mentioned)] for j, t in enumerate(chunk)]
            feats["resid"].append(got[("resid", s_layer - 1)][:, 0, 0])
            feats["gather"].append(got[("z", g_layer)][:, 0, g_heads].flatten(1))
            feats["select"].append(got[("z", s_layer)][:, 0, s_heads].flatten(1))
            cells += [t.target.cell[0] * grid[1] + t.target.cell[1] for t in chunk]
        y = np.array(cells)
        feats["r_cell_sum"] = [cell_code_sums(mentions)]
        acc = {k: probe_accuracy(torch.cat(v).numpy().astype(np.float64), y) for k, v in feats.items()}
        print(f"| {grid[0]}x{grid[1]}, {objects} objects | "
              + " | ".join(f"{m:.2f} +/- {se:.2f}" for m, se in acc.values()) + f" | {chance_accuracy(y):.2f} |")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["organism-ids"]), *(int(a) for a in sys.argv[2:3]))
