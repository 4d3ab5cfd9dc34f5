"""Where the ID-retrieval heads' outputs become mostly rows: for each object of row_column.py's trials (random 3x3
descriptions of 4-6 objects, 96 trials), the residual stream entering the retrieval layer at its image tokens and
what the retrieval heads' value path makes of it there (input norm, value projection of each head's key/value head,
that head's slice of the output projection; summed over the heads, averaged over the object's tokens), each as
between-row and between-column shares of the variance. The heads' outputs at a mention are this value path averaged
by their attention, so a value path that keeps the row and drops the column gives row-dominated IDs whatever the
image tokens carry. Then the same shares for the keys (before rotary positions) that the selection and feature
heads match there: the key/value head each pair shares, at its layer.

    PYTHONPATH=src python docs/organism-ids/value_path.py [MODEL ...]
"""
import sys

import numpy as np
import torch

from vismech.models.load import load_vlm
from vismech.organism.invariance import key_heads
from vismech.organism.validate import spec_of
from vismech.scenes.sets import scene_description_set

from row_column import object_tokens, per_object, shares


@torch.no_grad()
def main(models):
    for model in models:
        vlm = load_vlm(model, dtype="fp32", device="cpu")
        heads = vlm.ground_truth.stages["id_retrieval"].heads
        layer = heads[0][0]
        att, norm = vlm.attention(layer), vlm.layers[layer].input_layernorm
        dh, group = vlm.head_dim, vlm.n_heads // vlm.n_kv_heads
        trials = [t for k in (4, 5, 6) for t in scene_description_set(32, (3, 3), n_objects=k, seed=5 + k,
                                                                       entropy=None)]
        inputs, values, cells, keys = [], [], [], {kh: [] for kh in key_heads(spec_of(vlm), group)}
        for t in trials:
            got, resid, _, bounds = object_tokens(vlm, t)
            x = resid[:, layer - 1]  # the residual stream entering the retrieval layer
            v = att.v_proj(norm(x))
            out = sum(v[:, (h // group) * dh:(h // group + 1) * dh] @ att.o_proj.weight[:, h * dh:(h + 1) * dh].T
                      for _, h in heads)
            inputs += list(per_object(x, bounds))
            values += list(per_object(out, bounds))
            cells += got
            for a, kv in keys:
                k = vlm.attention(a).k_proj(vlm.layers[a].input_layernorm(resid[:, a - 1]))
                keys[(a, kv)] += list(per_object(k[:, kv * dh:(kv + 1) * dh], bounds))
        print(f"{model}: between-row / between-column share of the variance ({len(cells)} objects)")
        r, c = shares(np.stack(inputs), cells)
        print(f"  image tokens entering layer {layer}: rows {r:.3f}, columns {c:.3f}")
        r, c = shares(np.stack(values), cells)
        print(f"  the retrieval heads' value path there: rows {r:.3f}, columns {c:.3f}")
        for (a, kv), ks in keys.items():
            r, c = shares(np.stack(ks), cells)
            print(f"  keys of layer {a}, key/value head {kv}: rows {r:.3f}, columns {c:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["organism-ids"])
