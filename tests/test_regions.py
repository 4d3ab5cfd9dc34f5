"""A box or mask in an image file maps to exactly the image tokens it covers, with the covered fraction, on the
token geometries of real Qwen and LLaVA checkpoints and through the tiny models' own image processors."""

import numpy as np
import pytest
from PIL import Image

from conftest import tiny
from vismech.models.families import FAMILIES
from vismech.models.presets import PRESETS
from vismech.scenes.core import Obj, Picture, Region, Scene, Trial
from vismech.scenes.regions import View, coverage, object_tokens


def real(family, preset):
    cfg = PRESETS[preset].config()
    fam = type(FAMILIES[family])().bind(cfg)
    return fam, fam.image_processor_for(cfg)


def tokens_of(fam, proc, size, region, min_coverage=0.5):
    img = Image.new("RGB", size)
    inp = fam.process_images(proc, [img])
    got = fam.region_offsets(proc, size, region, inp.n_tokens[0], inp.grid[0], inp.extra[0], min_coverage)
    return inp, got


def test_box_on_real_qwen_geometry():
    # Qwen2.5-VL-7B: 14 px patches merged 2x2 = 28 px tokens; a 640x480 image is resized to 644x476 (23 x 17 tokens)
    fam, proc = real("qwen2_5_vl", "Qwen2.5-VL-7B")
    inp, got = tokens_of(fam, proc, (640, 480), Region((100, 50, 300, 250)))
    assert inp.grid[0] == (17, 23)
    # x: 100..300 -> 100.625..301.875 canvas px: col 3 covered 0.41 (dropped), cols 4-9 fully, col 10 0.78
    # y: 50..250 -> 49.58..247.92: row 1 covered 0.23 (dropped), rows 2-7 fully, row 8 0.85
    want = {r * 23 + c for r in range(2, 9) for c in range(4, 11)}
    assert {k for k, _ in got} == want
    cov = dict(got)
    assert cov[2 * 23 + 4] == pytest.approx(1.0)
    assert cov[8 * 23 + 10] == pytest.approx((301.875 - 280) / 28 * (250 * 476 / 480 - 224) / 28)
    # a box exactly on token edges covers exactly those tokens, fully
    _, got = tokens_of(fam, proc, (644, 476), Region((56, 28, 112, 84)))
    assert got == [(1 * 23 + 2, 1.0), (1 * 23 + 3, 1.0), (2 * 23 + 2, 1.0), (2 * 23 + 3, 1.0)]


def test_box_on_real_llava_geometry():
    # LLaVA-1.5: shortest edge resized to 336, centre crop 336, 14 px patches (24 x 24 tokens)
    fam, proc = real("llava", "LLaVA-1.5-7B")
    # 672x448 -> 504x336 (scale 0.75), crop 84 px off the left: x_canvas = 0.75 x - 84
    inp, got = tokens_of(fam, proc, (672, 448), Region((140, 0, 200, 28)))
    assert inp.grid[0] == (24, 24)
    # x: 140..200 -> 21..66: col 1 covered 7/14 = 0.5 (kept), cols 2-3 fully, col 4 covered 10/14 (kept)
    # y: 0..28 -> 0..21: row 0 fully, row 1 half; a token's coverage is the product (row 1: cols 2-3 at 0.5 kept,
    # col 1 at 0.25 and col 4 at 0.36 dropped)
    cov = dict(got)
    assert sorted(cov) == [1, 2, 3, 4, 24 + 2, 24 + 3]
    assert cov[1] == pytest.approx(0.5) and cov[2] == pytest.approx(1.0) and cov[4] == pytest.approx(10 / 14)
    assert cov[24 + 2] == pytest.approx(0.5)
    # an object inside the cropped-away strip is an error that says so
    with pytest.raises(ValueError, match="outside the part of the image"):
        tokens_of(fam, proc, (672, 448), Region((0, 0, 100, 100)))


def test_mask_equals_box_and_weights_pixels():
    view = View(4, 4, 7.0, (0.5, 0.5))  # a 56 px image onto a 28 px canvas of 7 px tokens
    box = Region((8, 8, 36, 22))
    m = np.zeros((56, 56))
    m[8:22, 8:36] = 1
    assert np.allclose(coverage(box, view), coverage(m, view))
    # coverage is the covered area fraction: the box spans canvas 4..18 x 4..11
    want = np.zeros((4, 4))
    want[0, 0], want[0, 1], want[0, 2] = 3 * 3 / 49, 3 * 7 / 49, 3 * 4 / 49
    want[1, 0], want[1, 1], want[1, 2] = 3 * 4 / 49, 4 * 7 / 49, 4 * 4 / 49
    assert np.allclose(coverage(box, view), want)
    half = m * 0.5
    assert np.allclose(coverage(half, view), want / 2)
    assert object_tokens(coverage(box, view), view, 0.5) == [(5, pytest.approx(28 / 49))]
    assert object_tokens(np.zeros((2, 2)) + [[0.1, 0.3], [0, 0]], View(2, 2, 1.0, (1, 1)), 0.5) == [(1, 0.3)]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "llava_onevision"])
def test_box_tokens_match_the_processors_pixels(family):
    """Paint the box white on black, run the model's own image processor, and read each token's mean brightness:
    fully covered tokens are white, uncovered ones black, partial ones near their coverage."""
    vlm = tiny(family)
    fam, proc = vlm.family, vlm.image_processor
    size = (56, 56) if family == "llava_onevision" else (90, 66)
    box = (10.0, 9.0, 50.0, 45.0)
    img = Image.new("RGB", size)
    img.paste((255, 255, 255), tuple(int(v) for v in box))
    inp = fam.process_images(proc, [img])
    bright = token_brightness(family, proc, inp)
    got = dict(fam.region_offsets(proc, size, Region(box), inp.n_tokens[0], inp.grid[0], inp.extra[0], 0.0))
    for k in range(len(bright)):
        c = got.get(k, 0.0)
        assert abs(bright[k] - c) < 0.2, (k, bright[k], c)
    assert sum(v == pytest.approx(1.0) for v in got.values()) >= 4


def token_brightness(family, proc, inp):
    pv = inp.tensors["pixel_values"].float()
    mean = np.asarray(proc.image_mean)
    std = np.asarray(proc.image_std)
    if family.startswith("qwen"):
        m2 = proc.merge_size ** 2
        x = pv.view(pv.shape[0], 3, -1).numpy() * std[None, :, None] + mean[None, :, None]
        return x.reshape(pv.shape[0] // m2, -1).mean(1)
    t = 4  # the tiny models' patch size
    if family == "llava":
        x = pv[0].numpy() * std[:, None, None] + mean[:, None, None]
        g = x.shape[-1] // t
        return x.mean(0).reshape(g, t, g, t).mean((1, 3)).ravel()
    x = pv[0].numpy() * std[None, :, None, None] + mean[None, :, None, None]  # [tiles, 3, S, S]
    g = x.shape[-1] // t
    base = x[0].mean(0).reshape(g, t, g, t).mean((1, 3)).ravel()
    hi = x[1].mean(0).reshape(g, t, g, t).mean((1, 3))
    hi = np.concatenate([hi, np.zeros((g, 1))], 1).ravel()  # one newline token per row
    return np.concatenate([base, hi])


def test_encode_uses_regions_for_picture_trials(tmp_path):
    vlm = tiny("qwen2_5_vl")
    a, b = Obj("red", "cube", (0, 0)), Obj("blue", "sphere", (0, 1))
    img = Image.new("RGB", (64, 48), (90, 90, 90))
    img.save(tmp_path / "x.png")
    pic = Picture(str(tmp_path / "x.png"), (((0, 0), Region((8, 16, 24, 32))), ((0, 1), Region((40, 8, 56, 40)))))
    scene = Scene((a, b), (1, 2))
    t = Trial("scene_description", scene, "In this image there is a red cube and a", "blue sphere", b, (a,),
              ((25, 33),), ((34, 37),), picture=pic)
    batch = vlm.encode([t])
    start = batch.image_tokens[0][0]
    # 64x48 stays 64x48 on the 8 px token grid: 8 columns x 6 rows
    assert [p - start for p in batch.objects[0][(0, 0)]] == [2 * 8 + 1, 2 * 8 + 2, 3 * 8 + 1, 3 * 8 + 2]
    assert [p - start for p in batch.objects[0][(0, 1)]] == [r * 8 + c for r in range(1, 5) for c in (5, 6)]
    assert batch.coverage[0][(0, 0)] == [1.0] * 4


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava", "llava_onevision"])
def test_cell_tokens_equal_the_tokens_of_the_cell_box(tmp_path, family):
    """The drawn-scene fast path (cell offsets) and the general path (the cell's pixel box as a picture region)
    give the same tokens, fully covered."""
    from dataclasses import replace

    from conftest import two_object_trials

    vlm = tiny(family)
    for t in two_object_trials():
        img = vlm.render(t)
        img.save(tmp_path / "x.png")
        layout = vlm.layout(t.scene.grid)
        regions = tuple((o.cell, Region(layout.cell_box(o.cell))) for o in t.scene.objects)
        pic = Picture(str(tmp_path / "x.png"), regions)
        a, b = vlm.encode([t]), vlm.encode([replace(t, picture=pic)])
        assert a.objects == b.objects and b.coverage == a.coverage
        assert all(c == 1.0 for cs in b.coverage[0].values() for c in cs)
