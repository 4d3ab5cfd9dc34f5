"""Where an experiment's stimuli come from: its ``stimuli`` option (``vismech run ... --set stimuli=VALUE``, or
``--stimuli DIR``).

- ``"grid"`` (default): vismech's flat coloured shapes drawn on the model's token grid (the paper's synthetic sets);
- ``"photoreal"``: two-object scenes rendered with Mitsuba 3 in the paper's PUG design (``scenes.photoreal``; left
  = position ID 0 = cell (0, 0), right = ID 1 = cell (0, 1)), at the model's patch-aligned size, cached on disk; the
  experiment option ``photoreal`` sets the render (``{"spp": 64, "tokens": 14}``: samples per pixel, and tokens
  per side for models without a fixed input size); objects' image tokens come from their rendered masks;
- a folder path: a user's stimulus folder (``scenes.manifest``; ``vismech stimuli`` writes such folders): its
  trials, and its pairs for CMA; objects' image tokens come from their boxes or masks.

Used by ``cma`` (pairs), ``id-intervention`` and ``key-intervention`` (two-object scene-description trials), and
``rsa``, ``pca`` and ``vismech eval`` (a folder's trials).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vismech.errors import UserError
from vismech.scenes.core import CounterfactualPair, Trial
from vismech.scenes.counterfactual import cma_pairs
from vismech.scenes.manifest import MANIFEST, load_stimuli
from vismech.scenes.sets import scene_description_set

GRID, PHOTOREAL = "grid", "photoreal"
ID_CONDITIONS = ("id_retrieval", "id_selection")


@dataclass
class Source:
    """One experiment's stimulus source: ``value`` is "grid", "photoreal" or a folder; ``render`` the photoreal
    render settings."""

    value: Any = GRID
    render: dict = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)  # photoreal render times of this run

    def __post_init__(self) -> None:
        v = self.value
        if v in (GRID, PHOTOREAL):
            self.kind = v
        elif isinstance(v, str) and (Path(v) / MANIFEST).is_file():
            self.kind = "folder"
        else:
            raise UserError(f"stimuli must be 'grid', 'photoreal' or a stimulus folder holding {MANIFEST}; "
                             f"{v!r} is none of these")
        unknown = set(self.render) - {"spp", "tokens"}
        if unknown:
            raise UserError(f"unknown photoreal render setting(s) {', '.join(sorted(unknown))}; use spp, tokens")

    @property
    def tag(self) -> str:
        """A suffix for unit keys: empty for the grid (so earlier runs resume), else what the stimuli were."""
        if self.kind == GRID:
            return ""
        if self.kind == PHOTOREAL:
            return "-photoreal" + "".join(f"-{k}{v}" for k, v in sorted(self.render.items()))
        digest = hashlib.sha256((Path(self.value) / MANIFEST).read_bytes()).hexdigest()[:10]
        return f"-stimuli{digest}"

    def describe(self) -> str:
        return {GRID: "flat shapes on the grid", PHOTOREAL: "photoreal renders (Mitsuba 3)"}.get(
            self.kind, f"the stimulus folder {self.value}")

    # -- folders ------------------------------------------------------------------------------------------------
    def items(self) -> list:
        return load_stimuli(self.value)

    def folder_trials(self, what: str) -> list[Trial]:
        trials = [t for t in self.items() if isinstance(t, Trial)]
        if not trials:
            raise UserError(f"the stimulus folder {self.value} has no trials outside pairs for {what}")
        return trials

    # -- photoreal ----------------------------------------------------------------------------------------------
    def _render(self, vlm, items: list, progress: bool) -> list:
        from vismech.scenes import photoreal

        size = photoreal.canvas_px(vlm.geometry, int(self.render.get("tokens", photoreal.DEFAULT_TOKENS)))
        out, secs = photoreal.render_items(items, size, int(self.render.get("spp", photoreal.DEFAULT_SPP)),
                                           progress=progress)
        self.seconds += secs
        return out

    # -- what experiments ask for -------------------------------------------------------------------------------
    def two_object_trials(self, vlm, n: int, grid, seed: int, what: str, progress: bool = True) -> list[Trial]:
        """``n`` scene-description trials with one described object and a target (two objects, two IDs)."""
        if self.kind == GRID:
            return scene_description_set(n, tuple(grid), n_objects=2, seed=seed, entropy="high")
        if self.kind == PHOTOREAL:
            from vismech.scenes.photoreal import photoreal_trials

            return self._render(vlm, photoreal_trials(n, seed), progress)
        ok = [t for t in self.folder_trials(what) if len(t.mentioned) == 1 and t.target is not None]
        if len(ok) < n:
            raise UserError(f"{what} needs {n} trials with one described object and a target, but the stimulus "
                             f"folder {self.value} has {len(ok)}; lower n / n_estimate with --set, or add trials")
        return ok[:n]

    def conditions(self, conditions) -> tuple[str, ...]:
        """The CMA conditions to run: all asked for; a folder without pairs for some runs the others."""
        conds = tuple(conditions)
        if self.kind != "folder":
            return conds
        have = {p.condition for p in self.items() if isinstance(p, CounterfactualPair)}
        if have & set(ID_CONDITIONS):
            have |= set(ID_CONDITIONS)  # the two ID conditions patch the same pairs (as in the paper)
        keep = tuple(c for c in conds if c in have)
        if not keep:
            raise UserError(f"the stimulus folder {self.value} has no pairs for {', '.join(conds)}; add pairs "
                             "(see vismech.scenes.manifest) or write them with `vismech stimuli cma-...`")
        return keep

    def cma_pairs(self, vlm, condition: str, n: int, grid, seed: int, progress: bool = True
                  ) -> list[CounterfactualPair]:
        """``n`` pairs for ``condition`` (a folder gives its first ``n`` pairs of that condition)."""
        if self.kind == GRID:
            return cma_pairs(condition, n, seed, tuple(grid))
        if self.kind == PHOTOREAL:
            from vismech.scenes.photoreal import photoreal_pairs

            return self._render(vlm, photoreal_pairs(condition, n, seed), progress)
        same = ID_CONDITIONS if condition in ID_CONDITIONS else (condition,)
        pairs = [p for p in self.items() if isinstance(p, CounterfactualPair) and p.condition in same]
        if len(pairs) < 2:
            raise UserError(f"the stimulus folder {self.value} has {len(pairs)} {condition} pairs; CMA needs at "
                             "least 2 (its null re-pairs them)")
        return pairs[:n]


def source(options: dict) -> Source:
    """The stimulus source of an experiment's (or its CMA's) options."""
    return Source(options.get("stimuli", GRID), dict(options.get("photoreal") or {}))


def folder_trials(ctx, what: str) -> list[Trial] | None:
    """The trials with a target of the experiment's stimulus folder; None when its ``stimuli`` is "grid"."""
    src = source(ctx.options)
    if src.kind == GRID:
        return None
    if src.kind == PHOTOREAL:
        raise UserError(f"{what} runs on the grid sets or a stimulus folder; photoreal scenes are for cma, "
                         "id-intervention and key-intervention (write a photoreal folder with `vismech stimuli "
                         "photoreal` and pass it as the folder)")
    trials = [t for t in src.folder_trials(what) if t.target is not None]
    if len(trials) < 3:
        raise UserError(f"{what} needs at least 3 trials with a target; the stimulus folder {src.value} has "
                         f"{len(trials)}")
    return trials
