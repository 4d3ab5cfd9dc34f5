"""Idefics3 / SmolVLM: pixel-shuffled tokens land where vismech says (drawn scenes and boxes, one sub-image or tiles
plus the global image), the image run and the chat text are what the checkpoints' own processor and template
write, and the real-size geometries."""

from __future__ import annotations

import numpy as np
import pytest
import transformers as tf
from PIL import Image

from conftest import tiny
from patch_codes import check_object_patches
from vismech.models.families import FAMILIES
from vismech.models.framing import Framing
from vismech.models.presets import PRESETS
from vismech.models.vlm import VLM
from vismech.models.wordtok import build_word_tokenizer
from vismech.scenes import tasks
from vismech.scenes.core import Geometry, Obj, Region, Scene

#: the chat template SmolVLM's processors ship (Idefics3-8B's starts with <|begin_of_text|> instead)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] "
    "== 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == "
    "'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def ip_class():
    return getattr(tf, "Idefics3ImageProcessorPil", None) or tf.Idefics3ImageProcessor


def split_processor(tile: int, longest: int):
    """The published processor settings: tiles of ``tile`` px after resizing the longest edge to ``longest``."""
    return ip_class()(do_image_splitting=True, size={"longest_edge": longest}, max_image_size={"longest_edge": tile},
                      image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=1)


def with_processor(vlm, ip, framing=None):
    return VLM(vlm.model, vlm.tokenizer, ip, vlm.family, vlm.name, "chat", framing=framing or vlm.framing)


def real(preset):
    cfg = PRESETS[preset].config()
    return type(FAMILIES["idefics3"])().bind(cfg), cfg


# -- geometry ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,geometry,tokens", [
    ("SmolVLM-256M-Instruct", Geometry(64, canvas_tokens=8), 64),  # 512 px, 16 px patches shuffled 4x4
    ("SmolVLM-Instruct", Geometry(42, canvas_tokens=9, input_px=384), 81),  # 27 patches of 14 px (378 px) by 3
    ("Idefics3-8B-Llama3", Geometry(28, canvas_tokens=13), 169),  # 364 px = 26 patches of 14 px, by 2
])
def test_real_geometries(preset, geometry, tokens):
    fam, cfg = real(preset)
    ip = fam.image_processor_for(cfg)
    assert fam.geometry(cfg, ip) == geometry
    px = geometry.input_px or geometry.canvas_tokens * geometry.token_px
    inp = fam.process_images(ip, [Image.new("RGB", (px, px))])
    assert inp.n_tokens == [tokens] and inp.grid == [(geometry.canvas_tokens,) * 2]
    assert inp.tensors["pixel_values"].shape == (1, 1, 3, px, px)
    assert FAMILIES["idefics3"].default_geometry == real("Idefics3-8B-Llama3")[0].geometry(
        real("Idefics3-8B-Llama3")[1], None)


# -- drawn scenes: pixels, patches, tokens --------------------------------------------------------------------------

def test_object_pixels_fall_exactly_in_their_tokens():
    """One sub-image (the tiny processor): the pixels an object changes are exactly its tokens' 8 px blocks."""
    vlm = tiny("idefics3")
    layout = vlm.layout((3, 3))
    blank = vlm.family.process_images(vlm.image_processor, [vlm.render(tasks.counting(Scene((), (3, 3))))])
    pw = blank.tensors["pixel_values"][0, 0].numpy()
    tp, g = layout.token_px, layout.grid_tokens
    for cell in [(0, 0), (1, 2), (2, 1)]:
        t = tasks.counting(Scene((Obj("red", "square", cell),), (3, 3)))
        pv = vlm.family.process_images(vlm.image_processor, [vlm.render(t)]).tensors["pixel_values"][0, 0].numpy()
        ys, xs = np.nonzero(np.abs(pv - pw).max(axis=0) > 1e-6)
        assert sorted({(y // tp) * g + x // tp for y, x in zip(ys, xs)}) == layout.cell_tokens(cell)


@pytest.mark.parametrize("split", [False, True])
def test_object_tokens_carry_exactly_the_patches_of_their_box(split):
    """Through the vision tower's patch grid, the pixel shuffle and the processor's tiles: the image tokens vismech
    records for an object carry exactly the patches inside the object's box, in the global image and in every
    tile (2 x 2 tiles of 56 px from the image upscaled to 112 px, then the global image)."""
    vlm = tiny("idefics3")
    if split:
        vlm = with_processor(vlm, split_processor(56, 112))
    subs = [(0, 0, 56)] if not split else [(0, 0, 28), (28, 0, 28), (0, 28, 28), (28, 28, 28), (0, 0, 56)]
    m = vlm.model.model
    check_object_patches(vlm, subs, 56, 4, vision=m.vision_model, projector=m.connector.modality_projection, merge=2,
                         width=vlm.model.config.vision_config.hidden_size)


def test_tiles_of_smolvlm_256m():
    """SmolVLM-256M's published processor (longest edge 2048, 512 px tiles): a 512 px scene becomes 4 x 4 tiles + the
    global image, 17 x 64 tokens; the object of cell (0, 0) of a 3x3 grid (the token at (1, 1) of the 8 x 8 global
    grid) is 4 x 4 tokens of tile (0, 0) from (4, 4), and token 9 of the global image."""
    fam, cfg = real("SmolVLM-256M-Instruct")
    ip = split_processor(512, 2048)
    layout = fam.geometry(cfg, ip).layout(3, 3)
    assert (layout.grid_tokens, layout.obj_tokens, layout.offset_tokens) == (8, 1, 0)
    inp = fam.process_images(ip, [Image.new("RGB", (512, 512))])
    assert inp.n_tokens == [17 * 64] and inp.extra == [(4, 4, 512)]
    got = fam.cell_offsets(layout, (0, 0), inp.n_tokens[0], inp.grid[0], inp.extra[0])
    assert got == [r * 8 + c for r in range(4, 8) for c in range(4, 8)] + [16 * 64 + 9]
    # cell (2, 1): global token (5, 3) = 43; tiles rows 20..23 (tile row 2, local 4..7), cols 12..15 (tile col 1)
    got = fam.cell_offsets(layout, (2, 1), inp.n_tokens[0], inp.grid[0], inp.extra[0])
    assert got == [(2 * 4 + 1) * 64 + r * 8 + c for r in range(4, 8) for c in range(4, 8)] + [16 * 64 + 43]


def test_box_in_a_wide_picture_through_smolvlm_tiles():
    """A 1024 x 512 picture: longest edge to 2048 -> 2048 x 1024 = 2 x 4 tiles of 512 px, then the global image
    (the picture squashed to 512 x 512). Box (256, 128)-(384, 256) is x 512..768, y 256..512 on the tiled canvas
    (tile 1, its tokens (4..7, 0..3)) and x 128..192, y 128..256 on the global one (tokens (2..3, 2))."""
    fam, _ = real("SmolVLM-256M-Instruct")
    ip = split_processor(512, 2048)
    inp = fam.process_images(ip, [Image.new("RGB", (1024, 512))])
    assert inp.extra == [(2, 4, 512)] and inp.n_tokens == [9 * 64]
    got = fam.region_offsets(ip, (1024, 512), Region((256, 128, 384, 256)), inp.n_tokens[0], inp.grid[0],
                             inp.extra[0], 0.5)
    assert got == [(64 + r * 8 + c, 1.0) for r in range(4, 8) for c in range(4)] + [
        (8 * 64 + 2 * 8 + 2, 1.0), (8 * 64 + 3 * 8 + 2, 1.0)]


def test_smolvlm_instruct_tiles_leave_a_strip_uncovered():
    """SmolVLM-Instruct: 27 patches of 14 px fill 378 of each 384 px tile, in 9 tokens of 42 px. The cell (1, 1)
    object of a 3x3 grid is token (4, 4) of the global image, x 168..210 of the 384 px scene; upscaled 4 x to 1536
    px it spans 672..840: token 6 of tile 1 (636..678) at 6/42, tokens 7 and 8 whole, the strip 762..768 that no
    token sees, token 0 of tile 2 whole and token 1 (810..852) at 30/42. So columns (and rows) 16..19 of the 36
    tile tokens per side, all covered at least 30/42 x 30/42 = 0.51."""
    fam, cfg = real("SmolVLM-Instruct")
    ip = split_processor(384, 1536)
    layout = fam.geometry(cfg, ip).layout(3, 3)
    assert layout.cell_box((1, 1)) == (168, 168, 210, 210)
    inp = fam.process_images(ip, [Image.new("RGB", (384, 384))])
    assert inp.extra == [(4, 4, 384)] and inp.n_tokens == [17 * 81]
    got = fam.cell_offsets(layout, (1, 1), inp.n_tokens[0], inp.grid[0], inp.extra[0])
    tiles = [((r // 9) * 4 + c // 9) * 81 + (r % 9) * 9 + c % 9 for r in range(16, 20) for c in range(16, 20)]
    assert got == sorted(tiles) + [16 * 81 + 4 * 9 + 4]


# -- text: the processor's image run and the published template -----------------------------------------------------

def processor_ids(proc, trial, image, question):
    from vismech.models.framing import COMPLETION_INSTRUCTION

    content = [{"type": "image"}, {"type": "text", "text": trial.prompt}]
    msgs = [{"role": "user", "content": content}] if question else [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": COMPLETION_INSTRUCTION}]},
        {"role": "assistant", "content": [{"type": "text", "text": trial.prompt}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=question,
                                    continue_final_message=not question)
    return proc(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist()


@pytest.mark.parametrize("split", [False, True])
def test_image_run_and_chat_text_equal_idefics3_processor(split):
    """vismech's ids (the published template, the image expanded by the spec) equal Idefics3Processor's from the
    same template, with and without tiles; vismech's own format writes the same text as the published template."""
    def tokenizer():  # the word tokenizer with newlines as tokens, so the run's newlines count too
        tok = build_word_tokenizer(family="idefics3")
        tok.add_tokens([tf.AddedToken("\n", normalized=False)])
        return tok

    vlm = tiny("idefics3")
    ip = split_processor(56, 112) if split else vlm.image_processor
    vlm = VLM(vlm.model, tokenizer(), ip, vlm.family, vlm.name, "chat",
              framing=Framing(SMOLVLM_TEMPLATE, "checkpoint chat_template.json", False))
    proc = tf.Idefics3Processor(image_processor=ip, tokenizer=tokenizer(), image_seq_len=49,
                                chat_template=SMOLVLM_TEMPLATE)
    s = Scene((Obj("orange", "square", (0, 0)), Obj("pink", "circle", (0, 1)), Obj("cyan", "star", (1, 1))), (2, 2))
    for t in [tasks.scene_description(s, s.objects[1], (s.objects[0],)), tasks.color_retrieval(s, s.objects[2])]:
        image = vlm.render(t)
        b = vlm.encode([t], images=[image])
        want = processor_ids(proc, tasks.with_articles(t), image, t.task != "scene_description")
        assert b.inputs["input_ids"][0].tolist() == want
        assert len(b.image_tokens[0]) == 49 * (5 if split else 1)
        assert want.count(vlm.tokenizer.convert_tokens_to_ids("\n")) == (4 if split else 1)
    own = tiny("idefics3").framing.template
    for question in (True, False):
        from vismech.models import framing

        a = framing.render(vlm.tokenizer, Framing(own, "own", True), "what is it", question)
        assert a == framing.render(vlm.tokenizer, vlm.framing, "what is it", question)
