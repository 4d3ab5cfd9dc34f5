"""LLaVA-NeXT: the anyres layout (base grid, then the unpadded high-resolution grid with a newline per row) at the
published pinpoints, pixel-exact on the real geometry and traced through the tiny model's own unpadding; the
processor's token count; the chat format of each language model."""

import pytest
import torch
import transformers as tf

from conftest import projector_coded_inputs, tiny, two_object_trials
from vismech.models.families import FAMILIES
from vismech.models.presets import PRESETS
from vismech.models.wordtok import build_word_tokenizer
from vismech.scenes import COLORS, SHAPES, Obj, Scene, render, tasks


def _real(preset="llava-v1.6-mistral-7b-hf"):
    cfg = PRESETS[preset].config()
    spec = type(FAMILIES["llava_next"])().bind(cfg)
    return spec, cfg, spec.image_processor_for(cfg)


@pytest.mark.parametrize("grid", [(2, 2), (3, 3)])
def test_real_geometry_objects_sit_on_their_tokens_in_both_grids(grid):
    """A 336 px scene at the published settings: 576 base tokens of 14 px, then its best resolution (336x672: two
    tiles, the image centred) unpadded to the same 24x24 grid plus a newline per row; the unpadded tiles hold the
    base view's pixels exactly, and every drawn pixel of an object lies in its cell's tokens."""
    spec, cfg, ip = _real()
    layout = spec.geometry(cfg, ip).layout(*grid)
    assert (layout.token_px, layout.grid_tokens, layout.canvas_px) == (14, 24, 336)
    cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    scene = Scene(tuple(Obj(list(COLORS)[i], SHAPES[i % len(SHAPES)], cell) for i, cell in enumerate(cells)), grid)
    img = spec.process_images(ip, [render(scene, layout)])
    assert img.n_tokens == [576 + 24 * 25] and img.grid == [(24, 24)] and img.extra == [1]
    pv = img.tensors["pixel_values"][0]  # base, then the two 336 px tiles of the 336x672 canvas
    assert pv.shape == (3, 3, 336, 336)
    hi = torch.cat([pv[1], pv[2]], dim=-1)[:, :, 168:504]  # the columns unpadding keeps (24 of 48 tokens)
    assert torch.equal(hi, pv[0])
    white = spec.process_images(ip, [render(Scene((), grid), layout)]).tensors["pixel_values"][0, 0]
    drawn = (pv[0] - white).abs().amax(0) > 1e-6
    owner = torch.full((336, 336), -1)
    for i, o in enumerate(scene.objects):
        for t in layout.cell_tokens(o.cell):
            r, c = divmod(t, 24)
            owner[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = i
        assert drawn[owner == i].float().mean() > 0.3
    assert drawn.any() and (owner[drawn] >= 0).all()
    # the offsets vismech records: each base token, then the same token of the high-resolution grid
    off = spec.cell_offsets(layout, cells[0], img.n_tokens[0], img.grid[0], img.extra[0])
    base = layout.cell_tokens(cells[0])
    assert off == base + [576 + (t // 24) * 25 + t % 24 for t in base]


def test_the_processor_expands_the_placeholder_to_vismechs_token_count():
    """LlavaNextProcessor (published settings, patch 14, CLS dropped) writes as many <image> tokens as vismech
    counts, for the real geometry and for the tiny model, whose own forward accepts them."""
    tok = build_word_tokenizer(family="llava_next")
    for cfg, patch in ((PRESETS["llava-v1.6-mistral-7b-hf"].config(), 14), (tiny("llava_next").model.config, 4)):
        spec = type(FAMILIES["llava_next"])().bind(cfg)
        ip = spec.image_processor_for(cfg)
        proc = tf.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1)
        side = cfg.vision_config.image_size
        image = render(Scene((Obj("red", "square", (0, 0)),), (2, 2)), spec.geometry(cfg, ip).layout(2, 2))
        assert image.size == (side, side)
        ids = proc(text=["[INST] <image>\nhow many ? [/INST]"], images=[image], return_tensors="pt")["input_ids"]
        n = spec.process_images(ip, [image]).n_tokens[0]
        assert int((ids == tok.convert_tokens_to_ids("<image>")).sum()) == n == (side // patch) ** 2 + (
            side // patch) * (side // patch + 1)
    vlm = tiny("llava_next")
    b = vlm.encode(two_object_trials())
    assert [len(r) for r in b.image_tokens] == [210, 210] and vlm.logits(b).isfinite().all()


def test_tiny_object_tokens_carry_their_tile_features_through_the_unpadding():
    """Tile- and patch-coded projector outputs land, after LlavaNextModel packs the base grid and the unpadded
    tiles, at the positions vismech records: the object's base tokens, then the tokens of the same image pixels in
    the two tiles of its 40x80 best resolution (the image centred: 5 token columns of padding on the left)."""
    vlm = tiny("llava_next")
    t = two_object_trials()[0]
    b = vlm.encode([t])
    x, p = projector_coded_inputs(vlm, b)[0], 10
    layout = vlm.layout(t.scene.grid)
    for o in t.scene.objects:
        pos = b.objects[0][o.cell]
        tiles = x[pos, 0].round().long().tolist()
        patches = x[pos, 1].round().long().tolist()
        cells = layout.cell_tokens(o.cell)
        n = len(cells)
        assert tiles[:n] == [0] * n and patches[:n] == cells  # the base view
        # tile 1 = canvas columns 0..9, tile 2 = columns 10..19; the image sits at columns 5..14
        hi = [(pa // p) * p + (tl - 1) * p + pa % p - p // 2 for tl, pa in zip(tiles[n:], patches[n:])]
        assert set(tiles[n:]) <= {1, 2} and hi == cells


def test_each_language_model_gets_its_published_chat_format():
    mistral, _, _ = _real("llava-v1.6-mistral-7b-hf")
    vicuna, _, _ = _real("llava-v1.6-vicuna-7b-hf")
    assert mistral.chat.user == "[INST] " and mistral.chat.user_end == " [/INST]"
    assert vicuna.chat == FAMILIES["llava"].chat  # "USER: <image>\nQUESTION ASSISTANT:"
    assert FAMILIES["llava_next"].chat.user == "[INST] "  # the unbound spec is not changed by bind
    vlm = tiny("llava_next")
    b = vlm.encode([tasks.counting(Scene((Obj("red", "square", (0, 0)),), (2, 2)))])
    assert b.texts[0].startswith("[INST] " + "<image>" * 210 + "\n") and b.texts[0].endswith(" [/INST]")


def test_non_square_images_are_refused():
    vlm = tiny("llava_next")
    from PIL import Image

    with pytest.raises(ValueError, match="square images only"):
        vlm.family.process_images(vlm.image_processor, [Image.new("RGB", (40, 60))])
