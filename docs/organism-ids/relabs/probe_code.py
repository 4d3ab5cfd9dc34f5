"""Is the code the planted heads carry absolute or relative on the relabs scenes? A linear probe read-out.

    PYTHONPATH=src python docs/organism-ids/relabs/probe_code.py [MODEL] [TRAIN] [--json OUT]

Both relative-vs-absolute tests (``rsa-relative``, ``relabs-patch``) call the planted organisms' position code
relative, although what was planted is the object's cell on the scene's grid. This reads the code directly: a
linear probe (``analysis.pca.fit_probe``) is fitted to decode the object's absolute cell (9 classes) from the
outputs of the declared heads (site ``z``), on random 3x3 scene descriptions (4-6 objects on random cells, the
distribution the planting trained on): the ID-selection heads' at the last token (label: the target's cell, the
variable S), the ID-retrieval heads' at each mention's last token (label: the mentioned object's cell, R). Then the
probe is applied to the relabs scenes (``scenes.sets.relabs_set``: four objects in one 2x2 quadrant of the grid)
and each prediction is compared with two readings of the same object:

- absolute: its cell on the 3x3 grid;
- relative to the occupied area: its cell within the 2x2 arrangement, mapped onto the corners of the grid
  ((r, c) -> (2r, 2c)), which is where a code tied to the objects' extent (as a code learned on scenes that mostly
  span the grid would be) puts it;
- relative to the arrangement's origin: its cell within the 2x2 arrangement read as a cell of the grid (the
  arrangement moved to the top-left corner), the relative position ``relabs-patch`` matches.

Prints held-out probe accuracy on random scenes, then on the relabs scenes the share of predictions equal to each
reading, per arrangement, with Wilson intervals. Runs on the CPU.
"""
import json
import sys

import numpy as np
import torch

from vismech.analysis.pca import fit_probe
from vismech.analysis.stats import rate
from vismech.engine import patching
from vismech.models.load import load_vlm
from vismech.scenes.sets import relabs_set, scene_description_set


def fmt(r):
    return f"{100 * r['value']:.0f}% [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}]"


def random_trials(n, seed):
    out = []
    for i, k in enumerate((4, 5, 6)):
        out += scene_description_set(n // 3, (3, 3), n_objects=k, seed=seed * 10 + i)
    return out


def outputs(vlm, trials, heads, where, batch_size=32):
    """Declared heads' outputs [rows, heads * dim] and each row's object cell: ``where`` = "last" (the target's
    cell at the last token) or "mentions" (each described object's cell at its mention's last token)."""
    xs, cells = [], []
    layers = sorted({layer for layer, _ in heads})
    for s in range(0, len(trials), batch_size):
        part = trials[s:s + batch_size]
        b = vlm.encode(part)
        if where == "last":
            pos = [[b.last] for _ in part]
            objs = [[t.target] for t in part]
        else:
            pos = [[m[-1] for m in ms] for ms in b.mentions]
            objs = [list(t.mentioned) for t in part]
        width = max(len(p) for p in pos)
        padded = [p + [p[-1]] * (width - len(p)) for p in pos]
        with torch.no_grad():
            z = patching.capture_z(vlm, b, padded, layers)
        for r, (p, o) in enumerate(zip(pos, objs)):
            for j in range(len(p)):
                xs.append(torch.cat([z[layer][r, j, head].float().flatten() for layer, head in heads]).numpy())
                cells.append(tuple(o[j].cell))
    return np.stack(xs), cells


def main():
    args = sys.argv[1:]
    out_json = None
    if "--json" in args:  # the flag and its value, wherever they stand
        k = args.index("--json")
        out_json, args = args[k + 1], args[:k] + args[k + 2:]
    model = args[0] if args else "organism-ids"
    n_train = int(args[1]) if len(args) > 1 else 480
    vlm = load_vlm(model, device="cpu")
    gt = vlm.ground_truth
    stages = {"S (selection heads, last token)": (gt.stages["id_selection"].parts.get("selection")
                                                  or gt.stages["id_selection"].heads, "last"),
              "R (retrieval heads, mentions)": (gt.stages["id_retrieval"].heads, "mentions")}
    relabs = relabs_set(k=4, seed=3)
    report = {"model": model, "train_trials": n_train, "relabs_trials": len(relabs), "stages": {}}
    print(f"{model}: probes fitted on {n_train} random 3x3 scenes (4-6 objects), applied to {len(relabs)} relabs "
          "scenes")
    for name, (heads, where) in stages.items():
        x, y = outputs(vlm, random_trials(n_train, 1), heads, where)
        xh, yh = outputs(vlm, random_trials(n_train // 2, 2), heads, where)
        predict = fit_probe(x, [f"{r}{c}" for r, c in y])
        held = rate(int(sum(p == f"{r}{c}" for p, (r, c) in zip(predict(xh), yh))), len(yh))
        xr, yr = outputs(vlm, relabs, heads, where)
        pred = predict(xr)
        per_row = [t for t in relabs for _ in range(1 if where == "last" else len(t.mentioned))]
        rows = []
        for p, cell, t in zip(pred, yr, per_row):
            r0 = min(c[0] for c in [o.cell for o in t.scene.objects])
            c0 = min(c[1] for c in [o.cell for o in t.scene.objects])
            rel = (2 * (cell[0] - r0), 2 * (cell[1] - c0))
            org = (cell[0] - r0, cell[1] - c0)
            rows.append((t.meta["arrangement"], p == f"{cell[0]}{cell[1]}", p == f"{rel[0]}{rel[1]}",
                         cell == rel, p == f"{org[0]}{org[1]}", cell == org, p))
        entry = {"heads": [list(h) for h in heads], "held_out_accuracy": held, "relabs": {}}
        print(f"\n{name} {list(map(list, heads))}: held-out accuracy on random scenes {fmt(held)}")
        for arr in ["all", 0, 1, 2, 3]:
            sel = [r for r in rows if arr == "all" or r[0] == arr]
            informative = [r for r in sel if not r[3]]  # the two readings name different cells
            a = rate(sum(r[1] for r in informative), len(informative))
            rr = rate(sum(r[2] for r in informative), len(informative))
            moved = [r for r in sel if not r[5]]  # the arrangement's own cell differs from the absolute one
            ro = rate(sum(r[4] for r in moved), len(moved))
            common = {}
            for r in sel:
                common[r[6]] = common.get(r[6], 0) + 1
            top = ", ".join(f"{k} {v}" for k, v in sorted(common.items(), key=lambda kv: -kv[1])[:4])
            entry["relabs"][str(arr)] = {"absolute": a, "relative_to_extent": rr, "relative_to_origin": ro,
                                         "predicted": common}
            print(f"  arrangement {arr}: absolute {fmt(a)}, relative to the extent {fmt(rr)} (n = {len(informative)}"
                  f"), relative to the arrangement's origin {fmt(ro) if moved else '-'} (n = {len(moved)}); "
                  f"predicted cells: {top}")
        report["stages"][name] = entry
    if out_json:
        with open(out_json, "w") as f:
            json.dump(report, f, indent=2, default=str)


if __name__ == "__main__":
    main()
