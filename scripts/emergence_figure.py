"""Draw docs/emergence.png and docs/organism-seeds/seeds.md from the shipped organisms and the seed runs."""

from pathlib import Path

from vismech.organism.emergence import plot_emergence, seed_table

root = Path(__file__).resolve().parent.parent
org = root / "src" / "vismech" / "organisms"
fig = plot_emergence({"organism (Qwen2.5-VL, 1000 steps)": org / "organism" / "emergence.jsonl",
                      "organism-llava (LLaVA, 4500 steps)": org / "organism-llava" / "emergence.jsonl"})
fig.savefig(root / "docs" / "emergence.png", dpi=130, bbox_inches="tight")
seeds = sorted((root / "docs" / "organism-seeds").glob("seed*-emergence.jsonl"))
rows = seed_table(seeds)
lines = ["| group | " + " | ".join(p.name.split("-")[0] for p in seeds) + " | mean | sd |", "|---" * (len(seeds) + 3) + "|"]
for r in rows:
    lines.append(f"| {r['group']} | " + " | ".join(f"{v:.3f}" for v in r["values"]) + f" | {r['mean']:.3f} | {r['sd']:.3f} |")
(root / "docs" / "organism-seeds" / "seeds.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
