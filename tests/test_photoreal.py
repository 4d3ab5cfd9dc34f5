"""Photoreal scenes are rendered for real (Mitsuba 3, tiny sizes), deterministically, cached by content hash, with
masks that find each object's image tokens; the interventions and CMA run on them (left = ID 0, right = ID 1)."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import SPATIAL, tiny
from vismech.store.results import file_stem
from vismech.app.cli import main
from vismech.scenes import mitsuba_scene, photoreal
from vismech.scenes.core import Picture
from vismech.scenes.manifest import load_stimuli
from vismech.scenes.vocab import COLORS

SPP = 4


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VISMECH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "photoreal"


def test_trials_and_pairs_follow_the_pug_design():
    trials = photoreal.photoreal_trials(9, seed=3)
    assert [t.meta["environment"] for t in trials] == list(photoreal.ENVIRONMENTS) * 3
    for t in trials:
        left, right = t.scene.objects
        assert (left.cell, right.cell) == ((0, 0), (0, 1)) and t.scene.grid == (1, 2)
        spec = t.meta["photoreal"]["objects"]
        assert spec[0]["x"] < -0.7 and spec[1]["x"] > 0.7  # one clearly left, one clearly right
        assert (spec[0]["color"], spec[0]["shape"]) == (left.color, left.shape)
        assert left.color != right.color and left.shape != right.shape
        assert t.prompt == f"In this image there is a {t.mentioned[0].name} and a" and t.answer == t.target.name
    assert photoreal.photoreal_trials(9, seed=3)[4].meta == trials[4].meta  # deterministic under the seed
    for p in photoreal.photoreal_pairs("id_selection", 4, seed=1):
        a, b = p.clean.mentioned[0], p.clean.target
        # the two objects change places: A now stands at B's cell, and the answer expected after patching is A
        assert p.counterfactual.mentioned[0] == type(a)(a.color, a.shape, b.cell)
        assert p.answer == b.name and p.answer_star == a.name and p.clean.prompt == p.counterfactual.prompt
        cl, cf = p.clean.meta["photoreal"]["objects"], p.counterfactual.meta["photoreal"]["objects"]
        assert [(o["x"], o["z"]) for o in cl] == [(o["x"], o["z"]) for o in cf]
        assert [o["shape"] for o in cl] == [o["shape"] for o in cf][::-1]
    for p in photoreal.photoreal_pairs("feature_retrieval", 4, seed=1):
        b, b2 = p.clean.target, p.counterfactual.target
        assert b2.cell == b.cell and b2.color not in (b.color, p.clean.mentioned[0].color)
        assert p.answer_star == b2.name


def test_render_is_deterministic_cached_and_masks_find_the_objects(cache, monkeypatch):
    t = photoreal.photoreal_trials(3, seed=0)[2]  # outdoor
    pic, seconds = photoreal.render_scene(t.meta["photoreal"], 48, SPP)
    assert seconds is not None and seconds > 0
    first = {p.name: p.read_bytes() for p in cache.iterdir()}
    assert len([n for n in first if n.endswith(".png")]) == 3
    # a second call renders nothing: the cache answers (a render now would fail)
    monkeypatch.setattr(mitsuba_scene, "render", lambda *a, **k: pytest.fail("rendered again"))
    again, seconds = photoreal.render_scene(t.meta["photoreal"], 48, SPP)
    assert again == pic and seconds is None
    monkeypatch.undo()
    # rendering from scratch gives the same bytes (fixed sampler seed)
    rgb, masks = mitsuba_scene.render(t.meta["photoreal"], 48, SPP)
    assert np.array_equal(np.asarray(Image.open(pic.path)), rgb)
    # another size or sample count is another cache entry
    assert photoreal.render_key(t.meta["photoreal"], 48, SPP) != photoreal.render_key(t.meta["photoreal"], 56, SPP)
    assert photoreal.render_key(t.meta["photoreal"], 48, SPP) != photoreal.render_key(t.meta["photoreal"], 48, 8)
    left, right = [pic.region(c) for c in ((0, 0), (0, 1))]
    assert left.center[0] < 24 < right.center[0]
    for obj, m in zip(t.scene.objects, masks):
        assert m.sum() > 20
        mean = rgb[m].mean(0)  # the object's pixels have its colour's dominant channel
        assert np.argmax(mean) == np.argmax(COLORS[obj.color]), (obj.color, mean)


def test_render_shows_shading_shadows_and_three_environments(cache):
    trials = photoreal.photoreal_trials(3, seed=5)
    imgs = {}
    for t in trials:
        pic, _ = photoreal.render_scene(t.meta["photoreal"], 64, 16)
        imgs[t.meta["environment"]] = np.asarray(Image.open(pic.path)).astype(float)
        m = np.asarray(Image.open(pic.region((0, 0)).mask)) > 127
        lum = imgs[t.meta["environment"]][m].mean(1)
        assert lum.max() - lum.min() > 40  # shaded, not flat
    # the environments differ in floor and backdrop: the bottom rows and the top rows have different colours
    bottoms = [im[-8:].mean((0, 1)) for im in imgs.values()]
    tops = [im[:8].mean((0, 1)) for im in imgs.values()]
    assert min(np.abs(a - b).max() for i, a in enumerate(bottoms) for b in bottoms[i + 1:]) > 10
    assert min(np.abs(a - b).max() for i, a in enumerate(tops) for b in tops[i + 1:]) > 10


def test_stimuli_photoreal_cli_writes_a_folder_every_family_reads(cache, tmp_path, capsys):
    out = tmp_path / "pr"
    assert main(["stimuli", "photoreal", "--model", "tiny:qwen2_5_vl", "--n", "3", "--spp", str(SPP),
                 "--out", str(out)]) == 0
    assert "per image" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["version"] == 2 and len(m["trials"]) == 3
    assert all(o["mask"].endswith(".png") and (out / o["mask"]).exists() for t in m["trials"] for o in t["objects"])
    items = load_stimuli(out)
    assert Image.open(items[0].picture.path).size == (112, 112)  # 14 tokens of 8 px (tiny Qwen geometry)
    assert tiny("idefics2").encode(items).objects == [{}] * 3  # resampled tokens: the rest of a run still works
    for fam in SPATIAL:
        b = tiny(fam).encode(items)
        for row, t in enumerate(items):
            (l0, *_), (r0, *_) = b.objects[row][(0, 0)], b.objects[row][(0, 1)]
            assert set(b.objects[row][(0, 0)]).isdisjoint(b.objects[row][(0, 1)])
            assert min(b.coverage[row][(0, 0)]) > 0
            assert all(p in b.image_tokens[row] for p in b.objects[row][(0, 0)])


def test_interventions_and_cma_run_on_photoreal(cache, tmp_path):
    out = tmp_path / "run"
    assert main(["run", "cma", "id-intervention", "key-intervention", "--model", "tiny:qwen2_5_vl", "--out", str(out),
                 "--set", "stimuli=photoreal", "--set", json.dumps({"spp": SPP}).join(["photoreal=", ""]),
                 "--set", "n=4", "--set", "n_estimate=4", "--set", "null_samples=20", "--set", "alphas=[1, 5]",
                 "--set", "top_k=2"]) == 0
    res = {n: json.loads((out / "results" / f"{file_stem(n)}.json").read_text()) for n in ("cma", "id-intervention",
                                                                                  "key-intervention")}
    assert res["cma"]["stimuli"].startswith("photoreal") and res["id-intervention"]["stimuli"].startswith("photo")
    assert res["id-intervention"]["ids"].startswith("left = ID (0, 0)")
    assert set(res["cma"]["conditions"]) == {"id_retrieval", "id_selection", "feature_retrieval"}
    assert res["key-intervention"]["id_labels"] == [[0, 0], [0, 1]]  # left and right
    for c, b in res["id-intervention"]["best"].items():
        assert b["n"] == 4 and 0 <= b["efficacy"] <= 1
    # 4 + 4 trials and 2 x (4 + 4) pair images (the ID conditions share theirs) were rendered, each once
    assert len([p for p in cache.iterdir() if p.suffix == ".json"]) == 8 + 16


@pytest.mark.parametrize("family", ["llava", "llava_onevision", "idefics2"])
def test_key_intervention_on_photoreal_other_families(cache, tmp_path, family):
    """LLaVA geometries (fixed input size, 56 px renders here); Idefics2 has no per-patch tokens: skipped cleanly."""
    out = tmp_path / "run"
    assert main(["run", "key-intervention", "--model", f"tiny:{family}", "--out", str(out),
                 "--set", "stimuli=photoreal", "--set", json.dumps({"spp": SPP}).join(["photoreal=", ""]),
                 "--set", "n=3", "--set", "n_estimate=3", "--set", "cma_n=2", "--set", "top_k=2"]) == 0
    res = json.loads((out / "results" / "key_intervention.json").read_text())
    if family == "idefics2":
        assert "skipped" in res
    else:
        assert res["id_labels"] == [[0, 0], [0, 1]] and res["n_heldout"] == 3
        assert {Image.open(p).size for p in cache.glob("*.png")} == {(56, 56)}  # images and masks


def test_photoreal_picture_of_a_missing_render_is_a_clear_error(tmp_path):
    vlm = tiny("llava")
    t = photoreal.photoreal_trials(1)[0]
    from dataclasses import replace

    bad = replace(t, picture=Picture(str(tmp_path / "gone.png"), ()))
    with pytest.raises(ValueError, match="cannot read the image"):
        vlm.encode([bad])
