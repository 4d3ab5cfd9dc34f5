"""Draw docs/emergence.png and docs/organism-seeds/seeds.md from the shipped organisms and the seed runs."""

import re
from pathlib import Path

from vismech.organism.emergence import plot_emergence, read, seed_table

root = Path(__file__).resolve().parent.parent
org = root / "src" / "vismech" / "organisms"


def steps_of(name):
    """Steps trained, as the model card states them (the log has a row every 25 steps only)."""
    card = (org / name / "README.md").read_text()
    return int(re.search(r"- steps: (\d+) of", card).group(1))


runs = {f"organism (Qwen2.5-VL, {steps_of('organism')} steps)": org / "organism" / "emergence.jsonl",
        f"organism-llava (LLaVA, {steps_of('organism-llava')} steps)": org / "organism-llava" / "emergence.jsonl"}
fig = plot_emergence(runs)
fig.savefig(root / "docs" / "emergence.png", dpi=110, bbox_inches="tight")
seeds = sorted((root / "docs" / "organism-seeds").glob("seed*-emergence.jsonl"))
common = max(set.intersection(*({s["step"] for s in read(p)} for p in seeds)))
rows = seed_table(seeds, step=common)
lines = [f"Qwen-style organism, seeds 0-2, same settings (`--steps 5000 --label-mentions`, batch 128, lr 1e-3, the "
         "shipped mixture), stopped by the time limit after 3450-3488 steps (one run a GPU on a 4 x H100 host, "
         "4 data workers each, 13.6 min of training loop in two calls; the summary files give the last call's "
         "minutes); "
         f"summaries at step {common}, the last snapshot all three have. Accuracy: held-out first-token accuracy "
         "(128 trials a group); rsa: peak value and layer of the three Fig. 1c curves (48 trials, 2x2 high entropy); cma: heads significant against the "
         "re-paired null (16 pairs a condition, BH q=0.05), their mean layer and the largest mean score.", "",
         "| summary | " + " | ".join(p.name.split("-")[0] for p in seeds) + " | mean | sd |",
         "|---" * (len(seeds) + 3) + "|"]
for r in rows:
    lines.append(f"| {r['group']} | " + " | ".join(f"{v:.3f}" for v in r["values"]) + f" | {r['mean']:.3f} | {r['sd']:.3f} |")
(root / "docs" / "organism-seeds" / "seeds.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
