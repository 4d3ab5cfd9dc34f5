"""The fast engine's cut of the language model's inputs (``engine.replay.LMInputs``), on hand-made inputs of every
kind a family passes: M-RoPE positions [axes, batch, pos], 2-D and 4-D masks, per-row tensors, inputs packed over
a mask's positions (Qwen3-VL's DeepStack features, a list of them), and values that are not tensors."""

import torch

from vismech.engine.replay import LMInputs


def _inputs():
    B, T = 2, 5
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 1, 0]], dtype=torch.bool)  # 3 + 2 marked positions
    packed = torch.arange(5 * 2, dtype=torch.float32).view(5, 2)  # rows of (row 0: pos 1, 2, 4; row 1: pos 0, 3)
    tensors = {
        "inputs_embeds": torch.arange(B * T * 3, dtype=torch.float32).view(B, T, 3),
        "attention_mask": {"full": torch.zeros(B, 1, T, T), "sliding": torch.zeros(B, 1, T, T)},  # built by the model
        "position_ids": torch.arange(3 * B * T).view(3, B, T),
        "visual_pos_masks": mask,
        "deepstack_visual_embeds": [packed, packed + 100],
        "token_type_ids": torch.ones(B, T, dtype=torch.long),
        "return_dict": True,
        "scale": torch.tensor(2.0),
    }
    return LMInputs(tensors, B, {"deepstack_visual_embeds": "visual_pos_masks"}), packed


def test_rows_slice_cuts_every_input_on_its_batch_axis():
    inp, packed = _inputs()
    one = inp.rows_slice(1, 2)
    t = one.tensors
    assert one.rows == 1 and torch.equal(t["inputs_embeds"], inp.tensors["inputs_embeds"][1:])
    assert torch.equal(t["position_ids"], inp.tensors["position_ids"][:, 1:])
    assert [x.tolist() for x in t["deepstack_visual_embeds"]] == [packed[3:].tolist(), (packed[3:] + 100).tolist()]
    assert t["attention_mask"]["sliding"].shape == (1, 1, 5, 5) and t["return_dict"] is True
    assert t["scale"] is inp.tensors["scale"]


def test_repeat_stacks_copies_on_the_batch_axis_and_packs_in_row_order():
    inp, packed = _inputs()
    two = inp.repeat(2)
    t = two.tensors
    assert two.rows == 4 and torch.equal(t["position_ids"][:, 2:], inp.tensors["position_ids"])
    assert torch.equal(t["visual_pos_masks"], inp.tensors["visual_pos_masks"].repeat(2, 1))
    assert torch.equal(t["deepstack_visual_embeds"][0], torch.cat([packed, packed]))
    # what the model does with them: rows of the packed tensor land on the marked positions, row-major
    h = torch.zeros(4, 5, 2)
    h[t["visual_pos_masks"]] += t["deepstack_visual_embeds"][0]
    assert torch.equal(h[2:], h[:2]) and torch.equal(h[0, 4], packed[2]) and torch.equal(h[1, 3], packed[4])


def test_positions_give_a_suffix_after_a_cached_prefix():
    inp, packed = _inputs()
    suf = inp.positions(2, 5)
    assert torch.equal(suf["inputs_embeds"], inp.tensors["inputs_embeds"][:, 2:])
    assert torch.equal(suf["token_type_ids"], inp.tensors["token_type_ids"][:, 2:])
    assert torch.equal(suf["position_ids"], inp.tensors["position_ids"][:, :, 2:])
    assert torch.equal(suf["visual_pos_masks"], inp.tensors["visual_pos_masks"][:, 2:])
    m = inp.tensors["attention_mask"]["full"]
    m[:] = torch.arange(25, dtype=torch.float32).view(5, 5)
    assert torch.equal(inp.positions(2, 5)["attention_mask"]["full"], m[:, :, 2:, :])  # its queries, keys up to T
    # marked positions >= 2: row 0 pos 2 and 4 (packed rows 1, 2), row 1 pos 3 (packed row 4)
    assert torch.equal(suf["deepstack_visual_embeds"][0], packed[[1, 2, 4]])
    pre = inp.positions(0, 2)
    assert torch.equal(pre["attention_mask"]["full"], m[:, :, :2, :2])
    assert torch.equal(pre["deepstack_visual_embeds"][1], packed[[0, 3]] + 100)


def test_a_2d_mask_keeps_the_prefix_keys_of_a_suffix():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    inp = LMInputs({"inputs_embeds": torch.zeros(2, 4, 3), "attention_mask": mask}, 2)
    assert torch.equal(inp.positions(1, 4)["attention_mask"], mask)
    assert torch.equal(inp.positions(0, 1)["attention_mask"], mask[:, :1])
    assert torch.equal(inp.repeat(3).tensors["attention_mask"], mask.repeat(3, 1))


def test_a_cached_prefix_never_ends_inside_a_block_of_tokens_that_see_each_other():
    """``causal_start``: causal attention keeps the cut; a 4-D mask whose block [3, 6) of row 0 (and [2, 4) of row
    1) attends both ways moves a cut inside it back to the block's start (the earliest over rows); padding queries
    (row 1's position 0, seen by no query) that see later keys do not count; additive float masks alike."""
    T = 8
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    m = causal.repeat(2, 1, 1, 1)
    m[0, 0, 3:6, 3:6] = True
    m[1, 0, 2:4, 2:4] = True
    m[1, 0, :, 0] = False  # row 1, position 0: padding, no query sees it ...
    m[1, 0, 0, 1:] = True  # ... and it sees every later key (as a mask may fill a fully masked row)
    embeds = torch.zeros(2, T, 3)
    inp = LMInputs({"inputs_embeds": embeds, "attention_mask": {"full": m, "sliding": causal.repeat(2, 1, 1, 1)}}, 2)
    assert [inp.causal_start(p) for p in range(T)] == [0, 1, 2, 2, 2, 2, 6, 7]
    flt = torch.zeros(2, 1, T, T).masked_fill(~m, torch.finfo(torch.float32).min)
    assert LMInputs({"inputs_embeds": embeds, "attention_mask": flt}, 2).causal_start(4) == 2
    plain = LMInputs({"inputs_embeds": embeds, "attention_mask": torch.ones(2, T)}, 2)
    assert [plain.causal_start(p) for p in range(T)] == list(range(T))
    assert LMInputs({"inputs_embeds": embeds, "attention_mask": {"full": causal.repeat(2, 1, 1, 1)}},
                    2).causal_start(5) == 5
