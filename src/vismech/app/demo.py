"""``vismech demo``: vismech on a model with planted position IDs, beside a control that has none.

The planted model (``--model``, default ``organism-ids``) gets every experiment of ``all`` plus ``recovery``; the
control (``--control``, default ``organism``; ``none`` skips it) gets ``CONTROL_EXPERIMENTS``, its ``recovery``
scored against the planted model's declared ground truth, so that one precision/recall table reads on both. Each
model's run goes into its own folder of ``--out`` (named as ``runs/<model>``), a normal run with its own report that
resumes as any run does (a demo continues by default; ``--fresh`` refuses a folder that holds a run), and
``OUT/report.html`` sets the two side by side (``app.compare``). An ``--out`` that holds anything but a demo's
files is refused before anything is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vismech.errors import UserError
from vismech.models.ground_truth import FILE as GROUND_TRUTH, load_ground_truth

#: Options of the demo (every experiment that takes one), sized to run in a few minutes on 2 CPU cores. The
#: ``cma`` experiment uses the CMA of the head rankings and of ``recovery`` (``cma.n`` = ``cma_n``: one computation).
DEMO_OPTIONS = {"n": 4, "cma_n": 20, "null_samples": 2000, "max_new_tokens": 4, "n_boot": 100, "grids": [[2, 2]],
                "recovery.n": 16, "recovery.n_estimate": 16, "recovery.rsa_n": 48, "recovery.random_sets": 2,
                "recovery.alphas": [2, 5, 10]}
#: What the control runs: enough to set beside the planted model.
CONTROL_EXPERIMENTS = ["cma", "rsa", "id-intervention", "recovery"]


def planted_experiments() -> list[str]:
    """What the planted model runs, before ``recovery``: every experiment of ``all``."""
    from vismech.experiments import EXPERIMENTS, NOT_IN_ALL

    return [n for n in EXPERIMENTS if n not in NOT_IN_ALL]


def demo_options(names: list[str], given: dict) -> dict:
    """The demo's options for experiments ``names`` under the user's ``given``: a plain KEY the user sets replaces
    the demo's KEY and NAME.KEY; the demo's options no experiment of ``names`` takes are left out."""
    from vismech.experiments import EXPERIMENTS

    out = {k: v for k, v in DEMO_OPTIONS.items() if k not in given and k.split(".", 1)[-1] not in given}
    if "n" not in given and "cma.n" not in given:  # the cma experiment on the rankings' pairs
        out["cma.n"] = given.get("cma_n", out.get("cma_n"))
    for k in given:
        if "." in k and k.split(".", 1)[0] not in EXPERIMENTS:
            raise UserError(f"--set {k}: no experiment is called {k.split('.', 1)[0]!r}; NAME.KEY takes one of "
                            f"{', '.join(EXPERIMENTS)}")
    # the user's NAME.KEY for an experiment this run leaves out is left out; every other KEY is checked by the run
    return {**_taken(names, out), **{k: v for k, v in given.items() if "." not in k or k.split(".", 1)[0] in names}}


def ground_truth_file(model: str, options: dict) -> str | None:
    """The planted model's declared ground truth: option ``ground_truth`` if given, else its checkpoint's file."""
    from vismech.models.load import checkpoint_path

    given = options.get("recovery.ground_truth", options.get("ground_truth"))
    if given:
        return str(Path(given).resolve())
    path = Path(checkpoint_path(model)) / GROUND_TRUTH
    return str(path.resolve()) if path.is_file() else None


def _taken(names: list[str], options: dict) -> dict:
    """The options some experiment of ``names`` takes (KEY by its defaults, NAME.KEY by its name)."""
    from vismech.experiments import get

    defaults = set().union(*(get(n).DEFAULTS for n in names))
    return {k: v for k, v in options.items() if (k.split(".", 1)[0] in names if "." in k else k in defaults)}


def _check_demo_folder(out: Path, dirs: list[str]) -> None:
    """A demo writes only into a new or empty folder, a demo's own (its ``demo.json``), or one holding nothing but
    this demo's run folders (a demo stopped before its page); anything else is the user's and is refused."""
    from vismech.app.compare import FILE

    if not out.is_dir() or (out / FILE).exists():
        return
    other = sorted(p.name for p in out.iterdir() if p.name not in dirs)
    if other:
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        raise UserError(f"--out {out} holds files that are not a vismech demo's ({shown}); choose a new or empty "
                        "folder for --out")


def run_demo(args, given: dict) -> Path:
    """Run the demo into ``args.out``; ``given``: the user's option overrides. Returns the comparison page."""
    from vismech.app.compare import write_comparison, write_demo_file
    from vismech.app.runner import default_run_dir, plan, run_experiments
    from vismech.store.rundir import output_dir

    out = output_dir(args.out)
    control = None if args.control in (None, "", "none") else args.control
    gt = ground_truth_file(args.model, given)
    if gt is not None:
        load_ground_truth(gt)  # a missing or malformed file is refused before anything runs
    planted = planted_experiments() + (["recovery"] if gt else [])
    if gt is None and control is not None:
        raise UserError(f"the demo scores {control} against the ground truth {args.model} declares, and it "
                        "declares none (no ground_truth.json): pass --control none, --set ground_truth=PATH, "
                        "or a planted model such as organism-ids")
    runs = [(args.model, "planted" if gt else "model", planted, demo_options(planted, given))]
    if control is not None:  # the user's options that only the planted model's experiments take are left out
        runs.append((control, "control", CONTROL_EXPERIMENTS,
                     {**demo_options(CONTROL_EXPERIMENTS, _taken(CONTROL_EXPERIMENTS, given)),
                      "recovery.ground_truth": gt}))
    dirs = [default_run_dir(m).name for m, *_ in runs]
    if len(set(dirs)) != len(dirs):
        raise UserError(f"--model and --control name the same run folder ({dirs[0]}): choose two different models")
    _check_demo_folder(out, dirs)
    for _, _, names, opts in runs:  # every option of both runs checked before either starts
        plan(names, args, opts)
    for (model, _, names, opts), d in zip(runs, dirs):
        sub = argparse.Namespace(**{**vars(args), "model": model, "out": str(out / d)})
        run_experiments(names, sub, opts, resume=args.resume)
        print(f"{model}: results in {out / d}")
    if gt is None:
        return out / dirs[0] / "report.html"
    write_demo_file(out, [{"model": m, "dir": d, "role": role} for (m, role, *_), d in zip(runs, dirs)])
    return write_comparison(out)
