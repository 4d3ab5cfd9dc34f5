"""The shape of stored results: tidy tables with one set of core columns, arrays with named dimensions, and a
read-only view of one experiment's stored results (what its figures are drawn from).

- Every measurement table is long format: one row per measurement, the core columns first, in this order:
  ``model``, ``experiment``, ``measure`` (what was measured, e.g. ``accuracy``, ``pearson_r``, ``cma_score``),
  ``value``, ``ci_low``, ``ci_high`` (its interval; empty where the measure has none), ``n`` (trials or pairs it
  rests on); then the condition columns (layer, head, condition, k, alpha...). Per-trial records (tables named
  ``*_trials``) lead with ``model`` and ``experiment`` and hold one row per trial.
- Cells are numbers or words, never lists packed into strings: a grid cell is two columns (``*_row``,
  ``*_col``).
- Files are named after the experiment in snake case: ``results/NAME.json`` (summary), ``results/NAME*.csv``,
  ``results/NAME*.npz`` (+ ``.dims.json``), ``figures/NAME*.png|pdf`` (``file_stem``).
- Arrays are ``.npz`` with a sidecar ``NAME.dims.json`` naming each array's dimensions (``{"scores_id_selection":
  ["layer", "head", "pair"]}``), the shape xarray gives to a ``DataArray``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

#: the core columns of every measurement table, in order
CORE = ("model", "experiment", "measure", "value", "ci_low", "ci_high", "n")


def file_stem(experiment: str) -> str:
    """The stem every file of ``experiment`` starts with: its name in snake case (``binding-errors`` ->
    ``binding_errors``)."""
    return experiment.replace("-", "_")


def cell_columns(prefix: str, cell) -> dict[str, Any]:
    """A grid cell as two numeric columns ``PREFIX_row``, ``PREFIX_col`` (empty when ``cell`` is None)."""
    r, c = ("", "") if cell is None else (int(cell[0]), int(cell[1]))
    return {f"{prefix}_row": r, f"{prefix}_col": c}


def _split_cells(row: dict) -> dict:
    """Columns named ``*_cell`` holding a cell ("r,c" or a pair) become ``*_row`` and ``*_col``."""
    out = {}
    for k, v in row.items():
        if k.endswith("_cell") and (isinstance(v, (tuple, list)) or (isinstance(v, str) and ("," in v or v == ""))):
            cell = None if v == "" else tuple(int(x) for x in (v.split(",") if isinstance(v, str) else v))
            out.update(cell_columns(k[:-5], cell))
        else:
            out[k] = v
    return out


def tidy(rows: list[dict], model: str, experiment: str, table: str) -> list[dict]:
    """``rows`` with ``model`` and ``experiment`` set and the core columns first (``CORE`` order, then the others
    in first-seen order). A measurement table's rows must each name their ``measure`` and ``value``; a cell may
    not hold a list or a dict."""
    trials = table.endswith("_trials")
    rows = [_split_cells(r) for r in rows]
    cols: list[str] = []
    for r in rows:
        if not trials and ("measure" not in r or "value" not in r):
            raise ValueError(f"table {table}: every row needs 'measure' and 'value' (got {sorted(r)})")
        for k, v in r.items():
            if isinstance(v, (list, tuple, dict)):
                raise ValueError(f"table {table}: column {k!r} holds a {type(v).__name__}; split it into columns")
            if k not in cols:
                cols.append(k)
    core = ["model", "experiment"] + ([] if trials else list(CORE[2:]))
    order = core + [c for c in cols if c not in core]
    return [{c: {"model": model, "experiment": experiment}.get(c, r.get(c, "")) for c in order} for r in rows]


def number(v: str):
    """A CSV cell as a number where it is one (int, then float: "nan" and "inf" too), else the string."""
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a tidy CSV, numbers as numbers (an empty cell stays "")."""
    from vismech.store.io import read_csv

    return [{k: number(v) for k, v in row.items()} for row in read_csv(path)]


def arrays_bytes(arrays: dict[str, Any], dims: dict[str, tuple[str, ...]]) -> tuple[bytes, bytes]:
    """The ``.npz`` bytes of ``arrays`` and the JSON bytes of their dimension names; every array needs one name
    per axis."""
    import numpy as np

    for k, a in arrays.items():
        if k not in dims or len(dims[k]) != np.ndim(a):
            raise ValueError(f"array {k!r} of shape {np.shape(a)} needs {np.ndim(a)} dimension names, got "
                             f"{dims.get(k)}")
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue(), (json.dumps({k: list(dims[k]) for k in arrays}, indent=2, sort_keys=True) + "\n").encode()


def read_arrays(path: str | Path) -> dict[str, tuple[tuple[str, ...], Any]]:
    """``{name: (dims, array)}`` from ``NAME.npz`` and its ``NAME.dims.json`` (no pickles are loaded).
    ``xarray.DataArray(array, dims=dims)`` makes a labelled array of each."""
    import numpy as np

    path = Path(path)
    dims = json.loads(path.with_suffix(".dims.json").read_text())
    with np.load(path, allow_pickle=False) as z:
        return {k: (tuple(dims[k]), z[k]) for k in z.files}


class Stored:
    """One experiment's stored results in a run directory: its summary, tables and arrays (read-only). Figures
    are drawn from this alone (``plot(stored)`` of an experiment module), so ``vismech plot RUN_DIR`` redraws
    them without the model."""

    def __init__(self, run: str | Path, experiment: str, summary: dict | None = None, model: str | None = None):
        self.run, self.experiment = Path(run), experiment
        self.stem = file_stem(experiment)
        self._summary = summary
        manifest = self.run / "manifest.json"
        if model is None:
            model = json.loads(manifest.read_text()).get("model", "?") if manifest.is_file() else "?"
        self.model = model

    @property
    def summary(self) -> dict:
        if self._summary is None:
            self._summary = json.loads((self.run / "results" / f"{self.stem}.json").read_text())
        return self._summary

    def has(self, table: str) -> bool:
        return (self.run / "results" / f"{table}.csv").is_file()

    def table(self, table: str) -> list[dict[str, Any]]:
        return read_table(self.run / "results" / f"{table}.csv")

    def arrays(self, name: str) -> dict[str, Any]:
        """``{name: array}`` of ``results/NAME.npz`` (``read_arrays`` gives the dimension names too)."""
        return {k: a for k, (_, a) in read_arrays(self.run / "results" / f"{name}.npz").items()}
