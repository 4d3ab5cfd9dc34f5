"""Is the selection heads' gain what 3x3 scenes lack? Train only the planted selection and feature heads' query and
key weights of a planted organism, on scenes with every object but one described, and compare accuracy.

    LR=3e-3 PYTHONPATH=src python docs/organism-ids/sharpen.py [MODEL] [STEPS]
    SHARE=0.1 PYTHONPATH=src python docs/organism-ids/sharpen.py [MODEL] [STEPS]   # and the gathering heads' share

Trainable: the rows of ``q_proj`` (weights and bias) that make the declared ID-selection and feature-retrieval
heads' queries, and the rows of ``k_proj`` that make their key heads (in `organism-ids` each pair of heads has a
key head of its own, so no other head changes). Loss: the planting's attention term for those heads (minus the log
attention mass on the target's image tokens at every naming position) plus the task loss on the answer. Trials:
random-vocabulary descriptions, 2x2 with 4 objects and 3x3 with 4 and with 9 objects, every object but one
described (a third each). Held-out accuracy (full answer, teacher-forced arg-max) before and after on 64 trials of
each, other seeds (``LR``: Adam's learning rate, default 1e-3).

``SHARE=S`` (the target of ``--plant-gathering-share``: each gathered mention gets S of a gathering head's
attention, the first token the rest) adds the gathering heads' query and key rows to what trains and their share
term (``plant.share_loss``) to the loss; ``GATHERING=1`` trains those rows without the share term (the control).
Also printed: the gathering heads' output norm at the last token of 9-object scenes. ``ONLY9=1`` trains on the
9-object scenes alone (18 a step); ``ALL=1`` trains every language-model weight instead of the rows above (can the
architecture at this size select among eight described objects at all?). CPU.
"""
import os
import random
import sys
import time

import torch

from vismech.models.load import load_vlm
from vismech.organism import plant
from vismech.organism import plant_batch as pb
from vismech.organism import validate
from vismech.scenes.sets import scene_description_set

SETS = (((2, 2), 4), ((3, 3), 4), ((3, 3), 9))


def trials(n, grid, objects, seed):
    out = scene_description_set(n, grid, n_objects=objects, seed=seed)
    for t in out:
        t.meta.setdefault("kind", "describe")
    return out


def batch(vlm, spec, ts):
    return pb.batch_of(vlm, spec, validate._plan(ts), validate.END.get(vlm.family.name, "<|im_end|>"))


def step_loss(vlm, spec, b, share=0.0):
    """The attention term of the selection and feature heads plus the task loss; with ``share``, also the gathering
    heads' share term (``plant.share_loss``; ``share.py``)."""
    logits, _, att, _ = plant.clean_forward(vlm, spec, b)
    layers = plant._attention_layers(spec)
    terms, masses = [], {}
    for c in ("selection", "features"):
        where, keys = b[f"att_{c}_where"], b[f"att_{c}_keys"]
        m = torch.stack([(att[l][where[:, 0], layers[l].index(h), where[:, 1]] * keys.to(torch.float32)).sum(-1)
                         for l, h in getattr(spec, c)])
        terms.append(-(m + 1e-6).log().mean())
        masses[c] = m.mean().item()
    if share:
        where, keys = b["att_gathering_where"], b["att_gathering_keys"].bool()
        ps = [att[l][where[:, 0], layers[l].index(h), where[:, 1]] for l, h in spec.gathering]
        terms.append(torch.stack([plant.share_loss(p, keys, share) for p in ps]).mean())
        first = keys.long().argmax(-1)  # the first token's share (the target: 1 - share x mentions)
        masses["first"] = torch.stack([p[torch.arange(len(p)), first] for p in ps]).mean().item()
    return torch.stack(terms).mean() + plant._ce(logits, b["a_labels"]).mean(), masses


def accuracy(vlm, spec, n=64):
    out = {}
    with torch.no_grad():
        for grid, objects in SETS:
            ts = trials(n, grid, objects, seed=1000 + objects + grid[0])
            hits, masses = [], []
            for s in range(0, n, 16):
                b = batch(vlm, spec, ts[s:s + 16])
                logits, _, _, _ = plant.clean_forward(vlm, spec, b)
                hits.append(plant.answer_hits(logits, b["a_labels"]))
                masses.append(step_loss(vlm, spec, b)[1]["selection"])
            out[f"{grid[0]}x{grid[1]}/{objects}"] = (torch.cat(hits).float().mean().item(),
                                                      sum(masses) / len(masses))
    return out


def trainable(vlm, spec):
    """(parameters, gradient masks): the planted selection and feature heads' query rows and key-head rows."""
    d, groups = vlm.head_dim, vlm.n_heads // vlm.n_kv_heads
    params, masks = [], []
    for layer in sorted({l for l, _ in spec.selection + spec.features}):
        heads = [h for l, h in spec.selection + spec.features if l == layer]
        kv = sorted({h // groups for h in heads})
        others = [h for h in range(vlm.n_heads) if h // groups in kv and h not in heads]
        if others:
            raise SystemExit(f"layer {layer}: key heads {kv} are shared with undeclared heads {others}")
        att = vlm.attention(layer)
        for proj, idx in ((att.q_proj, heads), (att.k_proj, kv)):
            for p in (proj.weight, proj.bias):
                if p is None:
                    continue
                m = torch.zeros_like(p)
                for i in idx:
                    m[i * d:(i + 1) * d] = 1
                params.append(p)
                masks.append(m)
    return params, masks


def gathering_norm(vlm, spec, n=32):
    """The gathering heads' output norm at the last token, on 3x3 scenes with 9 objects."""
    with torch.no_grad():
        b = batch(vlm, spec, trials(n, (3, 3), 9, seed=1012))
        _, z, _, _ = plant.clean_forward(vlm, spec, b)
        gw = b["att_gathering_where"]
        qpos = b["att_qpos"][gw[:, 0], gw[:, 1]]
        return torch.stack([z[l][gw[:, 0], qpos, h].float().norm(dim=-1) for l, h in spec.gathering]).mean().item()


def main(model="organism-ids", steps=150):
    torch.manual_seed(0)
    share = float(os.environ.get("SHARE", "0"))
    gather = share > 0 or os.environ.get("GATHERING") == "1"
    vlm = load_vlm(model, dtype="fp32", device="cpu")
    spec = validate.spec_of(vlm)
    if share:  # the share target needs the first token among the gathering heads' keys
        spec = plant.PlantSpec(**{**spec.__dict__, "gathering_share": share})
    # the rows that train: the selection and feature heads', and with GATHERING or SHARE the gathering heads' too
    rows = plant.PlantSpec(**{**spec.__dict__, "selection": spec.selection + spec.gathering}) if gather else spec
    for p in vlm.model.parameters():
        p.requires_grad_(False)
    if os.environ.get("ALL") == "1":  # every language-model weight (the capacity question), no masks
        params = [p for n, p in vlm.model.named_parameters() if "language_model" in n or "lm_head" in n]
        masks = [torch.ones_like(p) for p in params]
    else:
        params, masks = trainable(vlm, rows)
    for p in params:
        p.requires_grad_(True)
    train_sets = SETS[2:] if os.environ.get("ONLY9") == "1" else SETS  # 9-object scenes alone
    show = lambda acc: {k: f"{a:.3f} (selection mass {m:.2f})" for k, (a, m) in acc.items()}  # noqa: E731
    print(f"share {share}, gathering heads trained: {gather}; before:", show(accuracy(vlm, spec)),
          f"gathering norm {gathering_norm(vlm, spec):.2f}", flush=True)
    opt = torch.optim.Adam(params, lr=float(os.environ.get("LR", "1e-3")))
    rng, t0 = random.Random(0), time.time()
    for step in range(int(steps)):
        ts = [t for grid, objects in train_sets for t in trials(18 // len(train_sets), grid, objects,
                                                                  seed=rng.randrange(10 ** 9))]
        loss, masses = step_loss(vlm, spec, batch(vlm, spec, ts), share)
        opt.zero_grad()
        loss.backward()
        for p, m in zip(params, masks):
            p.grad.mul_(m)
        opt.step()
        if step % 25 == 0 or step == int(steps) - 1:
            print(f"step {step}: loss {loss.item():.3f}, selection mass {masses['selection']:.2f}, features "
                  f"{masses['features']:.2f}" + (f", first-token share {masses['first']:.2f}" if share else "")
                  + f" ({time.time() - t0:.0f} s)", flush=True)
    print("after:", show(accuracy(vlm, spec)), f"gathering norm {gathering_norm(vlm, spec):.2f}", flush=True)


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["organism-ids"]), *(int(a) for a in sys.argv[2:3]))
