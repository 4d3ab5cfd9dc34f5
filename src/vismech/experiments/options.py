"""What values an experiment option takes, declared once and checked before anything runs or is written.

An experiment declares its options in ``DEFAULTS`` (name -> default value); the default's type is the option's
type: a bool takes only true/false, an int only integers (and, being a count, >= 0), a float any finite number,
a str a string, a list a list whose elements have the type of the default's elements. An experiment may add
``LIMITS`` (name -> ``Opt``) beside ``DEFAULTS`` for what the type does not say (a range, choices, None allowed);
options that many experiments share (trial counts, grids, the ``cma_*`` options) take their rules from ``COMMON``
when their default fits the rule. So a plain ``DEFAULTS`` dict is checked by type, and one ``LIMITS`` line adds a
range. The CLI's own numeric arguments use the same rules (``arg_type``).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from typing import Any

from vismech.errors import UserError
from vismech.scenes.counterfactual import CONDITIONS

#: the most trials (or pairs, or K) per condition a run may ask for: beyond this a run would take days
MAX_TRIALS = 100_000
#: the largest grid side: the paper's grids are 2x2 to 3x3, and every cell must stay several image tokens wide
MAX_GRID = 10


@dataclass(frozen=True)
class Opt:
    """The rule of one option. ``kind``: "bool", "int", "float", "str", "list", "grid" or "any" (None: the kind
    of the default); ``lo``/``hi``: inclusive bounds (exclusive with ``open``); ``choices``; ``none``: None is
    also valid; ``each``: the rule of a list's elements; ``length``: (min, max) elements of a list."""

    kind: str | None = None
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    none: bool = False
    each: "Opt | None" = None
    length: tuple[int, int | None] = (0, None)
    open: bool = False

    def describe(self) -> str:
        if self.choices:
            what = "one of " + ", ".join(json.dumps(c) for c in self.choices)
        elif self.kind == "grid":
            what = (f"a grid [rows, cols] of 1 to {MAX_GRID} each with {_n(self.lo or 1)} to "
                    f"{_n(self.hi or MAX_GRID ** 2)} cells, e.g. [3, 3]")
        elif self.kind == "list":
            lo, hi = self.length
            what = ("a list" if (lo, hi) == (0, None) else "a non-empty list" if (lo, hi) == (1, None) else
                    f"a list of {lo} to {hi if hi is not None else 'any number of'} items" if lo != hi else
                    f"a list of {lo} items")
            what += f", each {self.each.describe()}" if self.each else ""
        else:
            what = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
                    "any": "any value"}[self.kind or "any"]
            if self.lo is not None and self.hi is not None:
                what += f" {'strictly ' if self.open else ''}between {_n(self.lo)} and {_n(self.hi)}"
            elif self.lo is not None:
                what += f" {'>' if self.open else '>='} {_n(self.lo)}"
            elif self.hi is not None:
                what += f" {'<' if self.open else '<='} {_n(self.hi)}"
        return what + (" (or null)" if self.none else "")

    def check(self, name: str, v: Any) -> Any:
        """``v`` in its stored form (floats as float, tuples as lists); ``UserError`` naming ``name`` if invalid."""
        if v is None and self.none:
            return None
        ok, out = self._valid(v)
        if not ok:
            raise UserError(f"option {name} must be {self.describe()}, not {json.dumps(v, default=str)}")
        return out

    def _valid(self, v: Any) -> tuple[bool, Any]:
        ok, v = self._valid_kind(v)
        return ok and (not self.choices or v in self.choices), v

    def _valid_kind(self, v: Any) -> tuple[bool, Any]:
        k = self.kind
        if k == "any":
            return True, v
        if k == "bool":
            return type(v) is bool, v
        if k in ("int", "float"):
            if not (type(v) is int or (k == "float" and type(v) is float and math.isfinite(v))):
                return False, v
            return self._within(float(v) if k == "float" else v), float(v) if k == "float" else v
        if k == "str":
            return type(v) is str, v
        if k == "grid":  # lo/hi bound the number of cells
            ok = type(v) in (list, tuple) and len(v) == 2 and all(type(x) is int and 1 <= x <= MAX_GRID for x in v)
            return ok and self._within(v[0] * v[1]), list(v) if ok else v
        if k == "list":
            if type(v) not in (list, tuple) or len(v) < self.length[0] or (self.length[1] or len(v)) < len(v):
                return False, v
            if self.each is None:
                return True, list(v)
            items = [self.each._valid(x) for x in v]
            return all(ok for ok, _ in items), [x for _, x in items]
        raise ValueError(f"unknown option kind {k!r}")

    def _within(self, x: float) -> bool:
        low = self.lo is None or (x > self.lo if self.open else x >= self.lo)
        return low and (self.hi is None or (x < self.hi if self.open else x <= self.hi))


def _n(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def infer(default: Any) -> Opt:
    """The rule a default value implies (see the module docstring)."""
    if isinstance(default, bool):
        return Opt("bool")
    if isinstance(default, int):
        return Opt("int", lo=0)
    if isinstance(default, float):
        return Opt("float")
    if isinstance(default, str):
        return Opt("str")
    if isinstance(default, (list, tuple)):
        kinds = {type(x) for x in default}
        each = infer(default[0]) if len(kinds) == 1 else None
        if each is not None and each.kind == "int":
            each = Opt("int")  # list elements may be any integer unless declared otherwise
        return Opt("list", each=each, length=(len(default), len(default)) if isinstance(default, tuple) else (0, None))
    return Opt("any")


TRIALS = Opt("int", 1, MAX_TRIALS)
#: rules of the command line's own numeric arguments
BATCH = Opt("int", 1, 1 << 16)
SEED = Opt("int", 0, 2 ** 32 - 1)
COUNT = Opt("int", 1)
GRID = Opt("grid", 2)
UNIT = Opt("float", 0, 1, open=True)
HEADS = Opt("list", none=True, length=(1, None), each=Opt("list", length=(2, 2), each=Opt("int", 0)))

#: rules of options that many experiments share; one applies when the experiment's default satisfies it
COMMON: dict[str, Opt] = {
    "n": TRIALS, "n_estimate": TRIALS, "cma_n": Opt("int", 2, MAX_TRIALS),
    "grid": GRID, "cma_grid": GRID, "grids": Opt("list", each=GRID, length=(1, 16)),
    "generate": Opt("bool"), "max_new_tokens": Opt("int", 1, 4096, none=True),
    "ci": UNIT, "q": UNIT, "n_boot": Opt("int", 1, 10 ** 6), "n_null": Opt("int", 0, 10 ** 6),
    "n_perm": Opt("int", 0, 10 ** 6), "null_samples": Opt("int", 1, 10 ** 7),
    "k": Opt("int", 1), "top_k": Opt("int", 1), "folds": Opt("int", 2, 1000), "probe_dims": Opt("int", 1),
    "k_grid": Opt("list", none=True, length=(1, None), each=Opt("int", 0)),
    "alphas": Opt("list", length=(1, None), each=Opt("float")), "heads": HEADS,
    "conditions": Opt("list", length=(1, len(CONDITIONS)), each=Opt("str", choices=CONDITIONS)),
    "act_dtype": Opt("str", choices=("float32", "float16")), "memmap_mb": Opt("int", 0),
    "blas_threads": Opt("int", 1, 1024),
}


def rule(name: str, default: Any, limits: dict[str, Opt] | None = None) -> Opt:
    """The rule of option ``name``: the experiment's ``LIMITS`` entry (its kind inferred from the default when not
    given), else the ``COMMON`` one if the default satisfies it, else the one the default implies."""
    if limits and name in limits:
        r = limits[name]
        return r if r.kind else replace(r, kind=infer(default).kind, each=r.each or infer(default).each)
    common = COMMON.get(name)
    if common is not None:
        try:
            common.check(name, default)
            return common
        except UserError:
            pass
    return infer(default)


def check_options(module, given: dict[str, Any]) -> dict[str, Any]:
    """``module.DEFAULTS`` overridden by ``given``, every value checked and in its stored form; unknown names and
    bad values are a ``UserError``."""
    defaults = module.DEFAULTS
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise UserError(f"unknown option(s) {', '.join(unknown)}; {module.NAME} takes {', '.join(sorted(defaults))}")
    limits = getattr(module, "LIMITS", None)
    return {k: rule(k, d, limits).check(k, given.get(k, d)) if k in given else d for k, d in defaults.items()}


def arg_type(r: Opt, flag: str):
    """An argparse ``type`` for a CLI argument checked by rule ``r`` (its message names ``flag``)."""
    def parse(s: str):
        try:
            v = json.loads(s)
        except ValueError:
            v = s
        try:
            return r.check(flag, v)
        except UserError:
            raise argparse.ArgumentTypeError(f"must be {r.describe()}, not {s!r}") from None
    return parse


def option_help(module) -> str:
    """Every option of an experiment module: its default, what values it takes (``DEFAULTS``/``LIMITS``/``COMMON``)
    and what it means (the sentences of the module's docstring that name it, ``like_this``)."""
    import re

    doc = " ".join((module.__doc__ or "").split())
    sentences = re.split(r"(?<=[.;])\s+(?=[A-Z`(])", doc)
    lines = [f"{module.NAME}: {module.DESCRIPTION}", "", "options (--set KEY=VALUE, JSON values):"]
    for key, default in module.DEFAULTS.items():
        r = rule(key, default, getattr(module, "LIMITS", None))
        lines.append(f"  {key} = {json.dumps(default)}    ({r.describe()})")
        said = [s for s in sentences if f"``{key}``" in s]
        for s in said[:2]:
            lines.append(f"      {s}")
    return "\n".join(lines)
