"""The ``cma`` experiment: its scores equal hand-computed ones, identical contexts score 0, significance finds a
planted head, and it runs end to end on every family."""

import json

import numpy as np
import pytest
import torch

from conftest import FAMILIES, tiny
from vismech.app.runner import run_one
from vismech.analysis.cma import null_mean_scores
from vismech.engine import mediation
from vismech.experiments import cma
from vismech.experiments.common import Context, resolve_options
from vismech.scenes.core import CounterfactualPair
from vismech.scenes.counterfactual import cma_pairs


def _hand_patch(vlm, clean_trial, src_trial, pos_clean, pos_src, layer, head, answers):
    """s for one head: c2's head output at ``pos_src`` written into c1 at ``pos_clean``, by plain forwards and
    plain hooks written here (no vismech hooks)."""
    clean, cf = vlm.encode([clean_trial]), vlm.encode([src_trial])
    mod, d = vlm.attention(layer).o_proj, vlm.head_dim
    got = {}
    h = mod.register_forward_pre_hook(
        lambda m, a: got.__setitem__("z", a[0][0, pos_src, head * d:(head + 1) * d].clone()))
    try:
        vlm.logits(cf)
    finally:
        h.remove()

    def write(m, a):
        x = a[0].clone()
        x[0, pos_clean, head * d:(head + 1) * d] = got["z"]
        return (x,)

    h = mod.register_forward_pre_hook(write)
    try:
        patched = vlm.logits(clean)[0]
    finally:
        h.remove()
    base = vlm.logits(clean)[0]
    a1, a1s = (int(t) for t in vlm.first_token_pairs(clean, [answers[0]], [answers[1]]))
    return float((patched[a1s] - patched[a1]) - (base[a1s] - base[a1]))


def _hand_score(vlm, pair, condition, layer, head):
    pos = mediation.condition_positions(vlm.encode([pair.clean]), condition)[0]
    return _hand_patch(vlm, pair.clean, pair.counterfactual, pos, pos, layer, head, (pair.answer, pair.answer_star))


@pytest.mark.parametrize("family", FAMILIES)
def test_experiment_score_equals_hand_written_hook(family):
    vlm = tiny(family)
    for condition in ("id_retrieval", "feature_retrieval"):
        pairs = cma_pairs(condition, 2, seed=3)
        scores, _ = mediation.condition_scores(vlm, pairs, condition, null=False)
        assert scores.shape == (vlm.n_layers, vlm.n_heads, 2)
        for layer, head in [(0, 1), (vlm.n_layers - 1, 3)]:
            hand = [_hand_score(vlm, p, condition, layer, head) for p in pairs]
            np.testing.assert_allclose(scores[layer, head], hand, rtol=0, atol=3e-7)
            if condition == "feature_retrieval":  # the check is not vacuous: the patch moves the logits
                assert np.abs(hand).max() > 3e-6


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_patching_from_an_identical_context_scores_exactly_zero(family):
    vlm = tiny(family)
    pairs = [CounterfactualPair(p.condition, p.clean, p.clean, p.answer, p.answer_star)
             for p in cma_pairs("id_retrieval", 3, seed=1)]
    for condition in ("id_retrieval", "id_selection"):
        exact, _ = mediation.condition_scores(vlm, pairs, condition, engine="naive", null=False)
        assert (exact == 0).all()
        fast, _ = mediation.condition_scores(vlm, pairs, condition, engine="fast", null=False)
        assert np.abs(fast).max() < 1e-5


def test_rows_with_different_position_counts_and_their_null_match_hand_patches(monkeypatch):
    """Real tokenizers give mentions of different lengths: shorter rows are padded; scores and re-paired null
    scores still equal hand-written patches of exactly each row's own positions."""
    vlm = tiny("llava")
    pairs = cma_pairs("feature_retrieval", 4, seed=5)
    uneven = lambda batch, condition: [[batch.last - 2, batch.last] if i % 2 == 0 else [batch.last]  # noqa: E731
                                       for i in range(len(batch))]
    monkeypatch.setattr(mediation, "condition_positions", uneven)
    scores, null = mediation.condition_scores(vlm, pairs, "feature_retrieval", batch_size=4, seed=0)
    partner = mediation.null_partners(pairs, "feature_retrieval", seed=0)
    last = vlm.encode([pairs[0].clean]).last
    pos = [[last - 2, last] if i % 2 == 0 else [last] for i in range(4)]
    layer, head = vlm.n_layers - 1, 2
    for i, p in enumerate(pairs):
        ans = (p.answer, p.answer_star)
        hand = _hand_patch(vlm, p.clean, p.counterfactual, pos[i], pos[i], layer, head, ans)
        assert abs(scores[layer, head, i] - hand) < 3e-7
        j = partner[i]
        src = [pos[j][min(k, len(pos[j]) - 1)] for k in range(len(pos[i]))]
        hand_null = _hand_patch(vlm, p.clean, pairs[j].counterfactual, pos[i], src, layer, head, ans)
        assert abs(null[layer, head, i] - hand_null) < 3e-7
    assert np.abs(scores[layer, head]).max() > 3e-6 and np.abs(null[layer, head]).max() > 3e-6


def test_layout_mismatch_is_a_clear_error():
    vlm = tiny("qwen2_5_vl")
    a, b = cma_pairs("id_selection", 2, seed=0)
    bad = CounterfactualPair("id_selection", a.clean, b.clean, a.answer, a.answer_star)
    assert a.clean.prompt != b.clean.prompt
    with pytest.raises(ValueError, match="tokenize differently|differ in shape"):
        mediation.condition_scores(vlm, [bad], "id_selection", null=False)


def test_null_partners_carry_the_clean_value_of_the_condition_variable():
    """A re-paired source has the variable's clean value (so a head that only carries the variable does nothing
    under the null) wherever another pair has it, else a value unlike the real counterfactual's."""
    cf, clean = mediation.condition_variable, lambda p, c: mediation.condition_variable(p, c, "clean")
    for condition, n in (("id_retrieval", 12), ("id_selection", 12), ("feature_retrieval", 40)):
        pairs = cma_pairs(condition, n, seed=0)
        matched = 0
        for i, j in enumerate(mediation.null_partners(pairs, condition, seed=0)):
            assert j != i
            have = any(cf(pairs[k], condition) == clean(pairs[i], condition) for k in range(n) if k != i)
            if have:
                assert cf(pairs[j], condition) == clean(pairs[i], condition)
                matched += 1
            else:
                assert cf(pairs[j], condition) != cf(pairs[i], condition)
        assert matched >= n // 2  # the clean value is common enough in these sets
    p = cma_pairs("id_selection", 1, seed=3)[0]
    assert clean(p, "id_selection") == tuple(p.clean.meta["target_cell"]) != cf(p, "id_selection")


def test_null_mean_scores_resample_one_head_at_a_time():
    null = np.zeros((2, 3, 5))
    null[1, 2] = 10.0  # one head's null is all 10: its resampled means are exactly 10, the rest exactly 0
    m = null_mean_scores(null, 600, seed=0)
    assert set(np.unique(m)) == {0.0, 10.0}
    assert 0.05 < (m == 10).mean() < 0.3  # about 1/6 of the draws pick that head


def _ctx(vlm, tmp_path, **opts):
    return Context(vlm, tmp_path, resolve_options(cma.DEFAULTS, opts), seed=0, batch_size=8, show_progress=False)


def test_significance_finds_a_planted_head(tmp_path, monkeypatch):
    vlm = tiny("llava")
    L, H, n = vlm.n_layers, vlm.n_heads, 40
    rng = np.random.default_rng(0)

    def planted(vlm, pairs, condition, *a, **k):
        s, nl = rng.normal(0, 0.1, (L, H, n)), rng.normal(0, 0.1, (L, H, n))
        if condition == "id_selection":
            s[1, 2] += 1.0
        return s, nl

    monkeypatch.setattr(cma, "condition_scores", planted)
    res = cma.cma_scores(_ctx(vlm, tmp_path, n=n))
    sig = res.significance["id_selection"]
    assert sig["mask"][1, 2] and sig["count"] == 1
    assert res.top_k("id_selection", 1) == [(1, 2)]
    assert res.significance["id_retrieval"]["count"] == 0
    assert res.null_means["id_selection"].shape == (2000,)


def test_paired_test_measures_each_head_against_its_own_control_patches(tmp_path, monkeypatch):
    """With ``test="paired"`` a head whose control patches move the answer a lot (another variable: the feature heads'
    in ID selection) no longer raises the bar for the others: a planted head that the pooled null misses passes, the
    head with the large control scores does not, and nothing else does; the scores are the same stored unit as the
    pooled test's (computed once, the test left out of its key), and its significance equals
    ``analysis.cma.paired_significance`` with the pooled null's quantile as the floor."""
    from vismech.analysis.cma import paired_significance

    vlm = tiny("llava")
    L, H, n = 8, 8, 40  # scores of a model of organism-ids' shape (the sweep itself is replaced)
    calls = []

    def planted(vlm, pairs, condition, *a, **k):
        calls.append(condition)
        rng = np.random.default_rng(len(calls))
        s, nl = rng.normal(0, 0.1, (L, H, n)), rng.normal(0, 0.1, (L, H, n))
        s[1, 2] += 6.0  # the planted head: real scores 6, its control patches 0.5
        nl[1, 2] += 0.5
        nl[6, 0] += 6.0  # two heads whose control patches carry another variable (real scores 0)
        nl[6, 1] += 6.0
        return s, nl

    monkeypatch.setattr(cma, "condition_scores", planted)
    opts = {"n": n, "conditions": ["id_selection"]}
    pooled = cma.cma_scores(_ctx(vlm, tmp_path), opts)
    assert not pooled.significance["id_selection"]["mask"][1, 2]  # the pooled null's tail hides it
    paired = cma.cma_scores(_ctx(vlm, tmp_path), {**opts, "test": "paired"})
    sig = paired.significance["id_selection"]
    assert sig["mask"][1, 2] and sig["count"] == 1 and not sig["mask"][6].any()
    assert calls == ["id_selection"]  # the second test read the stored scores
    want = paired_significance(paired.scores["id_selection"], paired.null_scores["id_selection"], 0.05,
                               floor=pooled.significance["id_selection"]["threshold"], seed=0)
    assert np.array_equal(sig["mask"], want["mask"]) and np.allclose(sig["p_adjusted"], want["p_adjusted"])


def test_cma_scores_is_computed_once_and_downstream_options_apply(tmp_path, monkeypatch):
    vlm = tiny("llava")
    calls = []

    def fake(vlm, pairs, condition, *a, **k):
        calls.append(len(pairs))
        return np.zeros((vlm.n_layers, vlm.n_heads, len(pairs))), np.zeros((vlm.n_layers, vlm.n_heads, len(pairs)))

    monkeypatch.setattr(cma, "condition_scores", fake)
    ctx = Context(vlm, tmp_path, {"n": 99, "cma_n": 3}, show_progress=False)  # another experiment's context
    first = cma.cma_scores(ctx)
    assert cma.cma_scores(ctx) is first and list(ctx.shared["cma"].values()) == [first]
    assert calls == [3, 3, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_cma_runs_end_to_end(family, tmp_path):
    vlm = tiny(family)
    ctx = _ctx(vlm, tmp_path, n=3, null_samples=500)
    summary = run_one(cma, ctx)
    json.dumps(summary)
    rows = (tmp_path / "results" / "cma_heads.csv").read_text().splitlines()
    assert rows[0] == "model,experiment,measure,value,ci_low,ci_high,n,condition,layer,head,se,p,p_adjusted,significant"
    assert len(rows) == 1 + 3 * vlm.n_layers * vlm.n_heads
    for name in ["cma_stage_map"] + [f"cma_{c}" for c in cma.CONDITIONS]:
        for ext in ("png", "pdf"):
            assert (tmp_path / "figures" / f"{name}.{ext}").stat().st_size > 0
    for c in cma.CONDITIONS:
        s = summary["conditions"][c]
        assert s["n_pairs"] == 3 and len(s["top_k"]) == min(10, vlm.n_layers * vlm.n_heads)
        assert s["line"].startswith(cma.LABELS[c])
    arr = np.load(tmp_path / "results" / "cma_scores.npz")
    assert arr["scores_id_selection"].shape == (vlm.n_layers, vlm.n_heads, 3)
    res = summary["resolution"]  # the dtype's rounding step beside the null's spread
    assert res["dtype"] == "float32" and res["eps"] == 2.0 ** -23
    assert res["conditions"]["id_selection"]["null_sd"] == pytest.approx(float(arr["null_scores_id_selection"].std()))
    assert torch.is_tensor(torch.as_tensor(arr["null_means_id_selection"]))
