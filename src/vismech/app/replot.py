"""``vismech plot RUN_DIR``: redraw every figure of a run from its stored results (no model, no recomputation).

Each finished experiment's ``plot(stored)`` draws from ``results/`` alone, exactly as during the run; the new
figures replace the old ones (their checksums go to the manifest) and the report is rebuilt. Use it after
changing the figure style, or to get back figures that were deleted.
"""

from __future__ import annotations

import json
from pathlib import Path

from vismech.errors import UserError
from vismech.store.io import write_json
from vismech.store.results import Stored, file_stem
from vismech.store.rundir import Ledger, Lock, output_dir


def replot(run_dir: str | Path) -> list[Path]:
    """Redraw the figures of every finished experiment of ``run_dir``; returns the figure files written."""
    from vismech.app.report import write_report
    from vismech.app.runner import draw
    from vismech.experiments import EXPERIMENTS, get
    from vismech.experiments.common import Context

    run = Path(run_dir)
    mpath = run / "manifest.json"
    if not mpath.is_file() or mpath.is_symlink():
        raise UserError(f"{run} is not a vismech run directory (no manifest.json)")
    output_dir(run, "run directory")
    try:
        manifest = json.loads(mpath.read_text())
        assert isinstance(manifest, dict)
    except (ValueError, AssertionError):
        raise UserError(f"{mpath} is damaged (not a vismech manifest); the run's figures cannot be redrawn") from None
    lock = Lock(run).acquire()
    ok = False
    try:
        ledger = Ledger(run, manifest.setdefault("checksums", {}), lambda: write_json(manifest, mpath))
        outputs = manifest.setdefault("outputs", {})
        written: list[Path] = []
        for name in manifest.get("experiments", []):
            summary = run / "results" / f"{file_stem(name)}.json"
            if name not in EXPERIMENTS or not summary.is_file() or ledger.problem(summary):
                continue  # not finished (or damaged): `vismech run --resume` redraws it when it recomputes it
            for rel in [r for r in outputs.get(name, []) if r.startswith("figures/")]:
                (run / rel).unlink(missing_ok=True)
                ledger.sums.pop(rel, None)
            ctx = Context(None, run, {}, ledger=ledger, model=manifest.get("model", ""), experiment=name)
            paths = draw(get(name), Stored(run, name), ctx)
            outputs[name] = [r for r in outputs.get(name, []) if not r.startswith("figures/")] + \
                [ledger.rel(p) for p in paths]
            written += paths
        write_json(manifest, mpath)
        write_report(run)
        ok = True
    finally:
        if not ok and lock.created:
            lock.path.unlink(missing_ok=True)
        lock.release()
    return written
