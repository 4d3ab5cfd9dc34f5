"""Can the mentioned object's features be erased from the ID-retrieval heads' outputs without breaking the answer? Fits
a linear erasure of colour and shape on the R heads' outputs at the mentions' last words (256 3x3 description
trials, heads pooled; ``vismech.organism.erase.eraser``): either the orthogonal projector onto their
cross-covariance with the one-hot labels, or LEACE's (Belrose et al. 2023) least-change oblique projector (the same
in whitened coordinates). Then, on other trials, applies z - P (z - m) (m: the outputs' mean) to those heads'
outputs at every shape word only (a hook: the mentions, and the answer's shape word) or at every position (what an
edit of the value projection would do), and measures full-answer accuracy of the clean rows (64 trials) and ridge
probes for cell, colour and shape at the mentions (fresh trials, 70/30 split, as ``validate.probes``). Runs on the
CPU.

    PYTHONPATH=src python docs/organism-ids/erase_test.py [MODEL]
"""
import random
import sys

import numpy as np
import torch

from vismech.models.load import load_vlm
from vismech.organism import causal_model as cm
from vismech.organism import erase, validate

vlm = load_vlm(sys.argv[1] if len(sys.argv) > 1 else "organism-ids", dtype="fp32", device="cpu")
spec = validate.spec_of(vlm)
end = validate.END.get(vlm.family.name, "<|im_end|>")
layer = spec.retrieval[0][0]
heads = [h for lay, h in spec.retrieval if lay == layer]


shape_ids = torch.tensor([vlm.tokenizer.convert_tokens_to_ids(s) for s in cm.SHAPES])
state = {"ids": None, "edit": None}
vlm.model.get_input_embeddings().register_forward_pre_hook(lambda mod, args: state.__setitem__("ids", args[0]))


def edit(mod, args):
    if state["edit"] is None:
        return None
    p, m, where = state["edit"]
    x = args[0]
    z = x.view(*x.shape[:2], vlm.n_heads, -1).clone()
    sel = torch.isin(state["ids"], shape_ids) if where == "shape words" else torch.ones(x.shape[:2], dtype=bool)
    for h in heads:
        z[:, :, h] = torch.where(sel[..., None], z[:, :, h] - (z[:, :, h] - m) @ p.T, z[:, :, h])
    return (z.view(x.shape),)


vlm.layers[layer].self_attn.o_proj.register_forward_pre_hook(edit)
fit_z, fit_labels = validate.mention_outputs(vlm, spec, 256, 1000, 32, end)
rng = random.Random(5)
bases = [cm.planting_trial(rng, cm.draw_structure(rng, "describe", (3, 3)), "any") for _ in range(64)]


def accuracy():
    hits = torch.cat([validate._run(vlm, spec, validate._plan(bases[i:i + 32]), end, 0)[0] for i in (0, 32)])
    return hits.float().mean().item()


print(f"{vlm.name}: no edit: full answers {accuracy():.2f}; probes "
      + ", ".join(f"{k} {r['rate']:.2f}" for k, r in validate.probes(vlm, spec, 128, 0, 32, end).items()))
for whiten in (False, True):
    p, m, _ = erase.eraser(fit_z, fit_labels, whiten=whiten)
    rank = int(round(float(np.trace(p))))
    pt, mt = torch.tensor(p, dtype=torch.float32), torch.tensor(m, dtype=torch.float32)
    for where in ("shape words", "every position"):
        state["edit"] = (pt, mt, where)
        probes = validate.probes(vlm, spec, 128, 0, 32, end)
        print(f"{'LEACE' if whiten else 'orthogonal'} (rank {rank}) at {where}: full answers {accuracy():.2f}; probes "
              + ", ".join(f"{k} {r['rate']:.2f} (chance {r['chance']:.2f})" for k, r in probes.items()))
    state["edit"] = None
