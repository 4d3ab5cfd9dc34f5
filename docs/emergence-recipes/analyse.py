"""Summaries of the natural-emergence runs (docs/emergence-recipes.md): the emergence figure, the seed table, and
per-layer cell decoding on the final checkpoints.

    PYTHONPATH=src python docs/emergence-recipes/analyse.py RUNS_DIR [--n 384]

RUNS_DIR holds one folder per run (as ``recipes.sh`` writes them). Cell decoding: on ``n`` reading-order 3x3 trials
with random vocabulary (6 objects, 3 described in random order, 3 left: the answer is the first undescribed object
in reading order), a linear probe (``analysis.pca.probe_accuracy``,
5-fold) reads, at every layer, the target's cell from the last token and the first described object's cell from the
comma after its mention; ``organism-llava`` (no IDs) and ``organism-llava-ids`` (planted IDs) are measured alongside
as the negative and positive references. Writes ``emergence.png``, ``seeds.json`` and ``decoding.json`` to
RUNS_DIR.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from vismech.analysis.pca import chance_accuracy, probe_accuracy
from vismech.engine import activations
from vismech.models.load import load_vlm
from vismech.organism import emergence
from vismech.organism.causal_model import Structure, planting_trial


def decoding(model: str, n: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    structure = Structure("describe", (3, 3), 6, 3)  # 6 objects, 3 described in random order: 3 left
    trials = [planting_trial(rng, structure) for _ in range(n)]
    vlm = load_vlm(model, dtype="fp32", device="cpu")
    acts = activations.capture(vlm, trials, batch_size=64)
    target = [t.target.cell[0] * 3 + t.target.cell[1] for t in trials]
    mention = [t.mentioned[0].cell[0] * 3 + t.mentioned[0].cell[1] for t in trials]
    last, first = acts.last(), acts.commas()[0]
    rows = []
    for layer in range(acts.n_layers):
        ta, tse = probe_accuracy(last[layer], target)
        ma, mse = probe_accuracy(first[layer], mention)
        rows.append({"layer": layer, "target_cell_last": round(ta, 3), "target_se": round(tse, 3),
                     "mention_cell_comma": round(ma, 3), "mention_se": round(mse, 3)})
    return {"model": model, "n": n, "accuracy": round(float(acts.correct.mean()), 3),
            "chance_target": round(chance_accuracy(target), 3), "chance_mention": round(chance_accuracy(mention), 3),
            "layers": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("--n", type=int, default=384)
    args = ap.parse_args()
    root = Path(args.runs)
    runs = sorted(p for p in root.iterdir() if (p / "emergence.jsonl").exists())
    fig = emergence.plot_emergence({p.name: p / "emergence.jsonl" for p in runs},
                                   groups=["scene_description/3x3/high", "color_retrieval/2x2", "reading_order/3x3"])
    fig.savefig(root / "emergence.png", dpi=110)
    seeds = [p for p in runs if p.name.startswith("reading_order")]
    (root / "seeds.json").write_text(json.dumps(emergence.seed_table([p / "emergence.jsonl" for p in seeds]),
                                                indent=1))
    out = [decoding(str(p), args.n) for p in runs] + [decoding(m, args.n) for m in ("organism-llava",
                                                                                    "organism-llava-ids")]
    (root / "decoding.json").write_text(json.dumps(out, indent=1))
    for d in out:
        best_t = max(d["layers"], key=lambda r: r["target_cell_last"])
        best_m = max(d["layers"], key=lambda r: r["mention_cell_comma"])
        print(f"{Path(d['model']).name:22s} acc {d['accuracy']:.3f}  target cell at last token: best "
              f"{best_t['target_cell_last']:.3f} (L{best_t['layer']}, chance {d['chance_target']:.3f})  mention cell at "
              f"comma: best {best_m['mention_cell_comma']:.3f} (L{best_m['layer']}, chance {d['chance_mention']:.3f})")


if __name__ == "__main__":
    main()
