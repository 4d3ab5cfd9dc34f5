"""Run a list of experiments on one model into one run directory: ``manifest.json``, ``results/``, ``figures/``.

Every experiment's summary is written to ``results/NAME.json`` as soon as it finishes, so an interrupted run keeps
all finished experiments on disk.
"""

from __future__ import annotations

import platform
import re
import time
from pathlib import Path

from vismech import __version__
from vismech.experiments import get
from vismech.experiments.common import Context, resolve_options
from vismech.io import write_json


def _versions() -> dict[str, str]:
    import numpy
    import torch
    import transformers

    return {"vismech": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def default_run_dir(model: str) -> Path:
    return Path("runs") / re.sub(r"[^A-Za-z0-9_.-]+", "_", model)


def run_experiments(names: list[str], args, overrides: dict) -> Path:
    from vismech.models.load import load_vlm

    out = Path(args.out) if args.out else default_run_dir(args.model)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"cannot write to the run directory {out}: {e.strerror}; choose another --out") from None
    vlm = load_vlm(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
                   prompt_format=args.prompt_format, trust_remote_code=args.trust_remote_code)
    mods = [get(n) for n in names]
    options = {}
    for m in mods:
        given = {k: v for k, v in overrides.items() if k in m.DEFAULTS}
        options[m.NAME] = resolve_options(m.DEFAULTS, given)
    manifest = {"model": args.model, "dtype": args.dtype, "device": str(vlm.device), "prompt_format":
                args.prompt_format, "seed": args.seed, "batch_size": args.batch_size, "experiments": names,
                "options": options, "versions": _versions(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "wall_seconds": {}}
    write_json(manifest, out / "manifest.json")
    shared: dict = {}
    for m in mods:
        ctx = Context(vlm, out, options[m.NAME], seed=args.seed, batch_size=args.batch_size, shared=shared)
        t0 = time.time()
        summary = m.run(ctx)
        manifest["wall_seconds"][m.NAME] = round(time.time() - t0, 2)
        write_json(summary, out / "results" / f"{m.NAME}.json")
        write_json(manifest, out / "manifest.json")
        print(f"[{m.NAME}] done in {manifest['wall_seconds'][m.NAME]:.1f}s")
    manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(manifest, out / "manifest.json")
    return out
