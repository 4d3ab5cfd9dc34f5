"""Run a list of experiments on one model into one run directory: ``manifest.json``, ``results/``, ``figures/``,
``units/`` (resumable pieces of long experiments) and ``report.html``.

Finished work is written atomically as it finishes: each experiment's summary goes to ``results/NAME.json`` last,
after its tables and figures, so its presence marks the experiment done; long experiments store their pieces with
``Context.unit``. ``--resume`` skips what is on disk and gives the same final results as an uninterrupted run. A run
directory made with different options is refused, never mixed.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import time
from pathlib import Path

from vismech import __version__
from vismech.experiments import get
from vismech.experiments.common import Context, resolve_options
from vismech.io import write_json

#: manifest keys that must match for a run directory to be resumed
IDENTITY = ("model", "dtype", "prompt_format", "seed", "batch_size", "experiments", "options")


def _versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    return {"vismech": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def default_run_dir(model: str) -> Path:
    return Path("runs") / re.sub(r"[^A-Za-z0-9_.-]+", "_", model)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to the run directory {out}: {e.strerror}; choose another --out") from None


def plan(names: list[str], args, overrides: dict) -> tuple[list, dict]:
    """The experiment modules and their resolved options; unknown options are an error."""
    mods = [get(n) for n in names]
    options, used = {}, set()
    for m in mods:
        given = {k: v for k, v in overrides.items() if k in m.DEFAULTS}
        used |= set(given)
        options[m.NAME] = json.loads(json.dumps(resolve_options(m.DEFAULTS, given)))
    unused = sorted(set(overrides) - used)
    if unused:
        raise ValueError(f"option(s) {', '.join(unused)} are not taken by any of {', '.join(names)}")
    return mods, options


def run_experiments(names: list[str], args, overrides: dict, resume: bool = False) -> Path:
    from vismech.models.load import load_vlm

    out = Path(args.out) if args.out else default_run_dir(args.model)
    mods, options = plan(names, args, overrides)
    identity = {"model": args.model, "dtype": args.dtype, "prompt_format": args.prompt_format, "seed": args.seed,
                "batch_size": args.batch_size, "experiments": names, "options": options}
    mpath = out / "manifest.json"
    from vismech import distributed

    distributed.barrier()  # every process sees the same directory state before deciding to resume
    if mpath.exists() and distributed.world() > 1 and not resume and not distributed.is_main():
        resume = True  # rank 0 may already have written this run's manifest
    if mpath.exists():
        old = json.loads(mpath.read_text())
        if not resume:
            raise ValueError(f"{out} already holds a run; pass --resume to continue it, or choose a new --out")
        diff = [k for k in IDENTITY if old.get(k) != identity[k]]
        if diff:
            raise ValueError(f"{out} was made with different {', '.join(diff)}; resuming would mix results. "
                             "Use the same options, or a new --out")
        manifest = old
    else:
        manifest = {**identity, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_seconds": {}}
    created = not out.exists()
    _check_writable(out)
    try:
        vlm = load_vlm(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                       prompt_format=args.prompt_format, trust_remote_code=args.trust_remote_code, seed=args.seed)
    except BaseException:
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()  # leave nothing behind for a model that could not be loaded
        raise
    manifest.update(device=str(vlm.device), versions=_versions(), git_revision=_git_revision(),
                    framing=vlm.framing_record(args.seed))
    manifest.pop("finished", None)
    write_json(manifest, mpath)
    shared: dict = {}
    for m in mods:
        distributed.barrier()
        done = out / "results" / f"{m.NAME}.json"
        if done.exists():
            print(f"[{m.NAME}] already done, skipped")
            continue
        ctx = Context(vlm, out, options[m.NAME], seed=args.seed, batch_size=args.batch_size, shared=shared)
        t0 = time.time()
        summary = m.run(ctx)
        manifest["wall_seconds"][m.NAME] = round(time.time() - t0, 2)
        write_json(summary, done)
        write_json(manifest, mpath)
        print(f"[{m.NAME}] done in {manifest['wall_seconds'][m.NAME]:.1f}s" + _one_line(m, summary))
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(manifest, mpath)
    from vismech.report import write_report

    write_report(out)
    return out


def _one_line(module, summary: dict) -> str:
    fn = getattr(module, "caption", None)
    if fn is None:
        return ""
    try:
        return ": " + fn(summary).split("\n")[0]
    except Exception:  # a caption must never fail a finished run
        return ""
