"""Where the planted ID-selection and feature-retrieval heads attend at the last token, by scene size.

    PYTHONPATH=src python docs/organism-ids/selection_attention.py [MODEL] [TRIALS]

For random-vocabulary scene descriptions with every object but one described (2x2 with 4 objects, 3x3 with 4 and
with 9), the share of each declared head's attention on its target object's image tokens (for the ID-retrieval
heads at a mention: the mentioned object), on the described objects' image tokens, on the background and on text,
and the full-answer accuracy; then, on 3x3 scenes, the same by number of described objects (with the feature heads'
attention on the target and on the described objects). Runs on the CPU.
"""
import sys

import torch

from vismech.models.load import load_vlm
from vismech.organism import plant
from vismech.organism import plant_batch as pb
from vismech.organism import validate
from vismech.scenes.sets import scene_description_set


def masses(vlm, spec, trials, batch_size=16):
    out, hits, norms = {"retrieval": [], "selection": [], "features": []}, [], []
    layers = plant._attention_layers(spec)
    for s in range(0, len(trials), batch_size):
        b = pb.batch_of(vlm, spec, validate._plan(trials[s:s + batch_size]), validate.END.get(vlm.family.name,
                                                                                                 "<|im_end|>"))
        with torch.no_grad():
            logits, z, att, _ = plant.clean_forward(vlm, spec, b)
        gw = b["att_gathering_where"]  # the gathering heads' output norm at their supervised positions
        qpos = b["att_qpos"][gw[:, 0], gw[:, 1]]
        for layer, head in spec.gathering:
            norms.append(z[layer][gw[:, 0], qpos, head].float().norm(dim=-1))
        hits.append(plant.answer_hits(logits, b["a_labels"]))
        image = b["a_input_ids"] == vlm.image_token_id
        rw, rk = b["att_retrieval_where"], b["att_retrieval_keys"].bool()
        described = torch.zeros(image.shape[0], rk.shape[1], dtype=torch.bool)
        for i in range(len(rw)):  # the ID-retrieval keys of each mention: the described objects' image tokens
            described[rw[i, 0]] |= rk[i]
        for c in out:
            where, keys = b[f"att_{c}_where"], b[f"att_{c}_keys"].bool()
            for layer, head in getattr(spec, c):
                p = att[layer][where[:, 0], layers[layer].index(head), where[:, 1]].float()
                k = p.shape[-1]
                tgt, desc = (p * keys[:, :k]).sum(-1), (p * described[where[:, 0], :k]).sum(-1)
                img = (p * image[where[:, 0], :k]).sum(-1)
                out[c].append(torch.stack([tgt, desc, img - tgt - desc, 1 - img], -1))
    return (torch.cat(hits).float().mean().item(), {c: torch.cat(v).mean(0).tolist() for c, v in out.items()},
            torch.cat(norms).mean().item())


def main(model="organism-ids", n=64):
    torch.manual_seed(0)
    vlm = load_vlm(model, dtype="fp32", device="cpu")
    spec = validate.spec_of(vlm)
    print("| scene | described | accuracy | heads | target | described objects | background | text |")
    print("|---|---|---|---|---|---|---|---|")
    for grid, objects in (((2, 2), 4), ((3, 3), 4), ((3, 3), 9)):
        acc, m, _ = masses(vlm, spec, _trials(n, grid, objects))
        for c, v in m.items():
            print(f"| {grid[0]}x{grid[1]}, {objects} objects | {objects - 1} | {acc:.2f} | {c} | "
                  + " | ".join(f"{x:.2f}" for x in v) + " |")
    print("\n| described (3x3, one left) | accuracy | retrieval heads on the mentioned object | selection heads on "
          "the target | gathering heads' output norm | feature heads on the target / on described objects |")
    print("|---|---|---|---|---|---|")
    for k in range(1, 9):
        acc, m, norm = masses(vlm, spec, _trials(n, (3, 3), k + 1))
        print(f"| {k} | {acc:.2f} | {m['retrieval'][0]:.2f} | {m['selection'][0]:.2f} | {norm:.2f} | "
              f"{m['features'][0]:.2f} / {m['features'][1]:.2f} |")


def _trials(n, grid, objects):
    trials = scene_description_set(n, grid, n_objects=objects, seed=5)
    for t in trials:
        t.meta.setdefault("kind", "describe")
    return trials


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["organism-ids"]), *(int(a) for a in sys.argv[2:3]))
