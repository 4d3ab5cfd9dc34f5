"""How large the row and the column are in the planted position code, stage by stage: for each object of random 3x3
scene descriptions (4-6 objects, every object but one described; 96 trials), the residual stream after every layer
at its image tokens (mean over them), and the ID-retrieval heads' outputs at its mention; then the variance of the
class means by row and by column (the between-row and between-column variance, summed over dimensions) as a share
of the total variance. A code that treats rows and columns alike has equal shares; attention that matches codes by
dot product tells apart what the larger share separates.

    PYTHONPATH=src python docs/organism-ids/row_column.py [MODEL ...]
"""
import sys

import numpy as np
import torch

from vismech.engine import activations
from vismech.models.load import load_vlm
from vismech.scenes.sets import scene_description_set


def shares(x: np.ndarray, cells: list) -> tuple[float, float]:
    """Between-row and between-column variance of ``x`` [n, d] over its total variance."""
    x = x - x.mean(0)
    total = (x ** 2).sum() / len(x)
    out = []
    for k in (0, 1):
        lab = np.array([c[k] for c in cells])
        means = {v: x[lab == v].mean(0) for v in set(lab)}
        out.append(sum((lab == v).sum() * (m ** 2).sum() for v, m in means.items()) / len(x) / total)
    return out[0], out[1]


for model in sys.argv[1:] or ["organism-ids"]:
    vlm = load_vlm(model, dtype="fp32", device="cpu")
    gt = vlm.ground_truth
    trials = [t for k in (4, 5, 6) for t in scene_description_set(32, (3, 3), n_objects=k, seed=5 + k, entropy=None)]
    heads = gt.stages["id_retrieval"].heads
    img = {layer: [] for layer in range(vlm.n_layers)}
    r_out, img_cells, r_cells = [], [], []
    for t in trials:
        one = vlm.encode([t])  # one trial a forward: no padding to account for
        cells = sorted(one.objects[0])
        toks = [one.objects[0][c] for c in cells]
        mentions = [m[-1] for m in one.mentions[0]]
        pos = torch.tensor([[x for ts in toks for x in ts] + mentions])
        resid, z, _ = activations.forward_positions(vlm, one, pos, with_z=True)
        at = 0
        for c, ts in zip(cells, toks):  # the mean over an object's image tokens
            for layer in range(vlm.n_layers):
                img[layer].append(resid[0, at:at + len(ts), layer].mean(0).numpy())
            img_cells.append(c)
            at += len(ts)
        r_out += [np.concatenate([z[0, at + j, layer, head].numpy() for layer, head in heads])
                  for j in range(len(mentions))]
        r_cells += [o.cell for o in t.mentioned]
    print(f"{model}: between-row / between-column share of the variance ({len(img_cells)} objects, "
          f"{len(r_cells)} mentions)")
    for layer in range(vlm.n_layers):
        a, c = shares(np.stack(img[layer]), img_cells)
        print(f"  image tokens, residual stream after layer {layer}: rows {a:.3f}, columns {c:.3f}")
    a, c = shares(np.stack(r_out), r_cells)
    print(f"  ID-retrieval heads' outputs at the mentions: rows {a:.3f}, columns {c:.3f}")
