"""``coco`` (App. B, Fig. 45): on real photographs, replacing the ID-selection heads' output with the mean ID of the
first listed object makes the model list that object again.

``vismech run coco --images DIR``: any folder of JPEG/PNG images (COCO val2017 in the paper; the first
``max_images`` in name order). Steps, as App. B describes them:

1. **Lists.** Every image is shown with the prompt ``In this image there is 1. a``; the greedy continuation
   (``max_new_tokens``) is parsed by ``scenes.answers.parse_object_list`` (documented there: numbered markers,
   else the sentence form, else vismech's colour and shape words) into the listed objects; O0 and O1 are the
   first two. Images with fewer than two objects, or whose second object repeats the first
   (``scenes.answers.same_object``), are dropped (the filter).
2. **Splits.** The kept images are split at random into a source half and a target half, ``splits`` times (3).
3. **Mean ID of O0.** On the source images, the outputs (site ``z``) of the top-K ID-selection heads at the last
   token of the list prompt, where the model is about to name O0, are averaged: ~ID_O0 per head.
4. **Intervention.** On the target images, the prompt ``In this image there is 1. a O0 2. a`` (O0 the image's own
   first object), the same heads' outputs at the last token are *replaced* by ~ID_O0. Prediction: the model repeats
   O0. Measure: the model's greedy answer at the last position is O0 ("repeat rate"; scored by ``models.answers``:
   O0's first token where that is exact, else its whole token sequence), with a Wilson 95% interval per split; the
   summary gives the mean and range over splits.
5. **Controls.** No edit (how often the model repeats O0 anyway), and a random-direction replacement: each head's
   ~ID_O0 replaced by a random vector of the same norm (seeded).

K takes the values of ``k`` (the paper's 50, 100, 200), each capped at the model's head count; heads are the top
of the run's CMA ranking of ID selection (``experiments.cma.cma_scores``, synthetic pairs; options ``cma_n``,
``cma_grid``) unless ``heads`` lists them. ``annotations`` (optional): a COCO instances JSON; the images it lists are
used, and the summary reports how often O0 and O1 are among each image's annotated category names (how grounded
the lists are). Outputs: ``coco_trials.csv`` (every image: its continuation, O0, O1, kept or why not),
``coco.csv`` (split x K x direction rows), figure ``coco``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from vismech.engine import interventions as iv
from vismech.analysis.stats import rate
from vismech.errors import UserError
from vismech.engine import evaluate
from vismech.experiments import cma
from vismech.experiments import figures as F
from vismech.experiments.common import Context
from vismech.engine.edits import head_edits, run_heads
from vismech.experiments.cma import select_heads
from vismech.scenes.answers import OBJECT_LIST_PROMPT, parse_object_list, same_object
from vismech.scenes.core import Picture, Scene, Trial

NAME = "coco"
DESCRIPTION = "App. B: the mean ID of the first listed object, written into ID-selection heads, repeats it (photos)"
DEFAULTS = {"images": None, "annotations": None, "max_images": 200, "splits": 3, "k": [50, 100, 200],
            "max_new_tokens": 16, "heads": None, "cma_n": cma.DEFAULTS["n"], "cma_grid": cma.DEFAULTS["grid"]}
TASK = "object_list"
SUFFIXES = (".jpg", ".jpeg", ".png")


def list_images(folder, max_images: int | None = None) -> list[Path]:
    """The JPEG/PNG files of ``folder`` in name order (the first ``max_images``)."""
    if not folder:
        raise UserError("coco needs a folder of images: vismech run coco --images DIR (e.g. COCO val2017)")
    d = Path(folder)
    if not d.is_dir():
        raise UserError(f"the image folder {folder} does not exist")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise UserError(f"no JPEG or PNG images in {folder}")
    return files[:max_images] if max_images else files


def annotation_names(path) -> dict[str, set[str]]:
    """File name -> annotated category names, from a COCO instances JSON."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
        cats = {c["id"]: c["name"].lower() for c in d["categories"]}
        files = {im["id"]: im["file_name"] for im in d["images"]}
        out: dict[str, set[str]] = {f: set() for f in files.values()}
        for a in d["annotations"]:
            out[files[a["image_id"]]].add(cats[a["category_id"]])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"cannot read the COCO annotations {path}: {e}; give an instances_*.json file") from None
    return out


def list_trial(image: Path, first: str | None = None) -> Trial:
    """The list prompt on ``image``; with ``first``, the target prompt ``... 1. a {first} 2. a``."""
    prompt = OBJECT_LIST_PROMPT if first is None else f"{OBJECT_LIST_PROMPT} {first} 2. a"
    return Trial(TASK, Scene((), (1, 1)), prompt, first or "", picture=Picture(str(image)))


def split_halves(n: int, splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``splits`` random (source, target) halves of range(n); the source gets the extra item when n is odd."""
    out = []
    for s in range(splits):
        perm = np.random.default_rng([seed, s]).permutation(n)
        h = (n + 1) // 2
        out.append((np.sort(perm[:h]), np.sort(perm[h:])))
    return out


def random_like(vec: np.ndarray, seed: int) -> np.ndarray:
    """Per head (rows of [K, d]), a random direction of the same norm."""
    r = np.random.default_rng(seed).standard_normal(vec.shape)
    return r / np.linalg.norm(r, axis=-1, keepdims=True) * np.linalg.norm(vec, axis=-1, keepdims=True)


def _rate(k: int, n: int) -> dict:
    return {"repeats": int(k), **rate(k, n)}


@F.paper_style
def plot(st) -> dict:
    """Figure ``coco`` from the stored summary: how often the model repeats O0 per K (mean and range over splits),
    with the ID edit, a random direction and no edit."""
    sm = st.summary
    if not sm.get("by_k"):
        return {}
    ks = sm["k"]
    fig, axes = F.figure(1, 1, w=0.9 * len(ks) + 1.8, h=2.4)
    ax = axes[0, 0]
    series = {}
    for key, label in (("id", "mean ID of O0"), ("random", "random direction"), ("none", "no edit")):
        v = [sm["by_k"][str(k)][key] for k in ks]
        series[label] = tuple(np.array([x[c] for x in v]) for c in ("mean", "min", "max"))
    F.bars(ax, [f"top {k}" for k in ks], series, {"mean ID of O0": F.ROLE["edit"], "random direction":
                                                  F.ROLE["control"], "no edit": F.ROLE["none"]}, "Repeats O0",
           f"COCO-style lists ({st.model}, {sm['n_kept']} images, {sm['splits']} splits)")
    ax.set_ylim(0, 1.05)
    F.legend_below(ax, ncol=3, drop=0.35)
    fig.tight_layout()
    return {"coco": fig}


def run(ctx: Context) -> dict:
    vlm, seed = ctx.vlm, ctx.seed
    if not ctx.opt("images"):  # `vismech run all` and the demo include coco, which needs the user's photographs
        return {"skipped": "no images given: vismech run coco --images DIR (a folder of JPEG/PNG photographs, "
                           "e.g. COCO val2017)"}
    files = list_images(ctx.opt("images"), ctx.opt("max_images"))
    names = annotation_names(ctx.opt("annotations")) if ctx.opt("annotations") else None
    if names is not None:
        files = [f for f in files if f.name in names]
        if not files:
            raise UserError(f"none of the images in {ctx.opt('images')} is listed in {ctx.opt('annotations')}")
    total = vlm.n_layers * vlm.n_heads
    ks = sorted({min(int(k), total) for k in ctx.opt("k")})
    heads, heads_from = select_heads(ctx, max(ks), condition="id_selection")
    ks = sorted({min(k, len(heads)) for k in ks})
    bs = ctx.batch_size

    def lists():  # step 1 (and the source activations of step 3): one pass over every image
        with ctx.progress(len(files), "coco lists") as update:
            r = run_heads(vlm, [list_trial(f) for f in files], heads, capture=True,
                          gen_tokens=ctx.opt("max_new_tokens"), batch_size=bs, progress=update)
        return r.texts, r.z

    texts, z = ctx.unit(ctx.unit_key("coco-lists", heads=heads, files=len(files)), lists)
    rows, kept = [], []
    for i, (f, text) in enumerate(zip(files, texts)):
        items = parse_object_list(text)
        o0, o1 = (items + ["", ""])[:2]
        why = "" if len(items) >= 2 and not same_object(o0, o1) else \
            ("fewer than two objects" if len(items) < 2 else "second object repeats the first")
        row = {"image": f.name, "generated": text, "o0": o0, "o1": o1, "kept": int(not why), "dropped_because": why}
        if names is not None:
            row.update(o0_annotated=int(o0 in names[f.name]), o1_annotated=int(o1 in names[f.name]))
        rows.append(row)
        if not why:
            kept.append(i)
    ctx.save_table("coco_trials", rows)
    summary = {"images": len(files), "n_kept": len(kept), "splits": int(ctx.opt("splits")), "k": ks,
               "heads_from": heads_from, "max_new_tokens": ctx.opt("max_new_tokens"), "by_k": {}}
    if names is not None:
        summary["annotated"] = {"o0": float(np.mean([r["o0_annotated"] for r in rows if r["kept"]] or [np.nan])),
                                "o1": float(np.mean([r["o1_annotated"] for r in rows if r["kept"]] or [np.nan]))}
    if len(kept) < 2:
        summary["note"] = (f"only {len(kept)} of {len(files)} images gave a list of two different objects, so there "
                           "is nothing to split; see coco_trials.csv for what the model wrote")
        return summary
    first = [rows[i]["o0"] for i in kept]
    targets = [list_trial(files[i], o) for i, o in zip(kept, first)]
    zk = z[kept]  # [n_kept, K_max, d]

    splits = split_halves(len(kept), ctx.opt("splits"), seed)
    settings = [(s, k, d) for s in range(len(splits)) for k in ks for d in ("id", "random")]

    def interventions():  # steps 2-5: per batch of images, vision and prompt once, then the edits' last-token runs stacked
        values = {}
        for s, k, d in settings:
            mean = zk[splits[s][0]][:, :k].mean(0)
            values[(s, k, d)] = mean if d == "id" else random_like(mean, seed + 1000 * s + k)
        hits = {key: np.zeros(len(kept), bool) for key in ["none", *settings]}
        with ctx.progress(len(targets), "coco") as update:
            for idx in evaluate.batches(targets, bs):
                b = vlm.encode([targets[i] for i in idx])
                # the repeat of O0, scored as the model would write it (models.answers: first token where exact)
                runs = iv.EditedRuns(vlm, b, first_position=b.last, answers=vlm.answers(b, [[first[i]] for i in idx]))
                hits["none"][idx] = runs.scores().greedy[:, 0].numpy()
                edit_sets = [head_edits(heads[:key[1]], torch.as_tensor(np.repeat(values[key][None], len(idx), 0),
                                                                         dtype=torch.float32), "set", b.last)
                             for key in settings]
                for key, sc in zip(settings, runs.scores_many(edit_sets)):  # all settings in stacked forwards
                    hits[key][idx] = sc.greedy[:, 0].numpy()
                update(len(idx))
        return hits

    hits = ctx.unit(ctx.unit_key("coco-interventions", heads=heads, files=len(files)), interventions)
    out = []
    for s, (src, tgt) in enumerate(splits):
        for k in ks:
            for d in ("none", "id", "random"):
                h = hits["none" if d == "none" else (s, k, d)][tgt]  # each split scores its target half
                out.append({"measure": "repeat_rate", **_rate(int(h.sum()), len(h)), "split": s, "k": k,
                            "direction": d, "n_source": len(src)})
    ctx.save_table("coco", out)
    for k in ks:
        summary["by_k"][str(k)] = {}
        for d in ("id", "random", "none"):
            v = [r["value"] for r in out if r["k"] == k and r["direction"] == d]
            summary["by_k"][str(k)][d] = {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v)),
                                          "per_split": [r for r in out if r["k"] == k and r["direction"] == d]}
    return summary


def caption(summary: dict) -> str:
    if "skipped" in summary:
        return "Skipped: " + summary["skipped"]
    if not summary["by_k"]:
        return summary.get("note", "no images kept")
    parts = [f"top {k}: {100 * v['id']['mean']:.0f}% (random {100 * v['random']['mean']:.0f}%, no edit "
             f"{100 * v['none']['mean']:.0f}%)" for k, v in summary["by_k"].items()]
    return (f"Repeats of the first listed object after the ID edit, mean over {summary['splits']} splits of "
            f"{summary['n_kept']} kept images: " + "; ".join(parts) + ".")
