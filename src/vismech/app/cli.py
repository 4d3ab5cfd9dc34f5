"""The ``vismech`` command line. Every command has ``--help``; user errors (``vismech.errors.UserError`` and bad
arguments) exit with code 2 and one line on stderr, before anything is written; ``--debug`` adds the traceback.
Numeric arguments are checked by the same rules as experiment options (``vismech.experiments.options``)."""

from __future__ import annotations

import argparse
import ast
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from vismech.errors import UserError
from vismech.experiments.options import SEED, Opt, arg_type
from vismech.app.arguments import (MODEL_HELP, Parser, WithFamilies, add_load_args, add_model_args, add_trials,
                                   add_verbosity, grid)
from vismech.app.train_cli import add_train_parser
from vismech.store.rundir import output_dir
from vismech.version import __version__

def _check_model_args(args) -> None:
    """What can be checked about the model arguments before loading anything (a model is named, the device)."""
    from vismech.models.load import resolve_device

    if hasattr(args, "model") and not args.model:
        raise UserError("name a model with --model: " + MODEL_HELP)
    resolve_device(args.device)


def _load(args):
    from vismech.models.load import load_vlm

    return load_vlm(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                    prompt_format=args.prompt_format, trust_remote_code=args.trust_remote_code)


def cmd_models(args) -> int:
    from vismech.models.families import FAMILIES
    from vismech.models.load import ORGANISMS
    from vismech.models.presets import PRESETS

    print("families (tiny:FAMILY builds a tiny random one):")
    for name, fam in FAMILIES.items():
        note = "" if fam.spatial_tokens else "  (no per-patch image tokens: object-token analyses unavailable)"
        print(f"  {name:18s} {fam.class_name}{note}")
    print("presets (random:PRESET, real-size architecture with random weights):")
    width = max(map(len, PRESETS)) + 1
    for name, p in PRESETS.items():
        print(f"  {name:{width}s} {p.family:16s} {p.published_params / 1e9:.2f}B params")
    print("organisms (trained by vismech, shipped inside the package):")
    for name, fam in ORGANISMS.items():
        print(f"  {name:18s} {fam}")
    return 0


def cmd_stimuli(args) -> int:
    from vismech.models.load import geometry_for
    from vismech.scenes import photoreal
    from vismech.scenes.stimuli import TASK_GENERATORS, generate, write_stimuli

    if args.task not in TASK_GENERATORS and args.task not in photoreal.set_names():
        raise UserError(f"unknown task {args.task!r}; choose one of {', '.join(TASK_GENERATORS)}, "
                        f"{', '.join(photoreal.set_names())}")
    output_dir(args.out)
    geometry = geometry_for(args.model)
    if args.task in photoreal.set_names():  # rendered with Mitsuba 3 at the model's patch-aligned size, cached
        size = photoreal.canvas_px(geometry)
        items, seconds = photoreal.render_items(photoreal.generate(args.task, args.n, args.seed), size, args.spp)
        if seconds:
            print(f"rendered {len(seconds)} images of {size}x{size} px at {args.spp} samples per pixel, "
                  f"{sum(seconds) / len(seconds):.2f} s per image (the rest came from {photoreal.cache_dir()})")
    else:
        items = generate(args.task, args.grid, args.n, args.seed)
    write_stimuli(items, geometry, args.out)
    print(f"wrote {len(items)} {args.task} items to {args.out}")
    return 0


def cmd_inspect(args) -> int:
    import json

    from vismech.app.inspection import inspect, report
    from vismech.models.load import load_vlm

    vlm = load_vlm(args.model, dtype=args.dtype, device=args.device, prompt_format="chat",
                   trust_remote_code=args.trust_remote_code, seed=args.seed)
    rec = inspect(vlm, n=args.n, seed=args.seed)
    print(report(rec))
    if args.out:
        Path(args.out).write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
    return 0


def cmd_eval(args) -> int:
    from tqdm import tqdm

    from vismech.engine import evaluate
    from vismech.store.io import write_csv, write_json
    from vismech.store.results import tidy
    from vismech.scenes.stimuli import TASK_GENERATORS, generate

    bad = [t for t in args.task if t not in TASK_GENERATORS]
    if bad:
        raise UserError(f"unknown task {bad[0]!r}; choose from {', '.join(TASK_GENERATORS)}")
    out = output_dir(args.out)
    _check_model_args(args)
    if args.stimuli:  # a stimulus folder (images + manifest.json) instead of generated tasks
        from vismech.experiments.sources import Source

        sets = {"stimuli": Source(args.stimuli).folder_trials("eval")}
    else:
        sets = {task: generate(task, args.grid, args.n, args.seed) for task in args.task}
    vlm = _load(args)
    t0 = time.time()
    rows: list[dict] = []
    with tqdm(total=sum(map(len, sets.values())), desc="eval", unit="trial") as bar:
        for trials in sets.values():  # trials.csv grows after each task, so an interruption loses one task at most
            for r in evaluate.evaluate(vlm, trials, args.batch_size, generate=not args.no_generate,
                                        progress=bar.update):
                rows.append({**r, "trial": len(rows)})
            write_csv(tidy(rows, args.model, "eval", "eval_trials"), out / "trials.csv")
    summary = evaluate.summarize(rows)
    cells = evaluate.summarize(rows, by=("task", "grid", "entropy", "target_cell"))
    write_csv(tidy(summary + cells, args.model, "eval", "eval"), out / "accuracy.csv")  # the run's table shape
    write_json({"model": args.model, "prompt_format": args.prompt_format, "dtype": args.dtype, "seed": args.seed,
                "tasks": args.task, "n": args.n, "grid": list(args.grid), "seconds": time.time() - t0,
                "framing": vlm.framing_record(args.seed), "accuracy": summary}, out / "summary.json")
    for s in summary:
        print(f"{s['task']:18s} {s['grid']} {s['entropy'] or '-':5s} {s['measure']:12s} "
              f"{s['value']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}] n={s['n']}")
    print(f"results in {out}")
    return 0


def _parse_sets(pairs: list[str]) -> dict:
    import json

    out = {}
    for kv in pairs:
        if "=" not in kv:
            raise UserError(f"--set takes KEY=VALUE, not {kv!r}")
        k, v = kv.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def experiment_list() -> str:
    """One line per experiment (name and description), read from the modules' source without importing them."""
    from vismech.experiments import EXPERIMENTS, NOT_IN_ALL

    here = Path(__file__).resolve().parent.parent / "experiments"
    lines = []
    for name, rel in EXPERIMENTS.items():
        tree = ast.parse((here / (rel.lstrip(".") + ".py")).read_text())
        desc = next((n.value.value for n in tree.body if isinstance(n, ast.Assign) and
                     getattr(n.targets[0], "id", None) == "DESCRIPTION"), "")
        lines.append(f"  {name:18s} {desc}{' (not in all)' if name in NOT_IN_ALL else ''}")
    return "\n".join(lines)


def cmd_run(args) -> int:
    from vismech.experiments import EXPERIMENTS, NOT_IN_ALL, get
    from vismech.app.runner import run_experiments

    names = [n for n in EXPERIMENTS if n not in NOT_IN_ALL] if args.experiments == ["all"] else args.experiments
    for n in names:
        if n not in EXPERIMENTS:
            raise UserError(f"unknown experiment {n!r}; choose from {', '.join(EXPERIMENTS)} or all")
    if getattr(args, "help_options", False):
        from vismech.experiments.options import option_help

        print("\n\n".join(option_help(get(n)) for n in names))
        return 0
    overrides = _parse_sets(args.set or [])
    if args.n is not None:
        overrides.setdefault("n", args.n)
    for key in ("stimuli", "images"):  # --stimuli DIR / --images DIR: the same as --set KEY=DIR
        if getattr(args, key, None):
            overrides.setdefault(key, getattr(args, key))
    _check_model_args(args)
    run_dir = run_experiments(names, args, overrides, resume=args.resume)
    print(f"results in {run_dir}")
    print(f"report: {run_dir / 'report.html'}")
    return 0


def cmd_demo(args) -> int:
    from vismech.app.demo import run_demo

    given = _parse_sets(args.set or [])
    if args.n is not None:
        given.setdefault("n", args.n)
    _check_model_args(args)
    page = run_demo(args, given)
    print(f"report: {page}")
    return 0


def cmd_report(args) -> int:
    from vismech.app.compare import FILE, write_comparison
    from vismech.app.replot import replot
    from vismech.app.report import write_report

    if (Path(args.run_dir) / FILE).exists() and not (Path(args.run_dir) / "manifest.json").exists():  # a demo
        print(f"report: {write_comparison(args.run_dir)}")
        return 0
    if args.replot:  # replot rebuilds the report too
        print(f"{len(replot(args.run_dir))} figure files redrawn in {Path(args.run_dir) / 'figures'}")
    path = write_report(Path(args.run_dir))
    print(f"report: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="vismech", description="Find, measure and edit the position-ID binding mechanisms of "
               "vision-language models.")
    p.add_argument("--version", action="version", version=f"vismech {__version__}")
    add_verbosity(p)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list supported families, presets and organisms")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("stimuli", help="write a stimulus set (images + manifest.json)")
    s.add_argument("task", help="scene_description, color_retrieval, spatial_relation, counting, pca, relabs, "
                   "entropy-low, entropy-high, cma-id_retrieval, cma-id_selection, cma-feature_retrieval, "
                   "photoreal, photoreal-cma-id_retrieval, photoreal-cma-id_selection, "
                   "photoreal-cma-feature_retrieval (photoreal: rendered with Mitsuba 3)")
    s.add_argument("--grid", type=grid, default=(2, 2))
    s.add_argument("--model", default="qwen2_5_vl",
                   help=WithFamilies("family (%(families)s) or any --model value whose token geometry to "
                                      "render for"))
    add_trials(s, 10, "trials (K per identity x cell for the K x N x N sets)")
    s.add_argument("--seed", type=arg_type(SEED, "--seed"), default=0)
    s.add_argument("--spp", type=arg_type(Opt("int", 1, 1 << 16), "--spp"), default=64,
                   help="photoreal sets: path-tracing samples per pixel")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_stimuli)

    s = sub.add_parser("inspect", help="how vismech frames and scores MODEL: one framed trial per task, patched "
                       "positions, answer tokens, chat-vs-plain accuracy")
    s.add_argument("model", help=MODEL_HELP)
    add_trials(s, 8, "trials per task for the chat-vs-plain accuracy")
    s.add_argument("--seed", type=int, default=0)
    add_load_args(s)
    s.add_argument("--out", default=None, help="also write the result as JSON here")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("eval", help="behavioural accuracy by task, grid, entropy and target cell")
    add_model_args(s)
    s.add_argument("--task", nargs="+", default=["scene_description"])
    s.add_argument("--grid", type=grid, default=(2, 2))
    add_trials(s, 20, "trials per task")
    s.add_argument("--seed", type=arg_type(SEED, "--seed"), default=0)
    s.add_argument("--no-generate", action="store_true", help="first-token accuracy only (faster)")
    s.add_argument("--stimuli", default=None, metavar="DIR", help="evaluate the trials of a stimulus folder "
                   "(images + manifest.json, e.g. from `vismech stimuli`; see vismech.scenes.manifest) instead of "
                   "--task")
    s.add_argument("--out", default="runs/eval")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("run", help="run experiments (names, or all) and write results, figures and a manifest",
                       epilog="experiments:\n" + experiment_list() + "\n\nvismech run EXPERIMENT --help-options "
                       "lists an experiment's options with their defaults and meanings",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("experiments", nargs="+", help="experiment names (listed below), or all")
    s.add_argument("--help-options", action="store_true",
                   help="list each option of the named experiments with its default and meaning, and exit")
    add_model_args(s)
    s.add_argument("--out", default=None, help="run directory (default runs/<model>)")
    add_trials(s, None, "trials per condition, passed to every experiment (its option n)")
    s.add_argument("--seed", type=arg_type(SEED, "--seed"), default=0)
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override an experiment option (JSON values), e.g. --set grid=[3,3]; NAME.KEY sets it for "
                   "experiment NAME alone, e.g. --set cma.n=8")
    s.add_argument("--no-figures", dest="figures", action="store_false", help="store the results and the report "
                   "without drawing figures (faster; `vismech plot OUT` draws them from the results later)")
    s.add_argument("--resume", action="store_true", help="continue an interrupted run in --out, skipping "
                   "finished work (refused if the options differ)")
    s.add_argument("--stimuli", default=None, metavar="DIR", help="run on a stimulus folder (images + "
                   "manifest.json; see vismech.scenes.manifest): the same as --set stimuli=DIR (rsa, pca, cma, "
                   "id-intervention, key-intervention)")
    s.add_argument("--images", default=None, metavar="DIR", help="coco: a folder of JPEG/PNG images (COCO val2017 "
                   "or any); the same as --set images=DIR")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("demo", help="the README's first command: every experiment on organism-ids (planted position "
                       "IDs) and the comparable ones on a control without them, quickly, and a page setting the two "
                       "side by side")
    add_model_args(s)
    s.set_defaults(model="organism-ids")
    s.add_argument("--control", default="organism", help="the model shown beside --model, scored against its "
                   "declared ground truth (default organism, which has no position IDs); none: no control")
    s.add_argument("--out", default="runs/demo", help="one folder per model inside it, and report.html comparing them")
    add_trials(s, None, "trials per condition (the demo's own: 4)")
    s.add_argument("--seed", type=arg_type(SEED, "--seed"), default=0)
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override an option (JSON values); "
                   "NAME.KEY sets it for experiment NAME alone, e.g. --set recovery.rsa_n=192")
    s.add_argument("--fresh", dest="resume", action="store_false",
                   help="refuse an existing --out instead of continuing it (by default a demo continues)")
    s.set_defaults(fn=cmd_demo, resume=True)

    s = sub.add_parser("report", help="rebuild RUN_DIR/report.html from the stored results (a demo's folder: its "
                       "comparison page)")
    s.add_argument("run_dir")
    s.add_argument("--replot", action="store_true", help="redraw every figure from the stored results first")
    s.set_defaults(fn=cmd_report)
    s = sub.add_parser("plot", help="redraw every figure of RUN_DIR from its stored results (and the report)")
    s.add_argument("run_dir")
    s.set_defaults(fn=cmd_report, replot=True)

    add_train_parser(sub)
    for command in sub.choices.values():  # --debug, -q and -v are accepted after the command too
        add_verbosity(command, hidden=True)
    return p


def setup_logging(verbosity: int) -> None:
    """The ``vismech`` logger: progress messages to stdout, warnings to stderr as ``vismech: ...`` lines;
    ``verbosity`` < 0 keeps warnings only, > 0 adds debug messages."""
    log = logging.getLogger("vismech")
    for h in list(log.handlers):
        log.removeHandler(h)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    out.setFormatter(logging.Formatter("%(message)s"))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("vismech: %(message)s"))
    log.addHandler(out)
    log.addHandler(err)
    log.propagate = False
    log.setLevel(logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG)


def main(argv: list[str] | None = None) -> int:
    from vismech import distributed

    args = build_parser().parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")  # figures go to files; a library user's backend is left alone
    distributed.init()
    if not distributed.is_main():  # data parallel: one process speaks
        sys.stdout = open(os.devnull, "w")
    args.progress = not args.quiet
    setup_logging(args.verbose - args.quiet)
    try:
        return args.fn(args)
    except UserError as e:  # anything else is a bug and keeps its traceback
        if distributed.is_main():
            if args.debug:
                traceback.print_exc()
            print("vismech: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vismech: interrupted; finished results are on disk", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
