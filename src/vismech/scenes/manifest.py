"""The stimulus folder format: images plus ``manifest.json`` (version 2), written by ``vismech stimuli`` and read by
``vismech run --stimuli DIR`` / ``vismech eval --stimuli DIR``, so any user's own images can be analysed.

A folder holds image files (PNG or JPEG) and ``manifest.json``::

    {"format": "vismech-stimuli", "version": 2,
     "trials": [
       {"image": "cats/001.jpg",                       # path inside the folder
        "task": "scene_description",                   # optional (default); or color_retrieval, ... or your own
        "prompt": "In this image there is a black cat and a",
        "answer": "white dog",
        "objects": [                                   # every object whose image tokens an analysis may need
          {"class": "cat", "color": "black", "box": [12, 40, 180, 200]},
          {"class": "dog", "color": "white", "box": [220, 30, 400, 210], "mask": "cats/001-dog.png"}],
        "mentioned": [0],                              # objects the prompt names, in prompt order (indices)
        "target": 1,                                   # the object the answer names (index, or null)
        "mentions": [[29, 38]], "commas": [[39, 42]],   # optional character spans (found when left out)
        "meta": {}}],                                  # optional labels, kept as they are
     "pairs": [{"condition": "id_selection", "clean": 0, "counterfactual": 1,
                "answer": "white dog", "answer_star": "black cat"}]}   # optional, for `cma`

Objects: ``class`` (one word or more) and optional ``color`` make its name ("black cat"; "dog" without a colour);
``box`` is [x0, y0, x1, y1] in pixels of the image (x1, y1 exclusive); ``mask`` (optional) a grey-scale image of the
same size whose non-zero pixels are the object (grey level / 255 = the fraction of a pixel). ``id`` (optional,
[row, col]) is the object's position ID; when no object of a trial has one, objects are numbered left to right by
box centre: [0, 0], [0, 1], ... (left = ID 0, right = ID 1, as in the paper's two-object photographs). A model finds
each object's image tokens from its box or mask (``scenes.regions``: the tokens it covers, with the fraction).
``mentions`` left out: each mentioned object's name is looked up in the prompt, in order; ``commas`` left out: the
word or punctuation mark right after each mention (the paper reads described objects there). A pair's two trials
must have the same prompt (their token positions are patched one to one). ``items`` (optional) orders the trials
and pairs, as [["trial", i] | ["pair", j], ...]; by default every trial outside a pair, then every pair.

The manifest is data only: nothing in a folder is run, and every path must stay inside the folder. Version 1
manifests (older ``vismech stimuli`` output) are read too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from vismech.errors import UserError

from .core import CounterfactualPair, Layout, Obj, Picture, Region, Scene, Trial

MANIFEST = "manifest.json"
FORMAT = "vismech-stimuli"
VERSION = 2
Item = Union[Trial, CounterfactualPair]
_NEXT = re.compile(r"\s*(\w+|[^\w\s])")


def trial_record(trial: Trial, image: str, box_of: Callable[[Obj], Sequence[float]],
                 mask_of: Callable[[Obj], str | None] = lambda o: None) -> dict[str, Any]:
    """The version-2 record of ``trial`` shown by the file ``image``, its objects' boxes from ``box_of``."""
    objs = list(trial.scene.objects)
    index = {o: i for i, o in enumerate(objs)}
    rec = {"image": image, "task": trial.task, "prompt": trial.prompt, "answer": trial.answer,
           "grid": list(trial.scene.grid),
           "objects": [{"class": o.shape, "color": o.color, "id": list(o.cell),
                        "box": [float(v) for v in box_of(o)], **({"mask": m} if (m := mask_of(o)) else {})}
                       for o in objs],
           "mentioned": [index[o] for o in trial.mentioned],
           "target": None if trial.target is None else index[trial.target],
           "mentions": [list(s) for s in trial.mentions], "commas": [list(s) for s in trial.commas],
           "meta": trial.meta}
    return rec


def write_manifest(out: Path, records: list[dict], pairs: list[dict], items: list, **extra) -> Path:
    """Write ``out / manifest.json`` (sorted keys, so the same content gives the same bytes)."""
    manifest = {"format": FORMAT, "version": VERSION, **extra, "trials": records, "pairs": pairs, "items": items}
    path = Path(out) / MANIFEST
    path.write_text(json.dumps(manifest, sort_keys=True, indent=1) + "\n", encoding="utf-8")
    return path


# -- reading -----------------------------------------------------------------------------------------------------
def _inside(root: Path, rel: Any, what: str) -> str:
    if not isinstance(rel, str) or not rel:
        raise UserError(f"{what} must be a file name inside the stimulus folder, not {rel!r}")
    p = (root / rel).resolve()
    if Path(rel).is_absolute() or not p.is_relative_to(root):
        raise UserError(f"{what} {rel!r} points outside the stimulus folder {root}; use a path inside it")
    if not p.is_file():
        raise UserError(f"{what} {rel!r} does not exist in {root}")
    return str(p)


def _spans(prompt: str, given, names: list[str] | None, what: str) -> tuple[tuple[int, int], ...]:
    if given is not None:
        out = tuple((int(a), int(b)) for a, b in given)
        for a, b in out:
            if not 0 <= a < b <= len(prompt):
                raise UserError(f"{what} span [{a}, {b}] lies outside the prompt of {len(prompt)} characters")
        return out
    out, pos = [], 0
    for name in names or []:
        k = prompt.lower().find(name.lower(), pos)
        if k < 0:
            raise UserError(f"the mentioned object {name!r} does not occur in the prompt {prompt!r} (after "
                             f"character {pos}); give its character span in 'mentions'")
        out.append((k, k + len(name)))
        pos = k + len(name)
    return tuple(out)


def _commas(prompt: str, mentions) -> tuple[tuple[int, int], ...]:
    out = []
    for _, b in mentions:
        m = _NEXT.match(prompt, b)
        if m is None:
            raise UserError(f"nothing follows the mention ending at character {b} of {prompt!r}; give 'commas'")
        out.append(m.span(1))
    return tuple(out)


def _object_ids(objs: list[dict], n: int) -> list[tuple[int, int]]:
    has = ["id" in o for o in objs]
    if any(has) and not all(has):
        raise UserError(f"trial {n}: give an 'id' for every object or for none")
    if all(has) and objs:
        return [tuple(int(v) for v in o["id"]) for o in objs]
    order = sorted(range(len(objs)), key=lambda i: (Region.from_json(objs[i]).center, i))
    ids = [(0, 0)] * len(objs)
    for rank, i in enumerate(order):
        ids[i] = (0, rank)
    return ids


def _trial(rec: dict, root: Path, n: int) -> Trial:
    try:
        image = _inside(root, rec["image"], f"trial {n}: image")
        objs = list(rec.get("objects", []))
        regions = []
        for j, o in enumerate(objs):
            r = Region.from_json(o)
            if r.mask is not None:
                r = Region(r.box, _inside(root, r.mask, f"trial {n}, object {j}: mask"))
            regions.append(r)
        ids = _object_ids(objs, n)
        obj = [Obj(str(o.get("color") or ""), str(o["class"]), c) for o, c in zip(objs, ids)]
        grid = tuple(rec.get("grid") or (max([c[0] for c in ids], default=0) + 1,
                                         max([c[1] for c in ids], default=0) + 1))
        scene = Scene(tuple(obj), grid)
        mentioned = tuple(obj[int(i)] for i in rec.get("mentioned", []))
        target = None if rec.get("target") is None else obj[int(rec["target"])]
        prompt = str(rec["prompt"])
        mentions = _spans(prompt, rec.get("mentions"), [o.name for o in mentioned], "a mention")
        if len(mentions) != len(mentioned):
            raise UserError(f"{len(mentions)} mention spans for {len(mentioned)} mentioned objects")
        commas = _spans(prompt, rec["commas"], None, "a comma") if rec.get("commas") is not None else \
            _commas(prompt, mentions)
        return Trial(task=str(rec.get("task") or "scene_description"), scene=scene, prompt=prompt,
                     answer=str(rec["answer"]), target=target, mentioned=mentioned, mentions=mentions,
                     commas=commas, meta=dict(rec.get("meta") or {}),
                     picture=Picture(image, tuple((o.cell, r) for o, r in zip(obj, regions))))
    except KeyError as e:
        raise UserError(f"trial {n} of the manifest has no {e.args[0]!r}; see vismech.scenes.manifest") from None
    except (TypeError, IndexError) as e:
        raise UserError(f"trial {n} of the manifest is malformed ({e}); see vismech.scenes.manifest") from None
    except ValueError as e:
        msg = str(e)
        raise UserError(msg if msg.startswith("trial ") else f"trial {n}: {msg}") from None


def _v1_record(rec: dict, layouts: dict[str, dict]) -> dict:
    """A version-1 record (a Trial's JSON drawn on a grid layout) as a version-2 one, boxes from the layout."""
    t = Trial.from_json(rec["trial"])
    lay = Layout(**{k: v for k, v in layouts[rec["layout"]].items() if k != "canvas_px"})
    return trial_record(t, rec["image"], lambda o: lay.cell_box(o.cell))


def read_manifest(folder: Union[str, Path]) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no {MANIFEST} in {folder}; write one (see vismech.scenes.manifest) or make a "
                                "set with `vismech stimuli`")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or m.get("version") not in (1, VERSION):
        v = m.get("version") if isinstance(m, dict) else None
        raise UserError(f"{path} has manifest version {v!r}; this vismech reads versions 1 and {VERSION}")
    return m


def load_stimuli(folder: Union[str, Path]) -> list[Item]:
    """The trials and pairs of a stimulus folder, in the manifest's order; every trial's ``picture`` is its image
    file in the folder with its objects' regions."""
    root = Path(folder).resolve()
    m = read_manifest(root)
    recs = m.get("trials")
    if not isinstance(recs, list) or not recs:
        raise UserError(f"{root / MANIFEST} lists no trials")
    if m["version"] == 1:
        recs = [_v1_record(r, m["layouts"]) for r in recs]
    trials = [_trial(r, root, i) for i, r in enumerate(recs)]
    pairs = []
    for j, p in enumerate(m.get("pairs") or []):
        try:
            c, cf = trials[int(p["clean"])], trials[int(p["counterfactual"])]
            pair = CounterfactualPair(str(p["condition"]), c, cf, str(p["answer"]), str(p["answer_star"]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise UserError(f"pair {j} of the manifest needs condition, clean and counterfactual (trial indices), "
                             "answer and answer_star") from None
        if c.prompt != cf.prompt:
            raise UserError(f"pair {j}: the clean and counterfactual prompts differ; a pair patches token "
                             "positions one to one, so give both trials the same prompt")
        pairs.append(pair)
    order = m.get("items")
    if order is None:
        in_pair = {int(p[k]) for p in m.get("pairs") or [] for k in ("clean", "counterfactual")}
        order = [["trial", i] for i in range(len(trials)) if i not in in_pair] + \
                [["pair", j] for j in range(len(pairs))]
    try:
        return [trials[i] if kind == "trial" else pairs[i] for kind, i in order]
    except (IndexError, TypeError, ValueError):
        raise UserError("'items' must list [\"trial\", i] or [\"pair\", j] with valid indices") from None


def load_layouts(folder: Union[str, Path]) -> dict[tuple[int, int], Layout]:
    """The layout of each grid recorded by ``write_stimuli`` (drawn sets only), keyed by (rows, cols)."""
    out = {}
    for d in (read_manifest(folder).get("layouts") or {}).values():
        d = {k: v for k, v in d.items() if k != "canvas_px"}
        out[(d["rows"], d["cols"])] = Layout(**d)
    return out
