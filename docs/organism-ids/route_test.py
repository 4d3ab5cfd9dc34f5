"""Which answer an interchange gives when the causal model, a route by features and an ignored patch each predict a
different one. Each 3x3 description (random "describe" planting trials, any colours and shapes) gets a crossing
source: a described object D, before the target in reading order, and an undescribed object U other than the target
exchange cells. The prompt is the same; in the source the first undescribed object in reading order is U, at D's
cell. Patched from it, the planted heads (R, S gathering or S selection) should name D (the causal model: the base
object at the source's selected cell); a feature-retrieval query that takes the target's features from the
selection heads names U (the source's target, found again by its features); a patch that changes nothing leaves the
base answer. Teacher-forced full answers. Runs on the CPU.

    PYTHONPATH=src python docs/organism-ids/route_test.py MODEL [PAIRS] [LAYERS]

With LAYERS (e.g. 3,4,5) every undeclared head of those layers is patched from the source as well, at the positions
of each row's planted patch: if the answer then follows the causal model, the route that bypassed the planted
heads runs through those heads there.
"""
import random
import sys

import torch

from vismech.models.load import load_vlm
from vismech.organism import causal_model as cm
from vismech.organism import plant
from vismech.organism import plant_batch as pb
from vismech.organism import validate
from vismech.scenes.core import Obj

vlm = load_vlm(sys.argv[1], dtype="fp32", device="cpu")
spec = validate.spec_of(vlm)
n = int(sys.argv[2]) if len(sys.argv) > 2 else 128
extra = [int(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else []
everywhere = len(sys.argv) > 4 and sys.argv[4] == "everywhere"
end = validate.END.get(vlm.family.name, "<|im_end|>")
rng = random.Random(11)


def crossing(t):
    """``t`` with a described object before the target and an undescribed non-target object exchanging cells."""
    ds = [o for o in t.mentioned if o.cell < t.target.cell]  # (row, column) order is reading order
    us = [o for o in t.scene.objects if o not in t.mentioned and o != t.target]
    if not ds or not us:
        return None
    d, u = rng.choice(ds), rng.choice(us)
    mapping = {o: o for o in t.scene.objects}
    mapping[d], mapping[u] = Obj(d.color, d.shape, u.cell), Obj(u.color, u.shape, d.cell)
    return cm._rebuild(t, mapping)


pairs = []
while len(pairs) < n:
    t = cm.planting_trial(rng, cm.draw_structure(rng, "describe", (3, 3)), "any")
    w = crossing(t)
    if w is not None and len({cm.counterfactual_answer(t, w, "S"), w.answer, t.answer}) == 3:
        pairs.append((t, w))
kinds = ("R", "S_gathering", "S_selection")
labels = ("causal", "source", "base")
count = {k: {a: 0 for a in labels} for k in kinds}
for s in range(0, n, 8):
    chunk = pairs[s:s + 8]
    plan = validate._plan([t for t, _ in chunk])
    plan.a += [pb.Row(w, w.answer, False, 0) for _, w in chunk]
    rows = []
    for g, (t, w) in enumerate(chunk):
        for kind in kinds:
            answers = {"causal": cm.counterfactual_answer(t, w, kind[0]), "source": w.answer, "base": t.answer}
            for a in labels:
                plan.b.append((pb.Row(t, answers[a], False, g), kind, len(chunk) + g))
                rows.append((kind, a))
    b = pb.batch_of(vlm, spec, plan, end, 0)
    for layer in extra:  # undeclared heads of these layers patched where the planted heads are
        at = b["b_patch"].any(-1).any(-1)  # [rows, positions]
        if everywhere:  # every real position of the row
            at = b["b_attention_mask"].bool()
        for head in range(vlm.n_heads):
            if (layer, head) not in spec.planted:
                b["b_patch"][:, :, layer, head] |= at
    with torch.no_grad():
        _, z_a, _, _ = plant.clean_forward(vlm, spec, b)
        hits = plant.answer_hits(plant.patched_forward(vlm, b, z_a), b["b_labels"])
    for (kind, a), hit in zip(rows, hits.tolist()):
        count[kind][a] += int(hit)
# feature sources: a described object before the target gets other features at its cell (the prompt names the new
# object). The cells are those of the base: the causal model's S is the base's, and a cell route keeps the base
# answer; a route that excludes the described objects by their words now finds the changed one undescribed and,
# being before the target, names it.
feat = {"cells (base)": 0, "words (the changed object)": 0}
fpairs = []
while len(fpairs) < n:
    t = cm.planting_trial(rng, cm.draw_structure(rng, "describe", (3, 3)), "any")
    got = cm.mention_feature_source(t, rng)
    if got is not None and t.mentioned[got[1]].cell < t.target.cell:
        fpairs.append((t, got[0], t.mentioned[got[1]]))
for s in range(0, n, 8):
    chunk = fpairs[s:s + 8]
    plan = validate._plan([t for t, _, _ in chunk])
    plan.a += [pb.Row(w, w.answer, False, 0) for _, w, _ in chunk]
    for g, (t, w, d) in enumerate(chunk):
        for answer in (t.answer, cm.answer_at(t, d.cell)):
            plan.b.append((pb.Row(t, answer, False, g), "S_gathering", len(chunk) + g))
    _, hits, _, _ = validate._run(vlm, spec, plan, end, 0)
    for k, hit in enumerate(hits.tolist()):
        feat[list(feat)[k % 2]] += int(hit)
also = f", undeclared heads of layers {extra} patched too" if extra else ""
print(f"{sys.argv[1]}: {n} crossing pairs{also}; share giving each answer (teacher-forced, full answer; clean: base)")
for kind in kinds:
    print(f"{kind}: " + ", ".join(f"{a} {count[kind][a] / n:.2f}" for a in labels))
if not extra:  # (this part patches the gathering heads alone)
    print(f"S_gathering from a feature source ({n} pairs): "
          + ", ".join(f"{a} {v / n:.2f}" for a, v in feat.items()))
