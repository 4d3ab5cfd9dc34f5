"""Declared ground truth: which attention heads of a model carry which variable of the paper's mechanism.

A checkpoint may ship ``ground_truth.json`` beside its weights: vismech's planted organisms do
(``organism.plant``), and a user who plants a mechanism in their own model can write one. ``load_vlm`` reads it
into ``VLM.ground_truth`` (None where there is none) and ``vismech run recovery`` measures how well vismech's
analyses find what it declares. The file is JSON and is only read as data (nothing in it runs), and it is checked
against the model's layers and heads.

Format, version 1 (stage names are the CMA conditions; ``positions`` is ``"mentions"``, the described object's
words, or ``"last"``, the last token, where that condition patches)::

    {"format": "vismech-ground-truth", "version": 1,
     "stages": {"id_retrieval": {"heads": [[2, 0], [2, 1]], "positions": "mentions", "variable": "..."},
                "id_selection": {"heads": [[3, 0], [4, 0]], "positions": "last", "variable": "...",
                                 "parts": {"gathering": [[3, 0]], "selection": [[4, 0]]}},
                "feature_retrieval": {"heads": [[6, 0]], "positions": "last", "variable": "..."}},
     "helpers": {"binding": {"heads": [[1, 0]], "positions": "mentions", "variable": "..."}},
     "method": "how the ground truth was made causal"}

Every stage is optional but at least one is required; ``helpers`` are declared heads outside the three stages
(text-only steps the mechanism needs, which no CMA condition changes); ``parts`` name sub-steps of a stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vismech.errors import UserError

FILE = "ground_truth.json"
FORMAT = "vismech-ground-truth"
VERSION = 1
STAGES = ("id_retrieval", "id_selection", "feature_retrieval")
POSITIONS = ("mentions", "last")

Head = tuple[int, int]


@dataclass(frozen=True)
class Declared:
    """Heads declared to carry ``variable`` at ``positions``."""

    heads: tuple[Head, ...]
    positions: str
    variable: str
    parts: dict[str, tuple[Head, ...]] = field(default_factory=dict)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for layer, _ in self.heads}))

    def to_json(self) -> dict[str, Any]:
        out = {"heads": [list(h) for h in self.heads], "positions": self.positions, "variable": self.variable}
        if self.parts:
            out["parts"] = {k: [list(h) for h in v] for k, v in self.parts.items()}
        return out


@dataclass(frozen=True)
class GroundTruth:
    """The declared stages (keyed by CMA condition), helper heads and how the ground truth was made."""

    stages: dict[str, Declared]
    helpers: dict[str, Declared] = field(default_factory=dict)
    method: str = ""

    def heads(self) -> set[Head]:
        """Every declared head, stages and helpers."""
        return {h for d in list(self.stages.values()) + list(self.helpers.values()) for h in d.heads}

    def check(self, n_layers: int, n_heads: int, where: str = "the ground truth") -> "GroundTruth":
        for name, d in list(self.stages.items()) + list(self.helpers.items()):
            for layer, head in d.heads:
                if not (0 <= layer < n_layers and 0 <= head < n_heads):
                    raise UserError(f"{where} declares head ({layer}, {head}) for {name}, outside this model's "
                                     f"{n_layers} layers x {n_heads} heads")
        return self

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "method": self.method,
                "stages": {k: v.to_json() for k, v in self.stages.items()},
                "helpers": {k: v.to_json() for k, v in self.helpers.items()}}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def _heads(value, where: str) -> tuple[Head, ...]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: heads must be a non-empty list of [layer, head] pairs")
    out = []
    for h in value:
        if not (isinstance(h, list) and len(h) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                              for x in h)):
            raise UserError(f"{where}: each head is a [layer, head] pair of integers, not {h!r}")
        out.append((h[0], h[1]))
    if len(set(out)) != len(out):
        raise UserError(f"{where}: a head is listed twice")
    return tuple(out)


def _declared(d, where: str) -> Declared:
    if not isinstance(d, dict):
        raise UserError(f"{where} must be an object with heads, positions and variable")
    unknown = sorted(set(d) - {"heads", "positions", "variable", "parts"})
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}")
    if d.get("positions") not in POSITIONS:
        raise UserError(f"{where}: positions must be one of {', '.join(POSITIONS)}, not {d.get('positions')!r}")
    variable = d.get("variable", "")
    if not isinstance(variable, str):
        raise UserError(f"{where}: variable must be a string")
    heads = _heads(d.get("heads"), where)
    parts = d.get("parts", {})
    if not isinstance(parts, dict):
        raise UserError(f"{where}: parts must map names to head lists")
    parts = {str(k): _heads(v, f"{where} part {k}") for k, v in parts.items()}
    for k, v in parts.items():
        if not set(v) <= set(heads):
            raise UserError(f"{where}: part {k} lists heads that are not among the stage's heads")
    return Declared(heads, d["positions"], variable, parts)


def parse(obj, where: str = "ground truth") -> GroundTruth:
    """A ``GroundTruth`` from the JSON object ``obj``; a clear error naming the problem otherwise."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{where} is not a vismech ground-truth file (its \"format\" must be {FORMAT!r})")
    if obj.get("version") != VERSION:
        raise UserError(f"{where} has version {obj.get('version')!r}; this vismech reads version {VERSION}")
    stages = obj.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise UserError(f"{where} declares no stages; declare at least one of {', '.join(STAGES)}")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise UserError(f"{where}: unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGES)}")
    helpers = obj.get("helpers", {})
    if not isinstance(helpers, dict):
        raise UserError(f"{where}: helpers must map names to declarations")
    gt = GroundTruth({k: _declared(stages[k], f"{where} stage {k}") for k in STAGES if k in stages},
                     {str(k): _declared(v, f"{where} helper {k}") for k, v in helpers.items()},
                     str(obj.get("method", "")))
    seen: dict[Head, str] = {}
    for name, d in list(gt.stages.items()) + list(gt.helpers.items()):
        for h in d.heads:
            if h in seen:
                raise UserError(f"{where}: head {h} is declared for both {seen[h]} and {name}")
            seen[h] = name
    return gt


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read a ground-truth file (or the ``ground_truth.json`` of a checkpoint folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no ground-truth file at {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); a ground-truth file is JSON (see "
                         "vismech.models.ground_truth)") from None
    return parse(obj, str(path))


def find_ground_truth(folder: str | Path) -> GroundTruth | None:
    """The ground truth a checkpoint folder declares, or None if it has no ``ground_truth.json``."""
    path = Path(folder) / FILE
    return load_ground_truth(path) if path.is_file() else None
