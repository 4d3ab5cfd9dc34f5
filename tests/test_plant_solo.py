"""Solo rows of planting (``PlantSpec.solo``): an interchange row that patches one declared head of its component
alone, its change from the base scaled by the component's head count."""
import contextlib
import dataclasses

import pytest
import torch

from vismech.engine import hooks
from vismech.errors import UserError
from vismech.models.families import family_for_config
from vismech.models.vlm import VLM
from vismech.organism import plant
from vismech.organism import plant_batch as pb
from vismech.organism import position_probe
from vismech.organism.config import build_organism

SIZES = {"text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8),
         "vision": dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, fullatt_block_indexes=[0])}
# two heads in retrieval and gathering (solo rows there), one in selection and features (none there)
SPEC = plant.PlantSpec(binding=((0, 0),), retrieval=((1, 0), (1, 1)), gathering=((2, 0), (2, 1)),
                       selection=((3, 0),), features=((4, 1),), probe_layer=0, solo=1.0, invariance_from=1)


@pytest.fixture(scope="module")
def vlm():
    model, tok, proc = build_organism("qwen2_5_vl", 0, **SIZES)
    return VLM(model.float(), tok, proc, family_for_config(model.config), "tiny-solo", "chat")


def test_solo_kind_reads_the_mark():
    assert plant.solo_kind("S_gathering@1") == ("S_gathering", 1)
    assert plant.solo_kind("R") == ("R", None)
    with pytest.raises(UserError, match="solo rows"):
        plant.PlantSpec(solo=1.5)


def test_solo_rows_mark_one_head_and_leave_every_other_draw_as_without_them():
    without = dataclasses.replace(SPEC, solo=0.0)
    plain, solo = pb.step_plan(without, 5, 3, 4), pb.step_plan(SPEC, 5, 3, 4)
    # step 0 < invariance_from: no solo row
    assert [k for _, k, _ in pb.step_plan(SPEC, 5, 0, 4).b] == [k for _, k, _ in pb.step_plan(without, 5, 0, 4).b]
    assert [(r.trial.prompt, r.answer, s) for r, _, s in plain.b] == [(r.trial.prompt, r.answer, s)
                                                                       for r, _, s in solo.b]
    assert [r.trial.prompt for r in plain.a] == [r.trial.prompt for r in solo.a]
    for (_, k0, _), (_, k1, _) in zip(plain.b, solo.b):
        base, j = plant.solo_kind(k1)
        assert base == k0
        # every row of a two-head component is solo at share 1, none of a one-head component
        assert (j is not None) == (k0 in ("R", "S_gathering")), (k0, k1)
    assert {plant.solo_kind(k)[1] for _, k, _ in solo.b} >= {0, 1}


def test_a_solo_row_patches_one_head_with_the_scaled_change_as_a_hook_made_by_hand(vlm):
    b = pb.make_batch(vlm, SPEC, seed=2, step=4, n=3, end_token="<|im_end|>")
    plan = pb.step_plan(SPEC, 2, 4, 3)
    solo = [k for k, (_, kind, _) in enumerate(plan.b) if plant.solo_kind(kind)[1] is not None]
    assert solo and b["b_solo"] == tuple(solo)
    assert b["b_gain"].tolist() == [2.0 if k in solo else 1.0 for k in range(len(plan.b))]
    with torch.no_grad():
        _, z_a, _, _ = plant.clean_forward(vlm, SPEC, b)
        logits_b = plant.patched_forward(vlm, b, z_a)
    for k in solo + [k for k in range(len(plan.b)) if k not in solo][:2]:
        kind, j = plant.solo_kind(plan.b[k][1])
        heads = {(int(l), int(h)) for _, l, h in b["b_patch"][k].nonzero().tolist()}
        comp = getattr(SPEC, pb.COMPONENT_OF[kind]) if kind in pb.COMPONENT_OF else None
        if j is not None:
            assert heads == {comp[j]}
        src, mask, gain = int(b["b_source"][k]), b["b_patch"][k], float(b["b_gain"][k])
        one = {key: v[k:k + 1] for key, v in plant._inputs(b, "b_").items()}
        g = int(b["b_base"][k])
        grid = b["a_image_grid_thw"]
        per = grid.prod(-1).tolist()
        one["pixel_values"] = b["a_pixel_values"][sum(per[:g]):sum(per[:g + 1])]
        one["image_grid_thw"], one["position_ids"] = grid[g:g + 1], b["b_position_ids"][:, k:k + 1]

        def edit(layer):
            def fn(x):  # x [1, positions, heads, dim]: move the marked entries toward the source, times the gain
                y = x.clone()
                for p, h in mask[:, layer].nonzero().tolist():
                    y[0, p, h] = x[0, p, h] + gain * (z_a[layer][src, p, h] - x[0, p, h])
                return y
            return fn

        with torch.no_grad(), contextlib.ExitStack() as stack:
            for layer in range(vlm.n_layers):
                stack.enter_context(hooks.hooked(vlm, "z", layer, edit(layer)))
            hand = vlm.model(**one, use_cache=False).logits[0]
        assert torch.allclose(hand, logits_b[k], atol=2e-5), (k, (hand - logits_b[k]).abs().max())


def test_the_loss_reports_the_solo_rows_and_they_count_in_their_kinds_loss(vlm):
    b = pb.make_batch(vlm, SPEC, seed=1, step=2, n=3, end_token="<|im_end|>")
    probe = position_probe.make_probe(vlm)
    with torch.no_grad():
        _, metrics = plant.plant_loss(vlm, SPEC, probe, b)
        _, z_a, _, _ = plant.clean_forward(vlm, SPEC, b)
        logits_b = plant.patched_forward(vlm, b, z_a)
    hits = plant.answer_hits(logits_b, b["b_labels"])
    assert float(metrics["iit_solo_acc"]) == pytest.approx(float(hits[list(b["b_solo"])].float().mean()))
    r_rows = (b["b_kind"] == plant.IIT_KINDS.index("R"))
    assert float(metrics["loss_R"]) == pytest.approx(float(plant._ce(logits_b, b["b_labels"])[r_rows].mean()),
                                                     rel=1e-5)
