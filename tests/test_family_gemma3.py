"""Gemma 3: pooled image tokens land on their cells (pixel-exact, real and tiny geometry), the bidirectional image
block (token_type_ids) is fed and respected by the prefix cache, q/k sites sit after the per-head norms and before
rotary embedding, and the prompt layout of Gemma3Processor."""

import pytest
import torch
import transformers as tf

from conftest import tiny, two_object_trials
from vismech.engine import hooks, patching, replay
from vismech.engine import interventions as iv
from vismech.models.families import FAMILIES
from vismech.models.presets import PRESETS
from vismech.scenes import SHAPES, Obj, Scene, render, tasks


def _real():
    """(spec bound to gemma-3-4b-it, its config, the published image-processor settings)."""
    cfg = PRESETS["gemma-3-4b-it"].config()
    spec = type(FAMILIES["gemma3"])().bind(cfg)
    return spec, cfg, spec.image_processor_for(cfg)


@pytest.mark.parametrize("grid", [(2, 2), (3, 3)])
def test_real_geometry_every_object_pixel_is_pooled_into_its_cells_tokens(grid):
    """896 px scenes through the published processor settings and the projector of a real-size config (its 4x4
    average pool over 64x64 SigLIP patches): the image tokens that receive any pixel of an object are exactly
    tokens of its cell, and each of its cell's tokens averages the 16 patches of its own 56 px block."""
    spec, cfg, ip = _real()
    layout = spec.geometry(cfg, ip).layout(*grid)
    assert (layout.token_px, layout.grid_tokens, layout.canvas_px) == (56, 16, 896)
    proj = tf.models.gemma3.modeling_gemma3.Gemma3MultiModalProjector(cfg)
    assert proj.kernel_size == 4 and proj.patches_per_image == 64
    proj.mm_soft_emb_norm = torch.nn.Identity()  # read the pooled channels out directly
    with torch.no_grad():
        proj.mm_input_projection_weight.zero_()
        proj.mm_input_projection_weight[:3, :3] = torch.eye(3)
    white = spec.process_images(ip, [render(Scene((), grid), layout)]).tensors["pixel_values"][0]
    cells = [(r, c) for r in range(grid[0]) for c in range(grid[1])]
    for i, cell in enumerate(cells):
        scene = Scene((Obj("red", SHAPES[i % len(SHAPES)], cell),), grid)
        img = spec.process_images(ip, [render(scene, layout)])
        assert img.n_tokens == [256] and img.grid == [(16, 16)]
        pv = img.tensors["pixel_values"][0]
        assert pv.shape == (3, 896, 896)
        drawn = ((pv - white).abs().amax(0) > 1e-6).float()  # [896, 896]
        patch = drawn.reshape(64, 14, 64, 14).mean((1, 3))  # fraction of each 14 px patch the object covers
        rows, cols = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        feats = torch.zeros(1, 64 * 64, 1152)
        feats[0, :, 0], feats[0, :, 1], feats[0, :, 2] = rows.flatten(), cols.flatten(), patch.flatten()
        with torch.no_grad():
            tokens = proj(feats)[0]  # [256, hidden]
        hit = set(torch.nonzero(tokens[:, 2] > 0).flatten().tolist())
        assert hit and hit <= set(layout.cell_tokens(cell)), cell
        for t in layout.cell_tokens(cell):
            r, c = divmod(t, 16)
            assert (tokens[t, 0].item(), tokens[t, 1].item()) == pytest.approx((4 * r + 1.5, 4 * c + 1.5))


def test_tiny_object_tokens_carry_the_pooled_patches_of_their_cell():
    """Patch-coded vision features through the tiny model's own projector (avg-pool 2x2) land, at the positions
    vismech records for each object, as the means of the patches of the object's token blocks."""
    vlm = tiny("gemma3")
    t = two_object_trials()[1]
    b = vlm.encode([t])
    proj = vlm.model.model.multi_modal_projector
    n = proj.patches_per_image

    def code(mod, args):
        x = torch.zeros_like(args[0])
        x[..., 0] = (torch.arange(n * n) // n).float()
        x[..., 1] = (torch.arange(n * n) % n).float()
        return (x,)

    w = proj.mm_input_projection_weight.detach().clone()
    seen = {}
    handles = [proj.register_forward_pre_hook(code),
               proj.mm_soft_emb_norm.register_forward_hook(lambda m, a, out: a[0]),
               vlm.layers[0].register_forward_pre_hook(
                   lambda m, a, k: seen.update(x=(a[0] if a else k["hidden_states"])), with_kwargs=True)]
    try:
        with torch.no_grad():
            proj.mm_input_projection_weight.zero_()
            proj.mm_input_projection_weight[0, 0] = proj.mm_input_projection_weight[1, 1] = 1.0
        vlm.logits(b)
    finally:
        with torch.no_grad():
            proj.mm_input_projection_weight.copy_(w)
        for h in handles:
            h.remove()
    x, k = seen["x"][0], proj.kernel_size
    layout = vlm.layout(t.scene.grid)
    assert k == 2 and layout.grid_tokens == 10
    for o in t.scene.objects:
        got = [(round(x[p, 0].item(), 3), round(x[p, 1].item(), 3)) for p in b.objects[0][o.cell]]
        want = [(k * r + (k - 1) / 2, k * c + (k - 1) / 2) for r, c in
                (divmod(i, layout.grid_tokens) for i in layout.cell_tokens(o.cell))]
        assert got == want


def test_token_type_ids_open_the_image_block_and_matter():
    """The batch carries token_type_ids (1 on image tokens); with them the first image token attends to the last
    one (the model's own mask), without them the logits differ (transformers falls back to causal silently); the
    tiny model's image projection is not the class's zero init."""
    vlm = tiny("gemma3")
    b = vlm.encode(two_object_trials())
    tt = b.inputs["token_type_ids"]
    assert [torch.nonzero(row).flatten().tolist() for row in tt] == b.image_tokens
    inp, full = replay.lm_inputs(vlm, b)
    masks = inp.tensors["attention_mask"]
    assert set(masks) == {"full_attention", "sliding_attention"}
    for m in masks.values():
        for row, pos in enumerate(b.image_tokens):
            assert m[row, 0, pos[0], pos[-1]] and not m[row, 0, pos[-1], pos[-1] + 1]
    causal = vlm.logits({k: v for k, v in b.inputs.items() if k != "token_type_ids"})
    assert (causal - full).abs().max() > 1e-3
    # the image reaches the language model (the class initialises its projection to zero; the tiny model draws it)
    other = vlm.logits({**b.inputs, "pixel_values": b.inputs["pixel_values"].flip(-1)})
    assert (other - full).abs().max() > 1e-3


def test_the_prefix_cache_ends_before_the_image_block_of_an_edit_inside_it():
    """Keys edited at object tokens (key-intervention): the cached prefix ends where the earliest image block
    starts, and the engine's edited logits equal a plain hook on k_norm in a full forward."""
    vlm = tiny("gemma3")
    trials = two_object_trials()
    b = vlm.encode(trials)
    first = min(p for objs in b.objects for ps in objs.values() for p in ps)
    runs = iv.EditedRuns(vlm, b, first_position=first)
    assert first > runs.p0 == min(pos[0] for pos in b.image_tokens)
    assert runs.inp.causal_start(b.last) == b.last  # text after the image stays causal
    layer, kv, d = 1, 1, vlm.head_dim
    g = torch.Generator().manual_seed(0)
    rows = [r for r, objs in enumerate(b.objects) for ps in objs.values() for _ in ps]
    pos = [p for objs in b.objects for ps in objs.values() for p in ps]
    delta = torch.randn(len(pos), d, generator=g)
    edit = hooks.Edit("k", layer, torch.tensor(rows), torch.tensor(pos), torch.tensor(kv), delta, mode="add")
    fast = runs.logits([edit])

    def post(m, a, out):  # k_norm's output: [batch, kv_heads, pos, dim]
        y = out.clone()
        for j, (r, p) in enumerate(zip(rows, pos)):
            y[r, kv, p] += delta[j]
        return y

    h = vlm.attention(layer).k_norm.register_forward_hook(post)
    try:
        hand = vlm.logits(b)
    finally:
        h.remove()
    torch.testing.assert_close(fast, hand, atol=2e-5, rtol=0)
    assert (fast - runs.logits()).abs().max() > 1e-4


def test_q_and_k_sites_are_the_normed_heads_that_rotary_embedding_receives():
    """The q/k sites read the per-head RMS-normed queries and keys: rotating them with the layer's rotary tables
    gives exactly what the attention function receives; an edit at the k site reaches those keys as written."""
    vlm = tiny("gemma3")
    b = vlm.encode(two_object_trials())
    layer = 2  # a global layer (its own rotary tables)
    attn = vlm.attention(layer)
    got = {}

    def record(l, inner, module, query, key, value, mask, *a, **k):
        if l == layer:
            got["q"], got["k"] = query.detach().clone(), key.detach().clone()
        return inner(module, query, key, value, mask, *a, **k)

    rot = {}
    h = vlm.layers[layer].register_forward_pre_hook(
        lambda m, a, k: rot.update(cs=k["position_embeddings"]), with_kwargs=True)
    try:
        with hooks.capture(vlm, [("q", layer), ("k", layer)]) as sites, hooks.attention_function(vlm, record):
            vlm.logits(b)
    finally:
        h.remove()
    cos, sin = rot["cs"]
    rope = tf.models.gemma3.modeling_gemma3.apply_rotary_pos_emb
    q, k = sites[("q", layer)].transpose(1, 2), sites[("k", layer)].transpose(1, 2)  # -> [batch, heads, pos, dim]
    q_rot, k_rot = rope(q, k, cos, sin)
    assert torch.equal(q_rot, got["q"]) and torch.equal(k_rot, got["k"])
    # normed: the k site is not the k_proj output
    raw = {}
    h = attn.k_proj.register_forward_hook(lambda m, a, out: raw.update(k=out.detach()))
    try:
        vlm.logits(b)
    finally:
        h.remove()
    assert not torch.allclose(raw["k"].view(sites[("k", layer)].shape), sites[("k", layer)])
    # an edit at the k site is the rotated key's pre-image: set one key, read it back rotated
    value = torch.randn(vlm.head_dim)
    p = b.last
    with hooks.intervene(vlm, [hooks.Edit("k", layer, torch.tensor([1]), torch.tensor([p]), torch.tensor([0]),
                                          value)]), hooks.attention_function(vlm, record):
        vlm.logits(b)
    edited = k.clone()
    edited[1, 0, p] = value
    assert torch.equal(rope(q, edited, cos, sin)[1], got["k"])


def test_prompt_layout_of_the_processor_and_vismech_format():
    """The checkpoint framing expands the template's <start_of_image> as Gemma3Processor does; vismech's own
    format repeats the soft token between the image delimiters."""
    spec = FAMILIES["gemma3"]
    text = "<bos><start_of_turn>user\n<start_of_image>What colour?<end_of_turn>\n<start_of_turn>model\n"
    at = text.index(spec.image_marker(processor=True))
    out, added = spec.expand_placeholder(text, at, 3, None, processor=True)
    run = "\n\n<start_of_image>" + "<image_soft_token>" * 3 + "<end_of_image>\n\n"
    assert out == text.replace("<start_of_image>", run) and added == len(run) - len("<start_of_image>")
    vlm = tiny("gemma3")
    b = vlm.encode([tasks.counting(Scene((Obj("red", "square", (0, 0)),), (2, 2)))])
    assert b.texts[0].startswith("<start_of_turn>user\n<start_of_image>" + "<image_soft_token>" * 100
                                 + "<end_of_image>")
    assert b.texts[0].endswith("<end_of_turn>\n<start_of_turn>assistant\n")
    toks = vlm.tokenizer.convert_ids_to_tokens(b.inputs["input_ids"][0].tolist())
    assert toks[:3] + toks[-3:] == ["<start_of_turn>", "user", "<start_of_image>", "<end_of_turn>",
                                    "<start_of_turn>", "assistant"]


def test_local_layers_with_a_window_shorter_than_the_prompt_patch_exactly():
    """Sliding-window layers whose window (40) is shorter than the prompt (129 tokens): the fast engine (its prefix
    cache keeps every key; the model's masks apply the window) equals one full forward per head."""
    from vismech.models.families import family_for_config
    from vismech.models.tiny import build_tiny
    from vismech.models.vlm import VLM

    model, tok = build_tiny("gemma3")
    model.config.text_config.sliding_window = 40
    for layer in model.model.language_model.layers:
        if layer.self_attn.is_sliding:
            layer.self_attn.sliding_window = 40
    spec = family_for_config(model.config)
    vlm = VLM(model, tok, spec.image_processor_for(model.config), spec, "tiny:gemma3 (window 40)")
    b = vlm.encode(two_object_trials())
    assert b.length > 3 * 40
    pos = [m[0] for m in b.mentions]
    with hooks.hooked(vlm, "v", 0, lambda x: -x):
        src = patching.capture_z(vlm, b, pos)
    tid = torch.stack([vlm.answer_ids(b, ["blue", "blue"]), vlm.answer_ids(b, ["red", "green"])], 1)
    heads = [(0, 0), (1, 2), (2, 3)]
    fast = patching.head_patch(vlm, b, src, pos, tid, heads=heads)
    slow = patching.naive_head_patch(vlm, b, src, pos, tid, heads=heads)
    assert (fast - slow).abs().max() < 1e-5 and (slow - vlm.logits(b).gather(1, tid)).abs().max() > 1e-3
    narrow = vlm.logits(b)
    assert (narrow - tiny("gemma3").logits(tiny("gemma3").encode(two_object_trials()))).abs().max() > 1e-4
