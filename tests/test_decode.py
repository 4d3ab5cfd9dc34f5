"""Greedy generation from captured language-model inputs (``engine.decode.greedy``) equals HF ``generate``
(``VLM.generate_ids``) on every tiny family: unpadded and left-padded rows, rows stacked as copies of the batch,
and under head ablations active at every step (counting-ablation's row blocks)."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, tiny
from vismech.engine import decode, replay
from vismech.engine import interventions as iv
from vismech.scenes.sets import counting_set, scene_description_set


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_from_captured_inputs_equals_generate(family):
    vlm = tiny(family)
    b = vlm.encode(scene_description_set(2, (2, 2), n_objects=3, seed=1)
                   + scene_description_set(2, (2, 2), n_objects=2, seed=2))
    assert (b.inputs["attention_mask"] == 0).any()  # some rows are left-padded
    inp, none = replay.lm_inputs(vlm, b, logits=False)  # the text backbone does not run
    assert none is None
    ref = vlm.generate_ids(b, 6)
    logits, got = decode.greedy(vlm, inp.repeat(2), b.inputs["attention_mask"].repeat(2, 1), 6)
    assert torch.equal(got, ref.repeat(2, 1)), family
    full = vlm.logits(b)
    assert (logits - full.repeat(2, 1)).abs().max() < 1e-4 * max(1.0, float(full.abs().max())), family


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_under_row_block_ablations_equals_generate_per_setting(family):
    vlm = tiny(family)
    trials = counting_set(3, seed=0, grid=(3, 3))
    b = vlm.encode(trials)
    sets = [[], [(0, 1), (1, 0)], [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)][::3]]
    inp, _ = replay.lm_inputs(vlm, b)
    with iv.zero_heads_per_block(vlm, sets, len(b)):
        got = decode.greedy(vlm, inp.repeat(len(sets)), b.inputs["attention_mask"].repeat(len(sets), 1), 8).ids
    outs = []
    for g, heads in enumerate(sets):
        with iv.zero_heads(vlm, heads):
            ref = vlm.generate_ids(b, 8)
        outs.append(ref)
        block = got[g * len(b):(g + 1) * len(b), :ref.shape[1]]
        assert torch.equal(block, ref), (family, g)
        assert (got[g * len(b):(g + 1) * len(b), ref.shape[1]:] == vlm.tokenizer.pad_token_id).all()
    if family != "idefics3":  # the ablations change what the model writes (tiny Idefics3 ends at once, whatever)
        assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_replays_is_checked_once_and_a_missed_input_falls_back_to_generate(monkeypatch):
    """``decode.replays`` holds on a tiny family and is remembered; where the captured inputs miss one (M-RoPE
    positions dropped here) it is False, and counting-ablation then generates with HF ``generate``, giving the same
    hits as the replayed path."""
    from vismech.experiments import counting_ablation

    vlm = tiny("qwen2_5_vl")
    b = vlm.encode(counting_set(3, seed=0, grid=(3, 3)))
    batches = [(b, vlm.answers(b, [[t.answer] for t in b.trials]))]
    sets = [[], [(0, 1), (1, 0)]]
    vlm._replays = None
    assert decode.replays(vlm, b) is True
    got = counting_ablation.accuracies(vlm, batches, sets, True, 5, rows=6)
    real = replay.lm_inputs

    def missing(v, batch, logits=True):
        inp, full = real(v, batch, logits)
        inp.tensors.pop("position_ids", None)
        return inp, full

    monkeypatch.setattr(replay, "lm_inputs", missing)
    assert decode.replays(vlm, b) is True  # remembered: not checked again
    vlm._replays = None
    assert decode.replays(vlm, b) is False
    monkeypatch.setattr(decode, "greedy", None)  # the fallback must not use it
    assert counting_ablation.accuracies(vlm, batches, sets, True, 5, rows=6) == got
    vlm._replays = None
