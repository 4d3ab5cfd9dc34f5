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
from vismech.organism.position_probe import row_column_shares
from vismech.scenes.sets import scene_description_set


def object_tokens(vlm, trial, mentions: bool = False):
    """One forward of ``trial`` alone (no padding) read at its objects' image tokens (and with ``mentions`` then at
    the mentions' last words): the cells of its objects (sorted), the residual stream after every layer there
    [positions, layers, hidden], the head outputs there with ``mentions`` [positions, layers, heads, head_dim] (else
    None), and the bounds of each object's tokens."""
    one = vlm.encode([trial])
    cells = sorted(one.objects[0])
    toks = [one.objects[0][c] for c in cells]
    extra = [m[-1] for m in one.mentions[0]] if mentions else []
    pos = torch.tensor([[x for ts in toks for x in ts] + extra])
    resid, z, _ = activations.forward_positions(vlm, one, pos, with_z=mentions)
    return cells, resid[0], None if z is None else z[0], np.cumsum([0] + [len(ts) for ts in toks])


def per_object(x, bounds) -> np.ndarray:
    """The mean of ``x`` [tokens, ...] over each object's tokens."""
    return torch.stack([x[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])]).numpy()


def object_codes(vlm, trial):
    """The cells of ``trial``'s objects, each object's mean residual stream over its image tokens after every layer
    [objects, layers, hidden], and the head outputs at the mentions' last words [mentions, layers, heads,
    head_dim]."""
    cells, resid, z, bounds = object_tokens(vlm, trial, mentions=True)
    return cells, per_object(resid, bounds), z[bounds[-1]:].numpy()


def shares(x: np.ndarray, cells: list) -> tuple[float, float]:
    """Between-row and between-column variance of ``x`` [n, d] over its total variance."""
    rows, cols = row_column_shares(torch.from_numpy(np.asarray(x, dtype=np.float64)), torch.tensor(cells))
    return float(rows), float(cols)


def main(models):
    for model in models:
        vlm = load_vlm(model, dtype="fp32", device="cpu")
        heads = vlm.ground_truth.stages["id_retrieval"].heads
        trials = [t for k in (4, 5, 6) for t in scene_description_set(32, (3, 3), n_objects=k, seed=5 + k,
                                                                       entropy=None)]
        img, r_out, img_cells, r_cells = [], [], [], []
        for t in trials:
            cells, means, z = object_codes(vlm, t)
            img.append(means)
            img_cells += cells
            r_out += [np.concatenate([zj[layer, head] for layer, head in heads]) for zj in z]
            r_cells += [o.cell for o in t.mentioned]
        img = np.concatenate(img)  # [objects, layers, hidden]
        print(f"{model}: between-row / between-column share of the variance ({len(img_cells)} objects, "
              f"{len(r_cells)} mentions)")
        for layer in range(vlm.n_layers):
            a, c = shares(img[:, layer], img_cells)
            print(f"  image tokens, residual stream after layer {layer}: rows {a:.3f}, columns {c:.3f}")
        a, c = shares(np.stack(r_out), r_cells)
        print(f"  ID-retrieval heads' outputs at the mentions: rows {a:.3f}, columns {c:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["organism-ids"])
