"""Qwen3-VL: DeepStack features (where they enter, what ``resid`` sees, how the fast engine replays them and that its
self-check catches their loss), the q/k sites at the per-head norms, ``mm_token_type_ids``, the chat format and the
pixel-exact token grid of the real checkpoints' image processor."""

import numpy as np
import pytest
import torch

from conftest import tiny, two_object_trials
from vismech.engine import cascade, hooks, patching, replay
from vismech.errors import UserError
from vismech.models.families import FAMILIES, image_processor_class
from vismech.models.load import geometry_for
from vismech.models.presets import PRESETS
from vismech.scenes import tasks
from vismech.scenes.core import Geometry, Obj, Scene
from vismech.scenes.render import render


@pytest.fixture(scope="module")
def vlm():
    return tiny("qwen3_vl")


def _deepstack(vlm, batch):
    """(visual_pos_masks, deepstack_visual_embeds) the language model receives for ``batch``."""
    with hooks.capture_lm_inputs(vlm) as got:
        vlm.logits(batch)
    return got["visual_pos_masks"], got["deepstack_visual_embeds"]


def test_deepstack_enters_after_the_first_layers_at_the_image_tokens_and_resid_is_before_it(vlm):
    """After layer j < len(deepstack), the next layer reads ``resid`` at layer j plus DeepStack term j at the image
    tokens (bit for bit) and ``resid`` itself elsewhere; from the last DeepStack layer on, it reads ``resid``."""
    b = vlm.encode(two_object_trials())
    mask, ds = _deepstack(vlm, b)
    n_ds = len(vlm.model.config.vision_config.deepstack_visual_indexes)
    assert len(ds) == n_ds == 2 < vlm.n_layers
    image = torch.zeros_like(mask)
    for row, pos in enumerate(b.image_tokens):
        image[row, pos] = True
    assert torch.equal(mask, image) and all(t.shape == (int(mask.sum()), 64) for t in ds)
    inputs = {}

    def record(layer, hidden, kwargs):
        inputs[layer] = hidden.detach().clone()

    with hooks.capture(vlm, [("resid", l) for l in range(vlm.n_layers)]) as resid, hooks.layer_inputs(vlm, record):
        vlm.logits(b)
    for layer in range(vlm.n_layers - 1):
        out = resid[("resid", layer)][:, :, 0]
        nxt = inputs[layer + 1]
        assert torch.equal(nxt[~mask], out[~mask])
        if layer < n_ds:
            assert torch.equal(nxt[mask], out[mask] + ds[layer])
            assert (nxt[mask] - out[mask]).abs().amax(-1).min() > 0  # every image token gets its term
        else:
            assert torch.equal(nxt, out)


def _mid_prompt_setup(vlm):
    clean = vlm.encode(two_object_trials())
    pos = [m[0] for m in clean.mentions]  # after the image: a prefix cache, and the shared-prefix engine
    with hooks.hooked(vlm, "v", 0, lambda x: -x):
        src = patching.capture_z(vlm, clean, pos)
    tid = torch.stack([vlm.answer_ids(clean, ["blue", "blue"]), vlm.answer_ids(clean, ["red", "green"])], 1)
    return clean, pos, src, tid


def test_the_self_check_catches_a_replay_without_the_deepstack_inputs(vlm, monkeypatch):
    from vismech.engine.interventions import EditedRuns

    clean, pos, src, tid = _mid_prompt_setup(vlm)
    inp, full = replay.lm_inputs(vlm, clean)
    assert set(inp.packed) == {"deepstack_visual_embeds"}
    assert replay.check_replay(vlm, full, replay.lm_logits(vlm, inp)) < 1e-5
    p0, last_image = min(p[0] for p in pos), max(max(t) for t in clean.image_tokens)
    # the shared-prefix engine runs where the recomputed suffix holds no image token
    assert p0 > last_image and cascade.supported(vlm, inp.length, inp, p0)
    assert not cascade.supported(vlm, inp.length, inp, last_image)
    naive = patching.naive_head_patch(vlm, clean, src, pos, tid, heads=[(0, 0)])
    monkeypatch.setattr(hooks, "RUN_CONTROL", hooks.RUN_CONTROL + ("deepstack_visual_embeds",))
    # the cached engines cut their prefix from the full forward, where DeepStack acted, and recompute a suffix
    # without image tokens: exact without replaying the dropped input
    for kw in (dict(shared_prefix=True), dict(shared_prefix=False)):
        got = patching.head_patch(vlm, clean, src, pos, tid, heads=[(0, 0)], **kw)
        assert float((got - naive).abs().max()) < 1e-4
    # a replay from position 0 needs it, and the self-check says so
    with pytest.raises(UserError, match=r"replay of the qwen3_vl language model differs from the full forward by "
                                        r"[0-9.e-]+ \(tolerance 0.001 at float32\)"):
        patching.head_patch(vlm, clean, src, pos, tid, heads=[(0, 0)], use_cache=False)
    with pytest.raises(UserError, match="qwen3_vl language model differs"):
        EditedRuns(vlm, clean)


def test_without_the_packed_declaration_the_replay_fails_with_a_clear_error(vlm, monkeypatch):
    clean, pos, src, tid = _mid_prompt_setup(vlm)
    monkeypatch.setattr(vlm.family, "packed_inputs", {})
    with pytest.raises(UserError, match=r"cannot replay the qwen3_vl language model on its captured inputs"):
        patching.head_patch(vlm, clean, src, pos, tid, heads=[(0, 0)])


def test_patches_at_image_tokens_replay_deepstack_in_the_suffix(vlm):
    """Head patches at object image tokens (inside the DeepStack span, so the recomputed suffix holds image tokens
    and their DeepStack rows): the engine that copies the prefix equals one full forward per head."""
    clean = vlm.encode(two_object_trials())
    pos, _ = patching.pad_positions([sorted(p for cell in objs.values() for p in cell)[-3:] for objs in clean.objects])
    inp, _ = replay.lm_inputs(vlm, clean)
    assert not cascade.supported(vlm, inp.length, inp, min(min(p) for p in pos))
    with hooks.hooked(vlm, "v", 0, lambda x: -x):
        src = patching.capture_z(vlm, clean, pos)
    src = {layer: 30 * v for layer, v in src.items()}
    tid = torch.stack([vlm.answer_ids(clean, ["blue", "blue"]), vlm.answer_ids(clean, ["red", "green"])], 1)
    heads = [(0, 1), (0, 3), (1, 2)]  # (the last layer's image tokens are read by no later layer)
    fast = patching.head_patch(vlm, clean, src, pos, tid, heads=heads, rows_per_forward=2)
    slow = patching.naive_head_patch(vlm, clean, src, pos, tid, heads=heads)
    assert (fast - slow).abs().max() < 1e-4
    assert (slow - vlm.logits(clean).gather(1, tid)).abs().amax((1, 2)).min() > 1e-3


def _attention_inputs(vlm, batch, layer):
    """The (query, key) the attention function of ``layer`` receives: after the norms and rotary embedding."""
    got = {}

    def fn(l, inner, module, query, key, value, *args, **kwargs):
        if l == layer:
            got["q"], got["k"] = query.detach().clone(), key.detach().clone()
        return inner(module, query, key, value, *args, **kwargs)

    with hooks.attention_function(vlm, fn):
        vlm.logits(batch)
    return got["q"], got["k"]


@pytest.mark.parametrize("site", ["q", "k"])
def test_q_and_k_sites_are_the_normed_heads_before_rotary_embedding(vlm, site):
    b, layer = vlm.encode(two_object_trials()), 1
    attn = vlm.attention(layer)
    norm, proj = getattr(attn, f"{site}_norm"), getattr(attn, f"{site}_proj")
    assert vlm.family.sites[site].module == f"self_attn.{site}_norm"
    seen = {}
    h = norm.register_forward_hook(lambda m, a, out: seen.update(out=out.detach().clone()))
    try:
        with hooks.capture(vlm, [(site, layer)]) as got:
            vlm.logits(b)
    finally:
        h.remove()
    assert torch.equal(got[(site, layer)], seen["out"])  # [batch, pos, heads, head_dim], the norm's own output
    ref = _attention_inputs(vlm, b, layer)[site == "k"]
    # rotary embedding is linear: doubling the site doubles what attention reads, exactly
    with hooks.hooked(vlm, site, layer, lambda x: 2 * x):
        assert torch.equal(_attention_inputs(vlm, b, layer)[site == "k"], 2 * ref)
    # the same edit before the norm is normalised away
    h = proj.register_forward_hook(lambda m, a, out: 2 * out)
    try:
        before_norm = _attention_inputs(vlm, b, layer)[site == "k"]
    finally:
        h.remove()
    assert (before_norm - ref).abs().max() < 1e-3 * ref.abs().max()  # (the norm's eps aside)
    # one (row, position, head) set to a value: only that entry of attention's input moves, rotated (same norm)
    head, p = 1, b.last - 2
    value = torch.linspace(-3, 3, vlm.head_dim)
    with hooks.intervene(vlm, [hooks.Edit(site, layer, torch.tensor([0]), torch.tensor([p]), torch.tensor([head]),
                                          value[None])]):
        edited = _attention_inputs(vlm, b, layer)[site == "k"]  # [batch, heads, pos, head_dim]
    moved = (edited != ref).any(-1).nonzero().tolist()
    assert moved == [[0, head, p]]
    assert torch.allclose(edited[0, head, p].norm(), value.norm(), rtol=1e-5)


def test_mm_token_type_ids_mark_the_image_tokens_and_are_required(vlm):
    b = vlm.encode(two_object_trials())
    ids = b.inputs["input_ids"]
    assert torch.equal(b.inputs["mm_token_type_ids"], (ids == vlm.image_token_id).to(torch.int32))
    without = {k: v for k, v in b.inputs.items() if k != "mm_token_type_ids"}
    with pytest.raises(ValueError):
        vlm.model(**without)


def test_chat_format_has_no_system_prompt(vlm):
    t = two_object_trials()[0]
    question = tasks.color_retrieval(t.scene, t.scene.objects[0])
    text = vlm.encode([question]).texts[0]
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>") and "system" not in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    completion = vlm.encode([t]).texts[0]
    assert "<|vision_end|>Complete the sentence" in completion
    assert "<|im_end|>\n<|im_start|>assistant\nIn this image there is" in completion
    assert not completion.endswith("<|im_end|>\n")


def _published_processor():
    """Qwen3-VL's preprocessor_config.json settings (PIL backend)."""
    return image_processor_class("Qwen2VLImageProcessor")(
        patch_size=16, temporal_patch_size=2, merge_size=2, size={"shortest_edge": 65536, "longest_edge": 16777216},
        image_mean=[0.5] * 3, image_std=[0.5] * 3)


@pytest.mark.parametrize("grid", [(2, 2), (3, 3)])
def test_object_pixels_land_in_their_tokens_under_the_published_processor(grid):
    """Scenes drawn for the real checkpoints' geometry (32 px tokens) are kept as they are by the published
    processor, and every object's pixels fall exactly into its cell's merged tokens."""
    spec = FAMILIES["qwen3_vl"]
    cfg = PRESETS["Qwen3-VL-8B-Instruct"].config()
    assert geometry_for("qwen3_vl") == spec.default_geometry == Geometry(32)
    assert spec.geometry(cfg, spec.image_processor_for(cfg)) == Geometry(32)
    layout, ip = Geometry(32).layout(*grid), _published_processor()
    blank = spec.process_images(ip, [render(Scene((), grid), layout)])
    side = layout.canvas_px // 32
    assert blank.grid == [(side, side)] and blank.n_tokens == [side * side]
    assert blank.tensors["image_grid_thw"].tolist() == [[1, 2 * side, 2 * side]]
    for cell in [(r, c) for r in range(grid[0]) for c in range(grid[1])]:
        img = spec.process_images(ip, [render(Scene((Obj("red", "square", cell),), grid), layout)])
        diff = np.abs(img.tensors["pixel_values"].numpy() - blank.tensors["pixel_values"].numpy()).max(axis=1)
        tokens = sorted(set((np.nonzero(diff > 1e-6)[0] // 4).tolist()))  # 4 patch rows per merged token
        assert tokens == layout.cell_tokens(cell), cell


def test_tiny_model_geometry_and_object_tokens(vlm):
    scene = Scene((Obj("red", "square", (1, 2)),), (3, 3))
    img = vlm.family.process_images(vlm.image_processor, [vlm.render(tasks.counting(scene))])
    blank = vlm.family.process_images(vlm.image_processor, [vlm.render(tasks.counting(Scene((), (3, 3))))])
    assert vlm.geometry == Geometry(8) and img.grid == [(14, 14)]
    diff = np.abs(img.tensors["pixel_values"].numpy() - blank.tensors["pixel_values"].numpy()).max(axis=1)
    assert sorted(set((np.nonzero(diff > 1e-6)[0] // 4).tolist())) == vlm.layout((3, 3)).cell_tokens((1, 2))
