"""``behaviour``: accuracy on every task of the paper, by task, grid, entropy condition and target cell.

Each task is one resumable unit. Options: ``tasks``, ``grid`` (for scene description and colour retrieval; the
spatial-relation and counting sets use their own 3x3 grids), ``n`` trials per task, ``generate`` (also decode and
parse answers), ``max_new_tokens`` (None: the task's default; counting's default leaves room for the enumeration
the App. C prompt asks for).
"""

from __future__ import annotations

from vismech.engine import evaluate
from vismech.experiments.common import Context
from vismech.experiments.options import Opt
from vismech.scenes.stimuli import generate

NAME = "behaviour"
DESCRIPTION = "Accuracy (first-token and generated) on scene description, colour retrieval, spatial relation, counting"
DEFAULTS = {"tasks": ["scene_description", "color_retrieval", "spatial_relation", "counting"], "grid": [2, 2],
            "n": 16, "generate": True, "max_new_tokens": None}
LIMITS = {"tasks": Opt("list", length=(1, None), each=Opt("str", choices=tuple(evaluate.GEN_TOKENS)))}
GRIDDED = ("scene_description", "color_retrieval")


def run(ctx: Context) -> dict:
    rows = []
    for task in ctx.opt("tasks"):
        grid = tuple(ctx.opt("grid")) if task in GRIDDED else None
        trials = generate(task, grid, ctx.opt("n"), ctx.seed)

        def compute(trials=trials, task=task):
            with ctx.progress(len(trials), f"behaviour {task}") as update:
                return evaluate.evaluate(ctx.vlm, trials, ctx.batch_size, generate=ctx.opt("generate"),
                                          progress=update, max_new_tokens=ctx.opt("max_new_tokens"))

        rows += ctx.unit(ctx.unit_key(f"behaviour-{task}"), compute)
    summary = evaluate.summarize(rows)
    ctx.save_table("behaviour_trials", rows)
    celled = [r for r in rows if r.get("target_cell")]  # counting has no target cell: no second row
    ctx.save_table("behaviour", summary + evaluate.summarize(celled, by=("task", "grid", "entropy", "target_cell")))
    return {"accuracy": summary}


def report_rows(st):
    """For the report: accuracy per task (every target cell: in the CSV)."""
    rows = [r for r in st.table("behaviour") if r.get("target_row", "") == ""]
    return "Accuracy per task", rows, "results/behaviour.csv (also per target cell), behaviour_trials.csv"


def caption(summary: dict) -> str:
    parts = [f"{r['task'].replace('_', ' ')} {r['grid']}: {100 * r['value']:.0f}% "
             f"[{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}] (n={r['n']})"
             for r in summary["accuracy"] if r["measure"] == "first_token"]
    return "First-token accuracy: " + "; ".join(parts) + "."
