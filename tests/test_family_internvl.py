"""InternVL 3 / 3.5 (-hf): pixel-shuffled tile tokens land where vismech says (one tile, or dynamic tiles plus the
thumbnail), the q/k sites of InternVL3.5's Qwen3 are the normed heads before rotary embedding, InternVL3's Qwen2
layout keeps the plain sites, and the image run and chat text are what InternVLProcessor and the -hf template
write."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

import test_hooks
from conftest import tiny, two_object_trials
from patch_codes import check_object_patches
from vismech.engine import hooks
from vismech.models.families import DEFAULT_SITES, FAMILIES, family_for_config, text_kwargs
from vismech.models.framing import Framing, render
from vismech.models.presets import PRESETS
from vismech.models.vlm import VLM
from vismech.models.wordtok import build_word_tokenizer
from vismech.scenes import tasks
from vismech.scenes.core import Geometry, Obj, Region, Scene

#: the chat template of the -hf checkpoints (transformers' and OpenGVLab's conversion scripts)
HF_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == "
    "'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}")


def tiling(side, lo=1, hi=12):
    """The published image processor (ImageNet mean/std, bicubic), tiles of ``side`` px, ``lo``..``hi`` tiles."""
    cls = getattr(tf, "GotOcr2ImageProcessorPil", None) or tf.GotOcr2ImageProcessor
    return cls(size={"height": side, "width": side}, min_patches=lo, max_patches=hi,
               image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3)


def real(preset):
    cfg = PRESETS[preset].config()
    return type(FAMILIES["internvl"])().bind(cfg), cfg


# -- geometry ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["InternVL3-2B-hf", "InternVL3-8B-hf", "InternVL3_5-8B-HF"])
def test_real_geometries_and_tiles(preset):
    """448 px tiles of 16 x 16 tokens of 28 px; a 448 px square is one tile (vismech's processor or the published
    tiling), an 896 px square 2 x 2 tiles + the thumbnail (1280 tokens)."""
    fam, cfg = real(preset)
    assert fam.geometry(cfg, fam.image_processor_for(cfg)) == Geometry(28, canvas_tokens=16)
    assert FAMILIES["internvl"].default_geometry == Geometry(28, canvas_tokens=16)
    for ip in (fam.image_processor_for(cfg), tiling(448)):
        inp = fam.process_images(ip, [Image.new("RGB", (448, 448))])
        assert inp.n_tokens == [256] and inp.grid == [(16, 16)] and inp.extra == [(0, 0, 448)]
        assert inp.tensors["pixel_values"].shape == (1, 3, 448, 448)
    inp = fam.process_images(tiling(448), [Image.new("RGB", (896, 896))])
    assert inp.n_tokens == [5 * 256] and inp.extra == [(2, 2, 448)]


def test_box_in_a_wide_picture_through_the_tiles():
    """An 896 x 448 picture: 2 x 1 tiles of 448 px + the thumbnail (the picture squashed to 448 x 448). Box
    (504, 112)-(560, 168) is tokens (4..5, 2..3) of tile 1, and x 252..280 (column 9), rows 4..5 of the
    thumbnail."""
    fam, _ = real("InternVL3-8B-hf")
    ip = tiling(448)
    inp = fam.process_images(ip, [Image.new("RGB", (896, 448))])
    assert inp.extra == [(1, 2, 448)] and inp.n_tokens == [3 * 256]
    got = fam.region_offsets(ip, (896, 448), Region((504, 112, 560, 168)), inp.n_tokens[0], inp.grid[0],
                             inp.extra[0], 0.5)
    assert got == [(256 + r * 16 + c, 1.0) for r in (4, 5) for c in (2, 3)] + [(512 + r * 16 + 9, 1.0) for r in (4, 5)]


# -- drawn scenes: pixels, patches, tokens --------------------------------------------------------------------------

def test_object_pixels_fall_exactly_in_their_tokens():
    vlm = tiny("internvl")
    layout = vlm.layout((3, 3))
    blank = vlm.family.process_images(vlm.image_processor, [vlm.render(tasks.counting(Scene((), (3, 3))))])
    pw = blank.tensors["pixel_values"][0].numpy()
    tp, g = layout.token_px, layout.grid_tokens
    for cell in [(0, 0), (1, 2), (2, 1)]:
        t = tasks.counting(Scene((Obj("red", "square", cell),), (3, 3)))
        pv = vlm.family.process_images(vlm.image_processor, [vlm.render(t)]).tensors["pixel_values"][0].numpy()
        ys, xs = np.nonzero(np.abs(pv - pw).max(axis=0) > 1e-6)
        assert sorted({(y // tp) * g + x // tp for y, x in zip(ys, xs)}) == layout.cell_tokens(cell)


@pytest.mark.parametrize("tiles", [False, True])
def test_object_tokens_carry_exactly_the_patches_of_their_box(tiles):
    """Through InternViT's patch grid (its CLS token dropped), the pixel shuffle and the dynamic tiles (a 56 px
    scene forced to 2 x 2 tiles of 28 image px, then the thumbnail): each object's tokens carry exactly the patches
    inside its box."""
    vlm = tiny("internvl")
    if tiles:
        vlm = VLM(vlm.model, vlm.tokenizer, tiling(56, 4, 4), vlm.family, vlm.name, "chat", framing=vlm.framing)
    subs = [(0, 0, 56)] if not tiles else [(0, 0, 28), (28, 0, 28), (0, 28, 28), (28, 28, 28), (0, 0, 56)]
    m = vlm.model.model
    check_object_patches(vlm, subs, 56, 4, vision=m.vision_tower, projector=m.multi_modal_projector, merge=2,
                         width=vlm.model.config.vision_config.hidden_size, cls=1)


# -- sites ---------------------------------------------------------------------------------------------------------

def attention_inputs(vlm, batch, layer):
    """(query, key) as the attention function of ``layer`` receives them: [batch, heads, pos, dim], rotated."""
    got = {}

    def fn(at, inner, module, query, key, *args, **kwargs):
        if at == layer:
            got.update(q=query.clone(), k=key.clone())
        return inner(module, query, key, *args, **kwargs)

    with hooks.attention_function(vlm, fn):
        vlm.logits(batch)
    return got["q"], got["k"]


@pytest.mark.parametrize("site", ["q", "k"])
def test_q_and_k_sites_are_after_the_norm_and_before_rotary_embedding(site):
    """InternVL3.5 (Qwen3): setting one (position, head) at the site gives attention exactly that vector, rotated
    by the rotary embedding of its position, and nothing else moves; doubling the projection before the norm is
    normed away, so the site is after the norm."""
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    vlm, layer = tiny("internvl"), 1
    assert vlm.family.sites[site].module == f"self_attn.{site}_norm"
    b = vlm.encode(two_object_trials())
    ref = attention_inputs(vlm, b, layer)[site == "k"]
    row, pos, head = 1, b.last - 3, 1
    value = torch.linspace(-2.0, 3.0, vlm.head_dim)
    edit = hooks.Edit(site, layer, torch.tensor([row]), torch.tensor([pos]), torch.tensor([head]), value[None])
    with hooks.intervene(vlm, [edit]):
        got = attention_inputs(vlm, b, layer)[site == "k"]
    assert (got != ref).any(-1).nonzero().tolist() == [[row, head, pos]]
    lm = vlm.model.model.language_model
    cos, sin = lm.rotary_emb(value[None, None], torch.tensor([[pos]]))
    want, _ = apply_rotary_pos_emb(value[None, None, None], value[None, None, None], cos, sin)
    assert torch.allclose(got[row, head, pos], want[0, 0, 0], atol=1e-6)
    proj = getattr(vlm.attention(layer), f"{site}_proj")
    h = proj.register_forward_hook(lambda m, a, out: 2 * out)
    try:
        doubled = attention_inputs(vlm, b, layer)[site == "k"]
    finally:
        h.remove()
    assert torch.allclose(doubled, ref, atol=1e-4 * ref.abs().max())


def test_internvl3_qwen2_layout_keeps_the_plain_sites_and_the_golden_hook_checks():
    """An InternVL3 model (Qwen2: no q/k norms) binds the projection sites, and the hook goldens hold on it."""
    tok = build_word_tokenizer(family="internvl")
    cfg = FAMILIES["internvl"].tiny_config(tok)
    cfg.text_config = tf.Qwen2Config(**text_kwargs(tok))
    spec = family_for_config(cfg)
    assert spec.sites == DEFAULT_SITES and tiny("internvl").family.sites["k"].layout == "bthd"
    torch.manual_seed(0)
    vlm = VLM(spec.model_class()(cfg).eval(), tok, spec.image_processor_for(cfg), spec, "tiny:internvl3", "chat")
    assert type(vlm.layers[0].self_attn).__name__ == "Qwen2Attention"
    for check in (test_hooks.test_idle_hooks_change_nothing, test_hooks.test_self_patch_changes_nothing,
                  test_hooks.test_corrupted_upstream_patch_reproduces_corrupted_run,
                  test_hooks.test_single_head_patch_moves_only_that_head,
                  test_hooks.test_kv_head_of_is_the_key_head_each_query_head_reads):
        check(vlm)


# -- text: the processor's image run and the published template -----------------------------------------------------

def internvl_processor(ip, tok):
    """InternVLProcessor without its video slot (it cannot be built without torchvision), on ``tok`` given the
    tokenizer attributes the -hf tokenizers carry."""
    for attr, token in [("start_image_token", "<img>"), ("end_image_token", "</img>"),
                        ("context_image_token", "<IMG_CONTEXT>"), ("video_token", "<video>")]:
        setattr(tok, attr, token)
        setattr(tok, attr + "_id", tok.convert_tokens_to_ids(token))
    cls = type("InternVLProcessor", (tf.InternVLProcessor,),
               {"get_attributes": classmethod(lambda c: ["image_processor", "tokenizer"])})
    return cls(image_processor=ip, tokenizer=tok, image_seq_length=49, chat_template=HF_TEMPLATE)


@pytest.mark.parametrize("tiles", [False, True])
def test_image_run_and_chat_text_equal_internvl_processor(tiles):
    """vismech's ids (the -hf template, the image expanded by the spec) equal InternVLProcessor's, one tile or
    2 x 2 tiles + thumbnail, newlines included; vismech's own format writes the -hf template's text."""
    from test_real_tokenizers import processor_ids

    def tokenizer():  # the word tokenizer with newlines as tokens
        tok = build_word_tokenizer(family="internvl")
        tok.add_tokens([tf.AddedToken("\n", normalized=False)])
        return tok

    small = tiny("internvl")
    ip = tiling(56, 4, 4) if tiles else small.image_processor
    vlm = VLM(small.model, tokenizer(), ip, small.family, small.name, "chat",
              framing=Framing(HF_TEMPLATE, "checkpoint chat_template.json", False))
    proc = internvl_processor(ip, tokenizer())
    s = Scene((Obj("orange", "square", (0, 0)), Obj("pink", "circle", (0, 1)), Obj("cyan", "star", (1, 1))), (2, 2))
    newline = vlm.tokenizer.convert_tokens_to_ids("\n")
    for t in [tasks.scene_description(s, s.objects[1], (s.objects[0],)), tasks.color_retrieval(s, s.objects[2])]:
        image = vlm.render(t)
        b = vlm.encode([t], images=[image])
        want = processor_ids(proc, tasks.with_articles(t), image, t.task != "scene_description")
        assert b.inputs["input_ids"][0].tolist() == want
        assert len(b.image_tokens[0]) == 49 * (5 if tiles else 1) and want.count(newline) >= 3
    for question in (True, False):
        own = Framing(small.framing.template, "own", True)
        assert render(vlm.tokenizer, own, "what is it", question) == render(vlm.tokenizer, vlm.framing, "what is it",
                                                                            question)


# -- the real vocabulary: InternVL3-hf's tokenizer is Qwen2.5's with the InternVL tokens ------------------------------

#: InternVL's tokens after Qwen2.5's (151643-151664), at their published ids
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]


@pytest.fixture(scope="module")
def internvl3(tmp_path_factory, monkeypatch_module):
    """(tokenizer, InternVLProcessor, vismech VLM on a meta-device InternVL3-2B) of an InternVL3-2B-hf-like
    checkpoint folder: the shipped Qwen2 vocabulary, Qwen2.5's and InternVL's added tokens, the -hf template."""
    import real_tokenizers
    from transformers import AutoTokenizer

    from vismech.models.framing import framing_for

    base = real_tokenizers.checkpoints()["qwen2_5_vl"]
    entry = {**base, "checkpoint": "OpenGVLab/InternVL3-2B-hf", "chat_template": HF_TEMPLATE,
             "added_tokens": base["added_tokens"] + [[151665 + i, t, True] for i, t in enumerate(INTERNVL_TOKENS)],
             "tokenizer_config": {**base["tokenizer_config"], "extra_special_tokens": {
                 "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"}}}
    monkeypatch_module.setattr(real_tokenizers, "checkpoints", lambda: {"internvl": entry})
    folder = real_tokenizers.checkpoint_folder("internvl", tmp_path_factory.mktemp("tok"))
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    ip = tiling(448)
    cls = type("InternVLProcessor", (tf.InternVLProcessor,),
               {"get_attributes": classmethod(lambda c: ["image_processor", "tokenizer"])})
    proc = cls(image_processor=ip, tokenizer=tok, image_seq_length=256, chat_template=HF_TEMPLATE)
    cfg = PRESETS["InternVL3-2B-hf"].config()
    spec = family_for_config(cfg)
    with torch.device("meta"):
        model = spec.model_class()(cfg)
    vlm = VLM(model, tok, ip, spec, "InternVL3-2B-hf", "chat", framing=framing_for(str(folder), tok, spec))
    return tok, proc, vlm


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as m:
        yield m


@pytest.mark.parametrize("fmt", ["chat", "plain"])
def test_framed_ids_equal_the_processor_on_the_real_vocabulary(internvl3, fmt):
    """Every task, chat and plain: the ids vismech feeds are InternVLProcessor's from the -hf template, token for
    token; the image run is <img> + 256 <IMG_CONTEXT> + </img> at their published ids; mentions, commas and the
    last position decode to the prompt's words."""
    from test_real_tokenizers import plain_ids, processor_ids, trials

    tok, proc, vlm = internvl3
    assert [tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<img>", "</img>", "<IMG_CONTEXT>")] == [
        151644, 151665, 151666, 151667]
    assert not vlm.framing.vismech and vlm.image_token_id == 151667
    vlm.prompt_format = fmt
    for t in trials():
        read = tasks.with_articles(t)
        image = vlm.render(t)
        b = vlm.encode([t], images=[image])
        ids = b.inputs["input_ids"][0].tolist()
        q = t.task != "scene_description"
        assert ids == (processor_ids(proc, read, image, q) if fmt == "chat" else plain_ids(proc, "internvl", read,
                                                                                          image, q)), t.task
        run = b.image_tokens[0]
        assert len(run) == 256 and ids[run[0] - 1] == 151665 and ids[run[-1] + 1] == 151666
        for (a, e), pos in zip(read.mentions, b.mentions[0]):
            assert tok.decode([ids[p] for p in pos]).strip() == read.prompt[a:e]
        for (a, e), pos in zip(read.commas, b.commas[0]):
            assert tok.decode([ids[pos]]).strip() == read.prompt[a:e]


def test_sequence_scores_with_tiles_regroup_each_rows_tiles(monkeypatch):
    """The pixel values of tiled images are packed over the batch (5 tiles per row here): scoring rows repeat
    their row's tiles, so teacher-forced sequence scores still equal one forward per answer."""
    import test_answers

    small = tiny("internvl")
    vlm = VLM(small.model, small.tokenizer, tiling(56, 4, 4), small.family, small.name, "chat", framing=small.framing)
    assert vlm.encode(two_object_trials()).inputs["pixel_values"].shape[0] == 10
    monkeypatch.setattr(test_answers, "tiny", lambda family: vlm)
    test_answers.test_sequence_scores_are_teacher_forced_log_probabilities("internvl")
