"""Where full scenes fail and what the planted position code looks like.

    PYTHONPATH=src python docs/organism-ids/code_geometry.py [MODEL] > docs/organism-ids/code_geometry-MODEL.txt

1. Full-answer accuracy (teacher-forced, as ``organism.validate``) on random-vocabulary scene descriptions with every
   cell filled and every object but one described (2x2: 384 trials, 3x3: 288), by the target's cell.
2. On the 3x3 failures: which object the greedy answer names, as an offset (row, column) from the target.
3. The geometry of the cell code in the declared heads' outputs (R at the mentions, S's selection heads at the last
   token; random 3x3 scenes of 4-6 objects): the nine cell centroids, centred, their cosine similarity for
   same-row neighbours, same-column neighbours and cells two apart, and the share of their variance in the top two
   principal directions (1.0: a planar map of the grid, not nine IDs).

Runs on the CPU.
"""
import collections
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "relabs"))
from probe_code import outputs, random_trials  # noqa: E402  (the declared heads' outputs, random 3x3 scenes)
from vismech.models.load import load_vlm  # noqa: E402
from vismech.organism import validate  # noqa: E402


def accuracy_by_cell(vlm, spec, end):
    failures = []
    for grid, n in (((2, 2), 384), ((3, 3), 288)):
        trials = validate._random_vocab(n, grid, 101)
        for t in trials:
            t.meta.setdefault("kind", "describe")
        tot, bad = collections.Counter(), collections.Counter()
        for s in range(0, n, 32):
            part = trials[s:s + 32]
            hits = validate._run(vlm, spec, validate._plan(part), end, 0)[0]
            for t, h in zip(part, hits.tolist()):
                tot[t.target.cell] += 1
                bad[t.target.cell] += not h
                if not h and grid == (3, 3):
                    failures.append(t)
        print(f"{grid[0]}x{grid[1]}, every cell filled, all but one described: accuracy "
              f"{100 * (1 - sum(bad.values()) / n):.1f}% of {n}; by the target's cell:")
        for r in range(grid[0]):
            print("   " + "  ".join(f"{100 * (1 - bad[(r, c)] / max(1, tot[(r, c)])):5.1f}% (n={tot[(r, c)]:3d})"
                                    for c in range(grid[1])))
    return failures


def error_offsets(vlm, failures):
    offsets = collections.Counter()
    for s in range(0, len(failures), 32):
        part = failures[s:s + 32]
        for t, g in zip(part, vlm.generate(vlm.encode(part), 2)):
            named = [o for o in t.scene.objects if [o.color, o.shape] == g.split()[:2]]
            offsets["none of the scene's objects" if not named else
                    (named[0].cell[0] - t.target.cell[0], named[0].cell[1] - t.target.cell[1])] += 1
    n = sum(offsets.values())
    near = sum(v for k, v in offsets.items() if isinstance(k, tuple) and max(map(abs, k)) == 1)
    row = sum(v for k, v in offsets.items() if isinstance(k, tuple) and k[0] == 0)
    print(f"3x3 failures ({n}): the answer names a described object adjacent to the target (diagonals included) in "
          f"{near} ({100 * near / n:.0f}%; a described object drawn at random would be adjacent 56% of the time), in "
          f"the target's own row in {row} ({100 * row / n:.0f}%; at random 25%); offsets (row, column): "
          + ", ".join(f"{k} {v}" for k, v in offsets.most_common()))


def geometry(vlm):
    gt = vlm.ground_truth
    for name, heads, where in (("R", gt.stages["id_retrieval"].heads, "mentions"),
                               ("S", gt.stages["id_selection"].parts.get("selection", gt.stages["id_selection"].heads),
                                "last")):
        x, y = outputs(vlm, random_trials(360, 1), heads, where)
        cells = sorted(set(y))
        centroids = np.stack([x[[i for i, c in enumerate(y) if c == cell]].mean(0) for cell in cells])
        centroids -= centroids.mean(0)
        unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
        sim = unit @ unit.T

        def mean_sim(test):
            return np.mean([sim[i, j] for i in range(9) for j in range(i + 1, 9) if test(cells[i], cells[j])])

        ev = np.linalg.svd(centroids, compute_uv=False) ** 2
        print(f"{name} heads {[list(h) for h in heads]} ({where}): centred cell centroids' cosine, same-row "
              f"neighbours {mean_sim(lambda a, b: a[0] == b[0] and abs(a[1] - b[1]) == 1):+.2f}, same-column "
              f"neighbours {mean_sim(lambda a, b: a[1] == b[1] and abs(a[0] - b[0]) == 1):+.2f}, two apart "
              f"{mean_sim(lambda a, b: max(abs(a[0] - b[0]), abs(a[1] - b[1])) == 2):+.2f}; variance in the top "
              f"two directions {ev[:2].sum() / ev.sum():.2f}")


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else "organism-ids"
    vlm = load_vlm(model, device="cpu")
    spec = validate.spec_of(vlm)
    print(f"{model}")
    failures = accuracy_by_cell(vlm, spec, validate.END.get(vlm.family.name, "<|im_end|>"))
    error_offsets(vlm, failures)
    geometry(vlm)


if __name__ == "__main__":
    main()
