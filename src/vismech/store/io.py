"""Atomic writes of tidy tables and JSON, so a crash never leaves a half-written result on disk."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename (atomic on POSIX).

    Under data parallelism only rank 0 writes (every rank holds the same results)."""
    from vismech import distributed

    path = Path(path)
    if not distributed.is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """A tidy CSV: one row per measurement, columns in first-seen order across all rows."""
    return atomic_write(path, csv_text(rows))


def csv_text(rows: list[dict[str, Any]]) -> str:
    """The text of ``write_csv``."""
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def read_csv(path: str | Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_json(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, json_text(obj))


def json_text(obj: Any) -> str:
    """The text of ``write_json``: indented, keys sorted, arrays as lists."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_default) + "\n"


def _default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot write {type(o).__name__} as JSON")
