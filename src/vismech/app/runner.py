"""Run a list of experiments on one model into one run directory: ``manifest.json``, ``results/``, ``figures/``,
``units/`` (resumable pieces of long experiments) and ``report.html``.

Every option is checked before anything is written. Finished work is written atomically as it finishes, its
SHA-256 recorded in the manifest first (``rundir.Ledger``): each experiment's summary goes to ``results/NAME.json``
last, after its tables and figures, so its presence marks the experiment done; long experiments store their pieces
with ``Context.unit``. ``--resume`` reuses what is on disk and still matches its checksum, recomputes the rest (one
line says what and why), and gives the same final results as an uninterrupted run. A run directory made with other
options, another vismech version or other weights (``checkpoint_fingerprint``) is refused, never mixed; a run
holds ``OUT/.lock`` while it works, so a second run into the same directory is refused. A run that stops before
storing any work leaves the directory as it found it.
"""

from __future__ import annotations

import json
import logging
import platform
import re
import subprocess
import time
from pathlib import Path

from vismech.version import __version__
from vismech.errors import UserError
from vismech.experiments import get
from vismech.experiments.common import Context, notice
from vismech.experiments.options import check_options
from vismech.store.io import json_text, write_json
from vismech.store.results import Stored, file_stem
from vismech.store.rundir import Ledger, Lock, fingerprint, output_dir

log = logging.getLogger("vismech")

#: manifest keys that must match for a run directory to be resumed
IDENTITY = ("model", "dtype", "prompt_format", "seed", "batch_size", "experiments", "options", "vismech",
            "checkpoint")


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


def plan(names: list[str], args, overrides: dict) -> tuple[list, dict]:
    """The experiment modules and their resolved options, every value checked (``experiments.options``); unknown
    options and bad values are a ``UserError``. A key ``KEY`` sets option KEY of every experiment that takes it;
    ``NAME.KEY`` sets it for experiment NAME alone, and wins over ``KEY`` there."""
    mods = [get(n) for n in names]
    options, used = {}, set()
    for m in mods:
        given = {k: v for k, v in overrides.items() if k in m.DEFAULTS}
        own = {k[len(m.NAME) + 1:]: v for k, v in overrides.items() if k.startswith(m.NAME + ".")}
        used |= set(given) | {f"{m.NAME}.{k}" for k in own}
        options[m.NAME] = json.loads(json.dumps(check_options(m, {**given, **own})))
    unused = sorted(set(overrides) - used)
    if unused:
        raise UserError(f"option(s) {', '.join(unused)} are not taken by any of {', '.join(names)}")
    return mods, options


def checkpoint_fingerprint(model: str) -> dict | str:
    """What identifies the weights of ``model``: the hashes of a local or cached checkpoint's files
    (``rundir.fingerprint``); ``tiny:``/``random:`` models are built from their name and seed."""
    from vismech.models.load import checkpoint_path

    if model.startswith(("tiny:", "random:")):
        return model
    path = checkpoint_path(model)
    if not Path(path).is_dir():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
        except Exception:  # not a valid repo id: load_vlm has already refused it
            cached = None
        if not isinstance(cached, str):
            return model
        path = str(Path(cached).parent)
    return fingerprint(path)


_OTHER_WEIGHTS = ("the weights of {model} are not those {out} was made with (their checksums differ); resuming "
                  "would mix two models' results. Use a new --out")


def _holds_work(out: Path) -> bool:
    return any(p.is_file() for d in ("results", "units") if (out / d).is_dir() for p in (out / d).iterdir())


def _open_run(out: Path, identity: dict, resume: bool) -> tuple[dict | None, Lock, bool]:
    """Rank 0: check ``out``, take its lock and decide: the old manifest to resume, or None for a fresh run (also
    when the directory holds no finished work). ``UserError`` when the directory cannot be used."""
    output_dir(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = Lock(out).acquire()  # refused: the directory belongs to the run holding the lock, leave it alone
    try:
        mpath = out / "manifest.json"
        if not mpath.exists() or not _holds_work(out):
            return None, lock, created
        if not resume:
            raise UserError(f"{out} already holds a run; pass --resume to continue it, or choose a new --out")
        try:
            old = json.loads(mpath.read_text())
            assert isinstance(old, dict)
        except (ValueError, AssertionError):
            raise UserError(f"{mpath} is damaged, so the stored results cannot be checked; choose a new --out") \
                from None
        diff = [k for k in IDENTITY if old.get(k) != identity[k]]
        if diff == ["checkpoint"]:
            raise UserError(_OTHER_WEIGHTS.format(model=identity["model"], out=out))
        if diff:
            raise UserError(f"{out} was made with different {', '.join(diff)}; resuming would mix results. "
                            "Use the same options, or a new --out")
        return old, lock, created
    except BaseException:
        _abandon(out, lock, created)
        raise


def _abandon(out: Path, lock: Lock, created: bool) -> None:
    """Leave ``out`` as it was when a run stops before any work is stored: release the lock, and remove what the
    run created (its lock file, and the directory when the run made it)."""
    if not _holds_work(out) and lock.created and lock.fd is not None:
        lock.path.unlink(missing_ok=True)
    lock.release()
    if _holds_work(out):
        return
    if created:
        for p in sorted(out.rglob("*"), key=lambda p: -len(p.parts)):  # deepest first
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
        out.rmdir()


def _agree(fn, *a):
    """``fn(*a)`` on rank 0, its ``UserError`` raised on every process (the others get None, or an error when rank
    0 failed otherwise, so that no process waits for one that has stopped)."""
    from vismech import distributed

    result, err, bug = None, None, None
    if distributed.is_main():
        try:
            result = fn(*a)
        except UserError as e:
            err = (UserError, str(e))
        except Exception as e:
            err, bug = (RuntimeError, f"rank 0 failed: {e!r}"), e
    err = distributed.from_main(err)
    if bug is not None:
        raise bug
    if err is not None:
        raise err[0](err[1])
    return result


def _stored(ledger: Ledger, manifest: dict, name: str, done: Path) -> str | None:
    """Rank 0: None when experiment ``name`` has not finished; "ok" when every file it wrote still has its
    checksum; else which file is wrong."""
    if not done.exists() and not done.is_symlink():
        return None
    files = manifest.get("outputs", {}).get(name)
    if not files:
        return f"{ledger.rel(done)} has no record of its files in the manifest"
    for rel in files:
        why = ledger.problem(ledger.out / rel)
        if why:
            return f"{rel} {why}"
    return "ok"


def _reset_peak_memory() -> None:
    import torch

    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        torch.cuda.reset_peak_memory_stats(i)


def _peak_memory_gib() -> float | None:
    """The largest GPU memory any one device held (allocated by torch) since the last reset; None without CUDA."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return None
    return round(max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2 ** 30, 3)


def run_experiments(names: list[str], args, overrides: dict, resume: bool = False, vlm=None,
                    summaries: dict | None = None) -> Path:
    """Run experiments ``names`` into ``args.out`` (``args``: model, dtype, device, device_map, prompt_format,
    trust_remote_code, seed, batch_size, out); ``overrides`` set options of every experiment that takes them.
    ``vlm``, when given, is used instead of loading ``args.model`` (whose name still identifies the run).
    Each experiment's summary is put in ``summaries`` (by name) when a dict is given. Returns the run directory."""
    from vismech import distributed
    from vismech.models.load import load_vlm

    summaries = {} if summaries is None else summaries
    out = Path(args.out) if args.out else default_run_dir(args.model)
    mods, options = plan(names, args, overrides)
    identity = {"model": args.model, "dtype": args.dtype, "prompt_format": args.prompt_format, "seed": args.seed,
                "batch_size": args.batch_size, "experiments": names, "options": options, "vismech": __version__,
                "checkpoint": checkpoint_fingerprint(args.model)}
    opened = _agree(_open_run, out, identity, resume)
    old, lock, created = opened if opened else (None, Lock(out), False)
    try:
        vlm = vlm if vlm is not None else load_vlm(
            args.model, dtype=args.dtype, device=args.device, device_map=args.device_map,
            prompt_format=args.prompt_format, trust_remote_code=args.trust_remote_code, seed=args.seed)
        identity["checkpoint"] = checkpoint_fingerprint(args.model)  # a hub model may be in the cache only now
        if old is not None and old.get("checkpoint") != identity["checkpoint"]:
            raise UserError(_OTHER_WEIGHTS.format(model=args.model, out=out))
        manifest = old or {**identity, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_seconds": {}}
        manifest.update(device=str(vlm.device), versions=_versions(), git_revision=_git_revision(),
                        framing=vlm.framing_record(args.seed))
        manifest.pop("finished", None)
        mpath = out / "manifest.json"
        ledger = Ledger(out, manifest.setdefault("checksums", {}), lambda: write_json(manifest, mpath))
        outputs = manifest.setdefault("outputs", {})
        shared: dict = {}
        for m in mods:
            distributed.barrier()
            done = out / "results" / f"{file_stem(m.NAME)}.json"
            state = distributed.from_main(_stored(ledger, manifest, m.NAME, done) if distributed.is_main() else None)
            if state == "ok":
                log.info("[%s] already done, skipped", m.NAME)
                summaries[m.NAME] = json.loads(done.read_text())
                continue
            if state is not None:
                notice(f"[{m.NAME}] {state}; running it again (its stored units are reused)")
            ctx = Context(vlm, out, options[m.NAME], seed=args.seed, batch_size=args.batch_size, shared=shared,
                          ledger=ledger, show_progress=getattr(args, "progress", True), model=args.model,
                          experiment=m.NAME)
            t0 = time.time()
            _reset_peak_memory()
            summary = run_one(m, ctx, figures=getattr(args, "figures", True))
            manifest["wall_seconds"][m.NAME] = round(time.time() - t0, 2)
            manifest.setdefault("peak_gpu_gib", {})[m.NAME] = _peak_memory_gib()
            outputs[m.NAME] = [ledger.rel(p) for p in ctx.written + [done] if p.parent.name != "units"]
            ctx.write_file(done, json_text(summary).encode())  # its checksum (and the manifest) go first
            summaries[m.NAME] = summary
            log.info("[%s] done in %.1fs%s", m.NAME, manifest["wall_seconds"][m.NAME], _one_line(m, summary))
        manifest["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json(manifest, mpath)
        from vismech.app.report import write_report

        write_report(out)
    except BaseException:
        if distributed.is_main():
            _abandon(out, lock, created)
        raise
    finally:
        lock.release()
    return out


def run_one(module, ctx: Context, figures: bool = True) -> dict:
    """Run one experiment in ``ctx`` and draw its figures from what it stored (``draw``; not with ``figures``
    False: ``vismech plot`` draws them later); returns its summary as it will be stored (JSON types)."""
    from vismech import distributed

    summary = json.loads(json_text(module.run(ctx)))
    if figures and distributed.is_main():
        draw(module, Stored(ctx.out, module.NAME, summary, model=ctx.model or getattr(ctx.vlm, "name", None)), ctx)
    return summary


def draw(module, stored: Stored, ctx: Context) -> list[Path]:
    """Draw the figures of one experiment from its stored results (the module's ``plot(stored)``: figure name ->
    matplotlib figure) and save them through ``ctx`` (PNG and PDF, checksums in the manifest)."""
    plot = getattr(module, "plot", None)
    paths: list[Path] = []
    for name, fig in (plot(stored) if plot else {}).items():
        paths += ctx.save_figure(fig, name)
    return paths


def _one_line(module, summary: dict) -> str:
    fn = getattr(module, "caption", None)
    if fn is None:
        return ""
    try:
        return ": " + fn(summary).split("\n")[0]
    except Exception:  # a caption must never fail a finished run
        return ""
