"""``behaviour``: accuracy on every task of the paper, by task, grid, entropy condition and target cell."""

from __future__ import annotations

from vismech.experiments import behaviour
from vismech.experiments.common import Context
from vismech.scenes.stimuli import generate

NAME = "behaviour"
DESCRIPTION = "Accuracy (first-token and generated) on scene description, colour retrieval, spatial relation, counting"
DEFAULTS = {"tasks": ["scene_description", "color_retrieval", "spatial_relation", "counting"], "grid": (2, 2),
            "n": 16, "generate": True}


def run(ctx: Context) -> dict:
    trials = []
    for task in ctx.opt("tasks"):
        trials += generate(task, tuple(ctx.opt("grid")) if task in ("scene_description", "color_retrieval")
                           else None, ctx.opt("n"), ctx.seed)
    with ctx.progress(len(trials), "behaviour") as update:
        rows = behaviour.evaluate(ctx.vlm, trials, ctx.batch_size, generate=ctx.opt("generate"), progress=update)
    summary = behaviour.summarize(rows)
    ctx.save_table("behaviour_trials", rows)
    ctx.save_table("behaviour", summary + behaviour.summarize(rows, by=("task", "grid", "entropy", "target_cell")))
    return {"accuracy": summary}
