"""What every experiment shares: its run context (model, options, output folders, progress) and how it saves.

An experiment is a module in ``vismech.experiments`` with ``NAME``, ``DESCRIPTION``, ``DEFAULTS`` (its options
and their default values) and ``run(ctx) -> dict`` (a JSON-able summary). It writes tidy tables with
``ctx.save_table`` and figures with ``ctx.save_figure``; it never loads a model or registers a hook itself.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vismech.io import atomic_write, write_csv, write_json


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

    def unit(self, key: str, compute):
        """A resumable unit of work: ``compute()`` once, its result stored atomically under ``units/``; a resumed
        run loads the stored result instead of recomputing. ``key`` names the unit within this run (include every
        option the result depends on that is not fixed for the run). Results may hold tensors, arrays, lists."""
        import io as _io

        import torch

        path = self.out / "units" / (re.sub(r"[^A-Za-z0-9_.=-]+", "_", key) + ".pt")
        if path.exists():
            return torch.load(path, weights_only=False)
        value = compute()
        buf = _io.BytesIO()
        torch.save(value, buf)
        atomic_write(path, buf.getvalue())
        return value

    def save_table(self, name: str, rows: list[dict]) -> Path:
        """Write ``results/NAME.csv`` (long format: one row per measurement with its condition columns)."""
        return write_csv(rows, self.results_dir / f"{name}.csv")

    def save_json(self, name: str, obj: Any) -> Path:
        return write_json(obj, self.results_dir / f"{name}.json")

    def save_figure(self, fig, name: str) -> list[Path]:
        """Save a matplotlib figure as PNG and PDF under ``figures/`` and close it."""
        import matplotlib.pyplot as plt

        from vismech import distributed

        if not distributed.is_main():
            plt.close(fig)
            return []
        self.figures_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        for ext in ("png", "pdf"):
            p = self.figures_dir / f"{name}.{ext}"
            tmp = p.with_name(f".{p.name}.tmp.{ext}")
            fig.savefig(tmp, dpi=150, bbox_inches="tight")
            tmp.replace(p)
            paths.append(p)
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


def resolve_options(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Defaults overridden by ``given``; unknown option names are a clear error."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; this experiment takes {', '.join(sorted(defaults))}")
    return {**defaults, **given}
