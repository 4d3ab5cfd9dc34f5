"""The model adapter: token positions, padding, answer tokens, geometry and loading errors, on every family."""

import numpy as np
import pytest
import torch

from conftest import SPATIAL, projector_coded_inputs, tiny, two_object_trials
from vismech.engine import hooks
from vismech.models.load import geometry_for, load_vlm
from vismech.scenes import tasks
from vismech.scenes.core import Obj, Scene


def test_mentions_commas_and_last_token_decode_to_the_prompt_words(vlm):
    trials = two_object_trials()
    b = vlm.encode(trials)
    ids = b.inputs["input_ids"]
    for i, t in enumerate(trials):
        for obj, toks in zip(t.mentioned, b.mentions[i]):
            assert vlm.tokenizer.decode(ids[i, toks]).split() == obj.name.split()
        assert [vlm.tokenizer.decode(ids[i, [p]]).strip() for p in b.commas[i]] == (
            [","] * (len(t.mentioned) - 1) + ["and"])
        assert vlm.tokenizer.decode(ids[i, [b.last]]).strip() == "a"
        assert b.inputs["attention_mask"][i].sum() == len(vlm.tokenizer(b.texts[i])["input_ids"])


def test_left_padded_batch_equals_single_runs(vlm):
    trials = two_object_trials()
    both = vlm.logits(vlm.encode(trials))
    for i, t in enumerate(trials):
        single = vlm.logits(vlm.encode([t]))
        assert torch.allclose(single[0], both[i], atol=1e-5)


def test_object_tokens_are_the_image_tokens_of_their_cell(spatial_vlm):
    vlm = spatial_vlm
    t = two_object_trials()[1]
    b = vlm.encode([t])
    layout = vlm.layout(t.scene.grid)
    img_pos = b.image_tokens[0]
    for o in t.scene.objects:
        pos = b.objects[0][o.cell]
        assert all(p in img_pos for p in pos)
        base = [img_pos.index(p) for p in pos][: layout.obj_tokens ** 2]
        assert base == layout.cell_tokens(o.cell)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_pixel_rows_of_an_object_fall_in_its_merged_tokens(family):
    """The image processor's patch order puts an object's pixels exactly in the layout's token block."""
    vlm = tiny(family)
    scene = Scene((Obj("red", "square", (1, 2)),), (3, 3))
    t = tasks.counting(scene)
    img = vlm.family.process_images(vlm.image_processor, [vlm.render(t)])
    blank = vlm.family.process_images(vlm.image_processor, [vlm.render(tasks.counting(Scene((), (3, 3))))])
    pv, pw = img.tensors["pixel_values"].numpy(), blank.tensors["pixel_values"].numpy()
    merge = vlm.image_processor.merge_size
    non_white = np.nonzero(np.abs(pv - pw).max(axis=1) > 1e-6)[0]
    tokens = sorted(set((non_white // (merge * merge)).tolist()))
    assert tokens == vlm.layout((3, 3)).cell_tokens((1, 2))


def test_onevision_object_tokens_carry_their_patch_features():
    """Index-coded projector outputs land, after anyres packing, exactly at the positions vismech records."""
    vlm = tiny("llava_onevision")
    t = two_object_trials()[0]
    b = vlm.encode([t])
    x = projector_coded_inputs(vlm, b)[0]
    layout = vlm.layout(t.scene.grid)
    for o in t.scene.objects:
        pos = b.objects[0][o.cell]
        tiles = x[pos, 0].round().long().tolist()
        patches = x[pos, 1].round().long().tolist()
        cells = layout.cell_tokens(o.cell)
        assert sorted(p for tl, p in zip(tiles, patches) if tl == 0) == cells
        assert sorted(p for tl, p in zip(tiles, patches) if tl == 1) == cells


def test_answer_ids_and_ambiguous_first_tokens():
    vlm = tiny("llava")
    b = vlm.encode(two_object_trials())
    ids = vlm.answer_ids(b, ["blue circle", "blue heart"])
    assert ids[0] == ids[1] == vlm.tokenizer.convert_tokens_to_ids("blue")
    with pytest.raises(ValueError, match="same token"):
        vlm.first_token_pairs(b, ["blue circle", "red star"], ["blue heart", "green star"])


def test_geometry_of_real_families():
    assert geometry_for("qwen2_5_vl").layout(3, 3).canvas_px == 392
    assert geometry_for("qwen2_vl").layout(2, 2).canvas_px == 280
    assert geometry_for("llava").layout(3, 3).canvas_px == 336


def test_idefics2_refuses_object_token_analyses():
    vlm = tiny("idefics2")
    b = vlm.encode(two_object_trials())
    assert b.objects == [{}, {}]
    with pytest.raises(ValueError, match="no per-patch positions"):
        vlm.family.cell_offsets(vlm.layout((2, 2)), (0, 0), 16, None, None)


def test_loading_errors_are_one_clear_line(tmp_path):
    with pytest.raises(ValueError, match="unknown family"):
        load_vlm("tiny:gpt2")
    with pytest.raises(ValueError, match="unknown preset"):
        load_vlm("random:Qwen9")
    with pytest.raises(ValueError, match="cannot load model"):
        load_vlm(str(tmp_path))
    vlm = tiny("qwen2_5_vl")
    vlm.model.config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no weights"):
        load_vlm(str(tmp_path))


def test_saved_checkpoint_loads_through_the_same_adapter(tmp_path):
    vlm = tiny("llava")
    vlm.model.save_pretrained(tmp_path)
    vlm.tokenizer.save_pretrained(tmp_path)
    vlm.image_processor.save_pretrained(tmp_path)
    again = load_vlm(str(tmp_path), device="cpu")
    b = vlm.encode(two_object_trials())
    assert torch.equal(again.logits(again.encode(two_object_trials())), vlm.logits(b))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_vision_towers_attend_packed_with_the_same_numbers(family, monkeypatch):
    """Every Qwen-family VLM runs its vision tower on packed SDPA (``models.packed_attention``): one call per
    window length instead of one per window; the logits equal HF's per-window SDPA."""
    from vismech.models import packed_attention as pa
    from vismech.scenes.sets import scene_description_set

    vlm = tiny(family)
    assert vlm.model.config.vision_config._attn_implementation == pa.PACKED
    b = vlm.encode(scene_description_set(3, (3, 3), n_objects=4, seed=0))
    calls = []
    real = pa._packed_sdpa
    monkeypatch.setattr(pa, "_packed_sdpa", lambda *a, **k: calls.append(len(k["cu_seq_lens_q"]) - 1) or real(*a, **k))
    from transformers import AttentionInterface

    AttentionInterface.register(pa.PACKED, pa._packed_sdpa)
    packed = vlm.logits(b)
    AttentionInterface.register(pa.PACKED, real)
    assert calls and max(calls) >= len(b)  # each call covers every image (or window) of the batch at once
    with pa.packed_vision_attention(vlm.model, False):
        assert vlm.model.config.vision_config._attn_implementation == "sdpa"
        plain = vlm.logits(b)
    assert vlm.model.config.vision_config._attn_implementation == pa.PACKED  # restored
    assert (packed - plain).abs().max() < 1e-5 * max(1.0, float(plain.abs().max()))
