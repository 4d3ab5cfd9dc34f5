"""The training state a run resumes from (``STATE`` in its folder): weights, optimiser, random generators, the step,
the seconds trained so far and the settings, which a resumed run must repeat. Loaded with ``weights_only`` and the
Python generator's state read as a literal: nothing in a state file runs code."""

from __future__ import annotations

import ast
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from vismech.errors import UserError

STATE = "train_state.pt"


def save_state(path: Path, model, opt, step: int, run: dict, seconds: float, probe=None) -> None:
    """Write the state after ``step`` (through a temporary file, so a crash mid-write keeps the previous one)."""
    rng = {"torch": torch.get_rng_state(), "python": repr(random.getstate()),
           "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()]}
    state = {"step": step, "run": run, "seconds": seconds, "model": model.state_dict(),
             "optimizer": opt.state_dict(), "rng": rng}
    if probe is not None:
        state["probe"] = probe.state_dict()
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, model, opt, run: dict, probe=None) -> tuple[int, float]:
    """Restore ``path`` into the model, optimiser, probe and generators; (step, seconds trained). A setting of ``run``
    that differs from the saved one is refused with one error."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    saved = state["run"]
    keys = ("arch", "seed", "batch_size", "lr", "sizes", "label_mentions", "early", "vision_from", "init_from",
            "freeze_vision", "freeze_through", "plant")
    keys += ("mixture",) if "mixture" in saved else ()  # states saved before it was recorded have none
    for key in keys:
        if not same_setting(key, saved.get(key), run.get(key)):
            raise UserError(f"{path} was trained with {key}={saved.get(key)!r}, not {run.get(key)!r}; resume with "
                            "the same settings or choose another --out")
    model.load_state_dict(state["model"])
    if probe is not None:
        probe.load_state_dict(state["probe"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(ast.literal_eval(state["rng"]["python"]))
    kind, keys, *rest = state["rng"]["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return int(state["step"]), float(state.get("seconds", 0.0))


def same_setting(key: str, saved, now) -> bool:
    """Whether a resumed run's setting ``key`` is the saved one. A planting spec saved before a field was added to
    ``PlantSpec`` lacks it and behaved as its default does (fields are added with the old behaviour as default)."""
    if key != "plant" or saved is None or now is None:
        return saved == now
    from .plant import PlantSpec

    default = json.loads(PlantSpec().to_json())
    return {**default, **json.loads(saved)} == {**default, **json.loads(now)}


def truncate_log(path: Path, step: int) -> None:
    """Drop the rows of the JSON-lines log ``path`` logged after ``step`` (those of a run cut after its last state)."""
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))
