"""Does the column's small share of the position code limit full 3x3 scenes? A causal test on a trained organism.

    PYTHONPATH=src python docs/organism-ids/column_gain.py [MODEL] [TRIALS]

The residual stream at the image tokens after the probe layer (where planting wrote the code) is edited as
x + a * P (x - m): P projects on the two directions that separate the three columns' mean codes (made orthogonal to
the two that separate the rows; fitted on random 3x3 descriptions of 4-6 objects), m is the image tokens' mean.
a = 1 doubles the column part of the code, a = -0.5 halves it. Controls: the same gains on the row directions, and
on two random directions orthogonal to both. Measured: teacher-forced full answers (as ``organism.validate``) on
validity's 3x3 scenes (every cell filled, all but one described) and on 3x3 scenes of 4 objects, TRIALS each
(default 96). If the column's size is what limits full scenes, raising it should lift them. Runs on the CPU.
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from row_column import object_codes  # noqa: E402  (each object's mean image-token code, one trial a forward)
from vismech.engine import hooks  # noqa: E402
from vismech.models.load import load_vlm  # noqa: E402
from vismech.organism import validate  # noqa: E402
from vismech.scenes.sets import scene_description_set  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else "organism-ids"
n = int(sys.argv[2]) if len(sys.argv) > 2 else 96
vlm = load_vlm(model, dtype="fp32", device="cpu")
spec = validate.spec_of(vlm)
end = validate.END.get(vlm.family.name, "<|im_end|>")
layer = spec.probe_layer

# the code's directions, from each object's mean image token after the probe layer
xs, cells = [], []
for k in (4, 5, 6):
    for t in scene_description_set(48, (3, 3), n_objects=k, seed=50 + k, entropy=None):
        got, means, _ = object_codes(vlm, t)
        xs += list(means[:, layer])
        cells += got
x = np.stack(xs)
mean = x.mean(0)


def between(axis):
    lab = np.array([c[axis] for c in cells])
    return np.stack([x[lab == v].mean(0) - mean for v in range(3)])


rows, _ = np.linalg.qr(between(0).T)
rows = rows[:, :2]
cols = between(1).T - rows @ (rows.T @ between(1).T)  # the column directions, the rows' part removed
cols, _ = np.linalg.qr(cols)
cols = cols[:, :2]
rng = np.random.default_rng(0)
rand = rng.standard_normal((x.shape[1], 2))
rand -= rows @ (rows.T @ rand) + cols @ (cols.T @ rand)
rand, _ = np.linalg.qr(rand)
for name, u in (("rows", rows), ("columns", cols)):
    proj = (x - mean) @ u
    print(f"{name}: variance along its 2 directions {proj.var(0).sum():.3f} "
          f"(of {((x - mean) ** 2).sum(1).mean():.3f} in all)")

state = {}


def grab(module, args, kwargs):
    ids = kwargs.get("input_ids")
    state["img"] = None if ids is None else (ids == vlm.image_token_id)


groups = {"3x3, every cell filled": validate._random_vocab(n, (3, 3), 7_777_779),
          "3x3, 4 objects": scene_description_set(n, (3, 3), n_objects=4, seed=91, entropy=None)}
for ts in groups.values():
    for t in ts:
        t.meta.setdefault("kind", "describe")
handle = vlm.model.register_forward_pre_hook(grab, with_kwargs=True)
try:
    for name, u in (("columns", cols), ("rows", rows), ("random", rand)):
        P = torch.tensor(u @ u.T, dtype=torch.float32)
        m = torch.tensor(mean, dtype=torch.float32)
        for a in ((0.0, -0.5, 1.0, 3.0) if name == "columns" else (-0.5, 1.0, 3.0)):
            def edit(h, a=a, P=P, m=m):
                mask = state["img"][:, :, None, None].to(h.dtype)  # the resid site is [rows, positions, 1, d]
                return h + a * mask * ((h - m) @ P)

            res = []
            with hooks.hooked(vlm, "resid", layer, edit):
                for g, ts in groups.items():
                    hits = torch.cat([validate._run(vlm, spec, validate._plan(ts[s:s + 32]), end, 0)[0]
                                      for s in range(0, len(ts), 32)])
                    res.append(f"{g} {100 * hits.float().mean():.1f}%")
            print(f"{name}, gain {a:+.1f}: " + ", ".join(res) + f" (n = {n} each)")
finally:
    handle.remove()
