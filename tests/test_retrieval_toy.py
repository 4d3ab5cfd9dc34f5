"""The colour-retrieval toy reads an organism's inputs exactly: its pool rebuilt into the trained language model
gives the organism's own logits, and its object masks follow the scenes."""

import pytest
import torch

from vismech.models.load import load_vlm
from vismech.organism import data
from vismech.organism import retrieval_toy as rt
from vismech.scenes import sets


@pytest.fixture(scope="module", params=["organism", "organism-llava"])
def organism(request):
    vlm = load_vlm(request.param)
    trials = sets.color_retrieval_set(5, (2, 2), seed=3, n_objects=3, colors=data.ALL_COLORS, shapes=data.ALL_SHAPES)
    return vlm, trials, rt.build_pool(vlm, trials, frozen=True, chunk=3)


def test_pool_marks_each_object_and_names_the_other_colours(organism):
    vlm, trials, pool = organism
    colors, shapes = list(data.ALL_COLORS), list(data.ALL_SHAPES)
    for j, t in enumerate(trials):
        for o in t.scene.objects:
            mine = (pool.color[j] == colors.index(o.color)) & (pool.shape[j] == shapes.index(o.shape))
            assert int(mine.sum()) == 4  # an object covers 2x2 tokens in both organisms
        assert int((pool.color[j] >= 0).sum()) == 12
        want = {vlm.tokenizer.convert_tokens_to_ids(o.color) for o in t.scene.objects if o.color != t.answer}
        assert set(pool.others[j]) == want and len(pool.others[j]) == 2


def test_toy_with_the_trained_weights_gives_the_organisms_logits(organism):
    vlm, trials, pool = organism
    arch = "qwen2_5_vl" if pool.positions.dim() == 3 else "llava"
    toy = rt.ToyLM(arch, len(pool.image), "frozen", abs_pos=False, positions="own")
    toy.lm.load_state_dict(vlm.model.model.language_model.state_dict())
    toy.head.load_state_dict(vlm.model.lm_head.state_dict())
    rows = torch.arange(len(trials))
    with torch.no_grad():
        ref = vlm.logits(vlm.encode(trials).inputs)
        assert (toy(pool, rows) - ref).abs().max() < 1e-4
        toy.one_d = True  # the sequence index as position: LLaVA's own; not Qwen's M-RoPE
        diff = (toy(pool, rows) - ref).abs().max()
    assert diff < 1e-4 if arch == "llava" else diff > 1e-2


def test_run_trains_and_reports_each_evaluation():
    r = rt.run("organism", "synthetic", abs_pos=True, text={"num_hidden_layers": 2}, steps=4, batch=8,
               pool_size=16, heldout=8, eval_every=2, progress=False)
    assert [e["step"] for e in r["evals"]] == [2, 4] and r["steps"] == 4 and r["arch"] == "qwen2_5_vl"
    assert all(0 <= e["accuracy"] <= 1 and 0 <= e["other_colour"] <= 1 for e in r["evals"])
    with pytest.raises(ValueError, match="features must be one of"):
        rt.ToyLM("llava", 4, "pixels", False, "own")


def test_single_head_reads_the_colour_of_the_token_whose_shape_matches():
    # features: one-hot shape in dims 0-9, one-hot colour in dims 10-19; keys read the shape, values the colour
    n_s, n_c = len(data.ALL_SHAPES), len(data.ALL_COLORS)
    d = n_s + n_c
    head = rt.SingleHead(d, k=d)
    with torch.no_grad():
        for lin in (head.key, head.value, head.out):
            lin.bias.zero_()
        head.key.weight.copy_(torch.diag(torch.cat([torch.full((n_s,), 50.0), torch.zeros(n_c)])))
        head.value.weight.copy_(torch.diag(torch.cat([torch.zeros(n_s), torch.ones(n_c)])))
        head.out.weight.copy_(torch.cat([torch.zeros(n_c, n_s), torch.eye(n_c)], 1))
        head.query.weight.copy_(torch.cat([torch.eye(n_s), torch.zeros(n_s, n_c)], 1)[:, :d])
        feats = torch.zeros(2, 3, d)
        objects = [[(0, 4), (1, 7), (2, 1)], [(3, 0), (0, 2), (4, 5)]]  # (shape, colour) of three tokens a row
        for r, objs in enumerate(objects):
            for i, (s, c) in enumerate(objs):
                feats[r, i, s] = feats[r, i, n_s + c] = 1.0
        logits = head(feats, torch.tensor([1, 4]))
    assert logits.argmax(-1).tolist() == [7, 5]
    # RMS normalisation makes each feature entry 1 / 0.1^0.5; the matching token's attention logit is 50 x that /
    # 20^0.5 = 35 against 0 for the others, so the output is its colour entry
    assert torch.allclose(logits[0, 7], torch.tensor(1 / (1 / 20 * 2) ** 0.5), atol=1e-4)


def test_trials_fill_one_to_every_cell_of_the_grid_equally():
    from vismech.organism.retrieval_toy import _trials

    for grid, cells in (((2, 2), 4), ((3, 3), 9)):
        train, held = _trials(2 * cells, 5, 0, grid)
        counts = [len(t.scene.objects) for t in train]
        assert sorted(counts) == sorted(list(range(1, cells + 1)) * 2)
        assert all(t.scene.grid == grid for t in train + held)
        assert [len(t.scene.objects) for t in held] == [2] * 5
