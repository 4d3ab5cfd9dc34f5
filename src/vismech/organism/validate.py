"""Is a planted organism a valid positive control? The measures its model card reports, on fresh held-out draws.

- ``accuracy``: full-answer accuracy (every answer token is the arg-max given the ones before: the same as greedy
  generation) on random-vocabulary scene descriptions (all objects but one described, any colours and shapes) on
  2x2 and 3x3 grids, and on the colour question;
- ``interchange``: interchange accuracy of each planted variable (R, S through its gathering and its selection
  heads, F) on 3x3 multi-object trials: the model, run with the declared heads' outputs taken from a source,
  gives ``causal_model``'s counterfactual answer;
- ``ablation``: accuracy with one head at a time resampled (its output at every position taken from an
  independent trial of the same layout), for every head, and with every declared head resampled at once, against
  chance (naming a random object of the scene);
- ``probes``: linear probes (ridge, 70/30 split) on the ID-retrieval heads' outputs at each mention's last word:
  the mentioned object's cell, colour and shape, with their chance levels.

Everything reuses planting's batches (``pb.batch_of``) and forwards, so a measure is exactly the training
objective evaluated on new trials. Each accuracy comes with n and a Wilson 95% interval.
"""

from __future__ import annotations

import random
import sys

import numpy as np
import torch

from vismech.analysis.stats import finite, rate
from vismech.errors import UserError
from vismech.models.vlm import VLM
from vismech.scenes.sets import scene_description_set

from . import causal_model as cm
from . import plant
from . import plant_batch as pb

END = {"qwen2_5_vl": "<|im_end|>", "llava": "</s>"}


def _rate(k: int, n: int) -> dict:
    """``stats.rate`` under the key ``rate`` of validity.json, None where n = 0 (e.g. no pair whose answer changes)."""
    r = rate(k, n)
    return {"rate": finite(r["value"]), "n": r["n"], "ci_low": finite(r["ci_low"]), "ci_high": finite(r["ci_high"])}


def _run(vlm: VLM, spec: plant.PlantSpec, plan: pb.Plan, end: str, seed: int):
    """Clean hits [clean rows], patched hits [intervened rows], and the clean z (for probes)."""
    b = pb.batch_of(vlm, spec, plan, end, seed)
    b = {k: v.to(vlm.device) if torch.is_tensor(v) else v for k, v in b.items()}
    with torch.no_grad():
        logits_a, z_a, _, _ = plant.clean_forward(vlm, spec, b)
        hits_a = plant.answer_hits(logits_a, b["a_labels"]).cpu()
        hits_b = plant.answer_hits(plant.patched_forward(vlm, b, z_a), b["b_labels"]).cpu() if plan.b else None
    return hits_a, hits_b, z_a, b


def _plan(bases) -> pb.Plan:
    plan = pb.Plan()
    plan.a = [pb.Row(t, t.answer, False, g) for g, t in enumerate(bases)]
    return plan


def _random_vocab(n: int, grid, seed: int):
    cells = grid[0] * grid[1]
    return scene_description_set(n, grid, n_objects=cells, seed=seed, entropy=None)


def accuracy(vlm, spec, n: int, seed: int, batch_size: int, end: str) -> dict:
    rng = random.Random(seed)
    groups = {"scene_description/2x2/random_vocabulary": _random_vocab(n, (2, 2), seed + 1),
              "scene_description/3x3/random_vocabulary": _random_vocab(n, (3, 3), seed + 2),
              "color_retrieval/2x2": [cm.planting_trial(rng, cm.draw_structure(rng, "color", (2, 2)))
                                      for _ in range(n)],
              "color_retrieval/3x3": [cm.planting_trial(rng, cm.draw_structure(rng, "color", (3, 3)))
                                      for _ in range(n)]}
    out = {}
    for name, trials in groups.items():
        for t in trials:
            t.meta.setdefault("kind", "color" if t.task == "color_retrieval" else "describe")
        k = 0
        for s in range(0, n, batch_size):
            plan = _plan(trials[s:s + batch_size])
            hits, _, _, _ = _run(vlm, spec, plan, end, seed)
            k += int(hits.sum())
        out[name] = _rate(k, n)
    return out


def _bases(rng, n: int, grid=(3, 3)) -> list:
    """Held-out planting trials of the three kinds in turn, any colours and shapes."""
    return [cm.planting_trial(rng, cm.draw_structure(rng, cm.KINDS[i % 3], grid), "any") for i in range(n)]


def interchange(vlm, spec, n: int, seed: int, batch_size: int, end: str) -> dict:
    rng = random.Random(seed + 11)
    kinds = ("R", "S_gathering", "S_selection", "F")
    hits = {k: [0, 0] for k in kinds}
    changed = {k: [0, 0] for k in kinds}  # pairs whose counterfactual answer differs from the base answer
    bases = [t for t in _bases(rng, 2 * n) if len(t.scene.objects) >= 3][:n]
    step = max(1, batch_size // 4)
    for s in range(0, len(bases), step):
        chunk = bases[s:s + step]
        plan = _plan(chunk)
        srcs = []
        for g, t in enumerate(chunk):
            swap, feat = pb.informative_swap(t, rng), cm.feature_source(t, rng)
            srcs.append((swap, feat))
        for swap, feat in srcs:
            plan.a += [pb.Row(swap, swap.answer, False, 0), pb.Row(feat, feat.answer, False, 0)]
        for g, t in enumerate(chunk):
            swap_i, feat_i = len(chunk) + 2 * g, len(chunk) + 2 * g + 1
            swap, feat = srcs[g]
            for kind in kinds:
                src = feat if kind == "F" else swap
                ans = cm.counterfactual_answer(t, src, kind[0])
                plan.b.append((pb.Row(t, ans, False, g), kind, feat_i if kind == "F" else swap_i))
        _, hb, _, _ = _run(vlm, spec, plan, end, seed)
        for k, (row, kind, _) in enumerate(plan.b):
            hits[kind][0] += int(hb[k])
            hits[kind][1] += 1
            if row.answer != row.trial.answer:
                changed[kind][0] += int(hb[k])
                changed[kind][1] += 1
    return {k: {**_rate(*hits[k]), "changed_answers": _rate(*changed[k])} for k in kinds}


def ablation(vlm, spec, n: int, seed: int, batch_size: int, end: str) -> dict:
    rng = random.Random(seed + 23)
    bases = _bases(rng, n, (2, 2))[: n // 2] + _bases(rng, n, (3, 3))[: n - n // 2]
    heads = [(layer, h) for layer in range(vlm.n_layers) for h in range(vlm.n_heads)]
    settings = [("none", [])] + [(f"{layer}.{h}", [(layer, h)]) for layer, h in heads] + \
        [("declared", list(spec.planted))]
    hits = {name: 0 for name, _ in settings}
    clean = 0
    chance = float(np.mean([1 / len(t.scene.objects) for t in bases]))
    step = max(1, batch_size // 8)
    for s in range(0, len(bases), step):
        chunk = bases[s:s + step]
        plan = _plan(chunk)
        plan.a += [pb.Row(r, r.answer, False, 0) for r in (cm.resample_source(t, rng) for t in chunk)]
        for name, hs in settings[1:]:
            for g, t in enumerate(chunk):
                plan.b.append((pb.Row(t, t.answer, False, g), ("resample", hs), len(chunk) + g))
        ha, hb, _, _ = _run(vlm, spec, plan, end, seed)
        clean += int(ha[:len(chunk)].sum())
        for k, (row, kind, _) in enumerate(plan.b):
            name = "declared" if len(kind[1]) > 1 else f"{kind[1][0][0]}.{kind[1][0][1]}"
            hits[name] += int(hb[k])
    n = len(bases)
    base = clean / n
    single = {name: hits[name] / n - base for name, _ in settings[1:-1]}
    planted = {f"{a}.{b}" for a, b in spec.planted}
    others = {k: v for k, v in single.items() if k not in planted}
    worst = min(others, key=lambda k: others[k])
    return {"clean": _rate(clean, n), "single_head_change": single,
            "largest_drop_undeclared": {"head": worst, "change": others[worst]},
            "declared_resampled": _rate(hits["declared"], n), "chance": chance}


def mention_outputs(vlm, spec, n: int, seed: int, batch_size: int, end: str):
    """The ID-retrieval heads' outputs at the mentions' last words of ``n`` 3x3 description trials, [mentions,
    heads, head_dim] (the heads of the first retrieval layer), and each mention's cell (row * 3 + column), colour
    and shape."""
    rng = random.Random(seed + 37)
    X, labels = [], {"cell": [], "color": [], "shape": []}
    layer = spec.retrieval[0][0]
    heads = [h for lay, h in spec.retrieval if lay == layer]
    bases = [cm.planting_trial(rng, cm.draw_structure(rng, "describe", (3, 3)), "any") for _ in range(n)]
    for s in range(0, n, batch_size):
        chunk = bases[s:s + batch_size]
        plan = _plan(chunk)
        _, _, z, b = _run(vlm, spec, plan, end, seed)
        enc = vlm.encode(chunk)
        for i, t in enumerate(chunk):
            ans = int((b["a_labels"][i] != -100).sum())
            sh = b["a_input_ids"].shape[1] - ans - enc.length
            for m, obj in zip(enc.mentions[i], t.mentioned):
                X.append(z[layer][i, m[-1] + sh, heads].float().cpu().numpy())
                labels["cell"].append(obj.cell[0] * 3 + obj.cell[1])
                labels["color"].append(obj.color)
                labels["shape"].append(obj.shape)
    return np.stack(X), labels


def probes(vlm, spec, n: int, seed: int, batch_size: int, end: str) -> dict:
    """Ridge probes on the ID-retrieval heads' outputs (concatenated) at the mentions' last words."""
    X, labels = mention_outputs(vlm, spec, n, seed, batch_size, end)
    X = X.reshape(len(X), -1)
    split = int(0.7 * len(X))
    out = {}
    for name, y in labels.items():
        classes = sorted(set(y))
        Y = np.eye(len(classes))[[classes.index(v) for v in y]]
        Xb = np.c_[X, np.ones(len(X))]
        W = np.linalg.solve(Xb[:split].T @ Xb[:split] + np.eye(Xb.shape[1]), Xb[:split].T @ Y[:split])
        pred = (Xb[split:] @ W).argmax(1)
        k = int((pred == Y[split:].argmax(1)).sum())
        counts = np.bincount(Y[:split].argmax(1), minlength=len(classes))
        out[name] = {**_rate(k, len(X) - split), "chance": float(counts.max() / counts.sum())}
    return out


MEASURES = ("accuracy", "interchange", "ablation", "probes")


def check_measures(measures) -> None:
    bad = [m for m in measures if m not in MEASURES]
    if bad:
        raise UserError(f"unknown measure(s) {', '.join(bad)}; choose from {', '.join(MEASURES)}")


def validity(vlm: VLM, spec: plant.PlantSpec, n: int = 256, seed: int = 0, batch_size: int = 32,
             measures=MEASURES, ablation_n: int | None = None) -> dict:
    """The ``measures`` of the module docstring (default: every one) on fresh draws (seeds offset from
    training's); ``ablation`` on ``ablation_n`` trials (default a quarter of ``n``, at least 4)."""
    check_measures(measures)
    seed = seed + 7_777_777
    end = END.get(vlm.family.name, "<|im_end|>")
    vlm.model.eval()
    run = {"accuracy": lambda: accuracy(vlm, spec, n, seed, batch_size, end),
           "interchange": lambda: interchange(vlm, spec, n, seed, batch_size, end),
           "ablation": lambda: ablation(vlm, spec, ablation_n or max(4, n // 4), seed, batch_size, end),
           "probes": lambda: probes(vlm, spec, n, seed, batch_size, end)}
    return {m: run[m]() for m in MEASURES if m in measures}


def main(argv=None) -> int:
    """``python -m vismech.organism.validate MODEL [--trials N] [--out FILE]``: print (and save) every measure."""
    import argparse
    import json

    from vismech.models.load import load_vlm

    p = argparse.ArgumentParser(prog="python -m vismech.organism.validate", description=__doc__.split("\n")[0])
    p.add_argument("model", help="a planted organism (name or checkpoint folder)")
    p.add_argument("-n", "--trials", dest="n", type=int, default=256,
                   help="held-out trials per measure (ablation: a quarter of them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--measures", default=",".join(MEASURES),
                   help=f"comma list of the measures to run (default: all of {','.join(MEASURES)})")
    p.add_argument("--ablation-trials", type=int, default=None,
                   help="trials of the single-head resampling measure (default: a quarter of --trials); each "
                   "trial is 100/N points of accuracy, so 2-point changes need N in the hundreds")
    p.add_argument("--out", default=None, help="write the measures here as JSON")
    a = p.parse_args(argv)
    measures = a.measures.split(",")
    try:
        check_measures(measures)  # before loading anything
        vlm = load_vlm(a.model, dtype="fp32", device=a.device)
        res = validity(vlm, spec_of(vlm), a.n, a.seed, a.batch_size, measures, a.ablation_trials)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(res, indent=1)
    if a.out:
        from pathlib import Path

        Path(a.out).write_text(text + "\n")
    print(text)
    return 0


def spec_of(vlm: VLM) -> plant.PlantSpec:
    """The planting spec of a planted organism, from the heads its ground truth declares."""
    gt = vlm.ground_truth
    if gt is None or "binding" not in gt.helpers:
        raise UserError(f"{vlm.name} is not a planted organism (no ground_truth.json with vismech's stages)")
    sel = gt.stages["id_selection"].parts
    return plant.PlantSpec(binding=gt.helpers["binding"].heads, retrieval=gt.stages["id_retrieval"].heads,
                           gathering=sel["gathering"], selection=sel["selection"],
                           features=gt.stages["feature_retrieval"].heads)


if __name__ == "__main__":
    raise SystemExit(main())
