"""Writing stimuli to disk is byte-for-byte reproducible and loads back to the same trials and pairs."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from vismech.scenes import (
    CounterfactualPair, Geometry, Trial, TASK_GENERATORS, generate, load_layouts, load_stimuli, render,
    write_stimuli,
)

QWEN = Geometry(28)


def mixed_items(seed):
    return [*generate("cma-id_retrieval", None, 3, seed), *generate("scene_description", (3, 3), 4, seed),
            *generate("cma-feature_retrieval", None, 2, seed), *generate("counting", None, 2, seed)]


def files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_write_twice_gives_identical_bytes(tmp_path):
    a, b = write_stimuli(mixed_items(7), QWEN, tmp_path / "a"), write_stimuli(mixed_items(7), QWEN, tmp_path / "b")
    fa, fb = files(a.parent), files(b.parent)
    assert fa == fb
    # 3 id pairs (2 images each) + 4 + 2 feature pairs (2 each) + 2 trials, all scenes distinct here
    assert sorted(fa) == [f"{i:06d}.png" for i in range(16)] + ["manifest.json"]
    c = write_stimuli(mixed_items(8), QWEN, tmp_path / "c")
    assert files(c.parent) != fa


def test_round_trip(tmp_path):
    items = mixed_items(3)
    write_stimuli(items, QWEN, tmp_path)
    loaded = load_stimuli(tmp_path)
    assert len(loaded) == len(items)
    for x, y in zip(items, loaded):
        assert type(x) is type(y)
        assert drawn(y) == x  # the same trials, now shown by the folder's image files
        assert json.dumps(x.to_json(), sort_keys=True) == json.dumps(drawn(y).to_json(), sort_keys=True)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["version"] == 2 and m["format"] == "vismech-stimuli"
    # every loaded trial's picture is its image file, with each object's box = its cell's pixel box
    t = loaded[3]
    assert t.picture.path == str((tmp_path / m["trials"][6]["image"]).resolve())
    for o in t.scene.objects:
        assert t.picture.region(o.cell).box == QWEN.layout(*t.scene.grid).cell_box(o.cell)
    assert m["geometry"] == {"token_px": 28, "canvas_tokens": None, "obj_tokens": 2}
    assert m["layouts"]["2x2"]["canvas_px"] == 280 and m["layouts"]["3x3"]["canvas_px"] == 392
    assert load_layouts(tmp_path) == {(2, 2): QWEN.layout(2, 2), (3, 3): QWEN.layout(3, 3)}
    # pair links: each pair points at its clean and counterfactual trial records, which point back
    for j, p in enumerate(m["pairs"]):
        assert m["trials"][p["clean"]]["pair"] == j and m["trials"][p["clean"]]["role"] == "clean"
        assert m["trials"][p["counterfactual"]]["role"] == "counterfactual"
        assert m["trials"][p["clean"]]["image"] != m["trials"][p["counterfactual"]]["image"]
    # every image file is the rendering of its trial's scene
    for rec, t in zip(m["trials"], [t for it in loaded for t in trials_of(it)]):
        img = np.asarray(Image.open(tmp_path / rec["image"]).convert("RGB"))
        assert (img == np.asarray(render(t.scene, QWEN.layout(*t.scene.grid)))).all()


def drawn(item):
    if isinstance(item, CounterfactualPair):
        return replace(item, clean=replace(item.clean, picture=None),
                       counterfactual=replace(item.counterfactual, picture=None))
    return replace(item, picture=None)


def trials_of(item):
    return [item.clean, item.counterfactual] if isinstance(item, CounterfactualPair) else [item]


def test_identical_scenes_share_one_image(tmp_path):
    trials = generate("pca", None, 1, 0)  # 36 trials, all different scenes
    write_stimuli(trials + trials[:5], Geometry(14, canvas_tokens=24), tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert len({r["image"] for r in m["trials"]}) == 36 and len(m["trials"]) == 41
    assert [r["image"] for r in m["trials"][36:]] == [r["image"] for r in m["trials"][:5]]
    assert Image.open(tmp_path / "000000.png").size == (336, 336)


def test_layout_function_and_errors(tmp_path):
    items = generate("color_retrieval", None, 2, 0)
    write_stimuli(items, lambda grid: QWEN.layout(*grid), tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["geometry"] is None
    assert [drawn(t) for t in load_stimuli(tmp_path)] == items
    with pytest.raises(TypeError):
        write_stimuli(["not a trial"], QWEN, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="vismech stimuli"):
        load_stimuli(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown stimulus set"):
        generate("nope", None, 1, 0)
    with pytest.raises(ValueError, match="3x3 grid only"):
        generate("pca", (2, 2), 1, 0)


@pytest.mark.parametrize("name,grid,n,expected", [
    ("scene_description", None, 5, 5), ("color_retrieval", None, 5, 5), ("spatial_relation", None, 5, 5),
    ("counting", None, 5, 5), ("pca", None, 2, 72), ("relabs", None, 2, 128), ("entropy-low", (2, 2), 2, 32),
    ("entropy-high", None, 1, 81), ("cma-id_retrieval", None, 5, 5), ("cma-id_selection", (3, 3), 5, 5),
    ("cma-feature_retrieval", None, 5, 5),
])
def test_registry(name, grid, n, expected):
    items = TASK_GENERATORS[name](grid, n, 0)
    assert len(items) == expected
    if name.startswith("cma-"):
        assert all(isinstance(p, CounterfactualPair) and p.condition == name[4:] for p in items)
        assert {p.clean.scene.grid for p in items} == {tuple(grid or (2, 2))}
    else:
        assert all(isinstance(t, Trial) for t in items)
    assert [x.to_json() for x in items] == [x.to_json() for x in TASK_GENERATORS[name](grid, n, 0)]
    assert set(TASK_GENERATORS) == {
        "scene_description", "color_retrieval", "spatial_relation", "counting", "pca", "relabs", "entropy-low",
        "entropy-high", "cma-id_retrieval", "cma-id_selection", "cma-feature_retrieval"}


def test_scenes_does_not_import_torch():
    code = "import sys, vismech.scenes; assert 'torch' not in sys.modules, 'vismech.scenes imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
