"""What every experiment shares: its run context (model, options, output folders, progress) and how it saves.

An experiment is a module in ``vismech.experiments`` with ``NAME``, ``DESCRIPTION``, ``DEFAULTS`` (its options
and their default values; an optional ``LIMITS`` beside it adds ranges and choices, see ``experiments.options``)
and ``run(ctx) -> dict`` (a JSON-able summary). It writes tidy tables with ``ctx.save_table`` (long format, the
core columns of ``store.results`` first) and arrays with ``ctx.save_arrays`` (with dimension names); everything it
writes gets its checksum in the run's manifest. Its figures come from ``plot(stored) -> {name: figure}``, which
reads only the stored results (``store.results.Stored``): the runner calls it after ``run``, and ``vismech plot
RUN_DIR`` calls it again without the model. An optional ``report_rows(stored)`` picks the rows the report shows.
It never loads a model or registers a hook itself.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vismech.errors import UserError
from vismech.store.io import atomic_write, csv_text, json_text

_MISSING = object()
#: no creation date in saved figures, so a redrawn figure has the same bytes as the first
_NO_DATE = {"png": {"Software": None}, "pdf": {"CreationDate": None, "ModDate": None}}


@dataclass
class Context:
    """One experiment's run: the loaded model, its options, where results go, and shared state of the run."""

    vlm: Any
    out: Path
    options: dict[str, Any]
    seed: int = 0
    batch_size: int = 16
    shared: dict[str, Any] = field(default_factory=dict)  # state other experiments of the same run reuse
    show_progress: bool = True
    ledger: Any = None  # a vismech.store.rundir.Ledger: checksums of what the run writes, checked before reuse
    written: list[Path] = field(default_factory=list)  # every file this experiment wrote, in order
    model: str = ""  # the run's model name (the ``model`` column of every table)
    experiment: str = ""  # the experiment's name (the ``experiment`` column; its files start with its stem)

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    def opt(self, key: str) -> Any:
        return self.options[key]

    @property
    def results_dir(self) -> Path:
        return self.out / "results"

    @property
    def figures_dir(self) -> Path:
        return self.out / "figures"

    def unit_key(self, name: str, options: dict[str, Any] | None = None, **extra: Any) -> str:
        """The key of a resumable unit: ``name`` plus a hash of the full option set (this experiment's, or
        ``options`` for a unit shared between experiments, such as the CMA scores), the run's seed and ``extra``
        (whatever else the unit's result depends on, e.g. the heads it edits), so a resumed run never reuses a
        unit computed under other options. The one way units are keyed."""
        import hashlib
        import json

        blob = json.dumps({"options": self.options if options is None else options, "seed": self.seed, **extra},
                          sort_keys=True, default=str)
        return f"{name}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"

    def unit(self, key: str, compute):
        """A resumable unit of work: ``compute()`` once, its result stored atomically under ``units/``; a resumed
        run loads the stored result instead of recomputing. ``key`` names the unit within this run (include every
        option the result depends on that is not fixed for the run). Results may hold tensors, arrays, lists,
        tuples, dicts and ``vismech.store.units.unit_type`` dataclasses; they are stored as safetensors plus JSON
        (``vismech.store.units``), never as pickles. A stored unit that fails its checksum or cannot be read is
        recomputed, with one line on stderr."""
        from vismech import distributed
        from vismech.store import units

        path = self.out / "units" / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", key) + ".safetensors")
        value, why = _MISSING, None
        if distributed.from_main(path.exists()):  # every process takes rank 0's decision
            why = self.ledger.problem(path) if self.ledger is not None else None
            if why is None:
                try:
                    value = units.loads(path.read_bytes())
                except units.DamagedUnit as e:
                    why = f"cannot be read ({e})"
            why = distributed.from_main(why)
            if why is not None:
                value = _MISSING
                notice(f"{path.relative_to(self.out)} {why}; computing it again")
        if value is not _MISSING:
            return value
        value = compute()
        self.write_file(path, units.dumps(value))
        return value

    def write_file(self, path: Path, data: bytes) -> Path:
        """Write ``data`` atomically, its checksum recorded in the run's ledger first; the path goes to
        ``written``."""
        if self.ledger is not None:
            self.ledger.record(path, data)
        self.written.append(path)
        return atomic_write(path, data)

    def _file(self, kind: str, name: str) -> str:
        """``name`` checked against the one naming scheme: the experiment's stem, or stem + "_" + part."""
        from vismech.store.results import file_stem

        stem = file_stem(self.experiment) if self.experiment else name
        if name != stem and not name.startswith(stem + "_"):
            raise ValueError(f"{kind} {name!r} of experiment {self.experiment!r} must be named {stem} or {stem}_*")
        return name

    def save_table(self, name: str, rows: list[dict]) -> Path:
        """Write ``results/NAME.csv``: long format, the core columns first (``store.results.tidy``)."""
        from vismech.store.results import tidy

        rows = tidy(rows, self.model or getattr(self.vlm, "name", ""), self.experiment, self._file("table", name))
        return self.write_file(self.results_dir / f"{name}.csv", csv_text(rows).encode())

    def save_json(self, name: str, obj: Any) -> Path:
        return self.write_file(self.results_dir / f"{self._file('JSON file', name)}.json", json_text(obj).encode())

    def save_arrays(self, name: str, arrays: dict[str, Any], dims: dict[str, tuple[str, ...]]) -> Path:
        """Write ``results/NAME.npz`` (compressed; ``numpy.load(path, allow_pickle=False)``) and
        ``results/NAME.dims.json``, the names of every array's dimensions (``store.results.read_arrays``)."""
        from vismech.store.results import arrays_bytes

        data, names = arrays_bytes(arrays, dims)
        self.write_file(self.results_dir / f"{self._file('arrays', name)}.dims.json", names)
        return self.write_file(self.results_dir / f"{name}.npz", data)

    def save_figure(self, fig, name: str) -> list[Path]:
        """Save a matplotlib figure as PNG and PDF under ``figures/`` and close it."""
        import io

        import matplotlib.pyplot as plt

        from vismech import distributed

        self._file("figure", name)
        if not distributed.is_main():
            plt.close(fig)
            return []
        paths = []
        for ext in ("png", "pdf"):
            buf = io.BytesIO()
            fig.savefig(buf, format=ext, dpi=200, bbox_inches="tight", metadata=_NO_DATE.get(ext))
            paths.append(self.write_file(self.figures_dir / f"{name}.{ext}", buf.getvalue()))
        plt.close(fig)
        return paths

    @contextlib.contextmanager
    def progress(self, total: int, desc: str) -> Iterator[Any]:
        """A tqdm bar (counts and ETA); yields its ``update`` function."""
        from tqdm import tqdm

        from vismech import distributed

        show = self.show_progress and distributed.is_main()
        with tqdm(total=total, desc=desc, unit="it", disable=not show, leave=False) as bar:
            yield bar.update


def notice(line: str) -> None:
    """One warning from the main process (what a resumed run recomputes, and why), through the ``vismech`` logger."""
    import logging

    from vismech import distributed

    if distributed.is_main():
        logging.getLogger("vismech").warning(line)


def resolve_options(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Defaults overridden by ``given``; unknown option names are a clear error."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)}; this experiment takes {', '.join(sorted(defaults))}")
    return {**defaults, **given}


def pct(r: dict | None) -> str:
    """A rate dict (``analysis.stats.rate``) as "62% [48, 74]" for captions; "n/a" without trials."""
    if not r or r["n"] == 0 or r["value"] != r["value"]:
        return "n/a"
    return f"{100 * r['value']:.0f}% [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}]"
