"""The patching engine equals one plain forward per head, on every family."""

import numpy as np
import pytest
import torch

from conftest import tiny, two_object_trials
from vismech.engine import hooks, patching, replay
from vismech.analysis.cma import logit_diff_score


def _setup(vlm):
    clean = vlm.encode(two_object_trials())
    pos = [[clean.last], [clean.last]]
    with hooks.hooked(vlm, "v", 0, lambda x: -x):  # a source run that differs from the clean one
        src = patching.capture_z(vlm, clean, pos)
    tid = vlm.answer_ids(clean, ["blue", "blue"]), vlm.answer_ids(clean, ["red", "green"])
    return clean, pos, src, torch.stack(tid, 1)


@pytest.mark.parametrize("use_cache", [False, True])
def test_batched_rows_equal_one_forward_per_head(vlm, use_cache):
    clean, pos, src, tid = _setup(vlm)
    fast = patching.head_patch(vlm, clean, src, pos, tid, rows_per_forward=5, use_cache=use_cache)
    slow = patching.naive_head_patch(vlm, clean, src, pos, tid)
    assert fast.shape == (vlm.n_layers * vlm.n_heads, 2, 2)
    assert (fast - slow).abs().max() < 1e-4
    # a patch that matters moves the logits
    base = vlm.logits(clean).gather(1, tid)
    assert (fast - base).abs().max() > 1e-4


def test_prefix_cache_engine_at_mid_prompt_positions(vlm):
    """Patching the first mention's tokens (the ID-retrieval positions, mid-prompt, different per row)."""
    clean = vlm.encode(two_object_trials())
    pos = [m[0] for m in clean.mentions]
    with hooks.hooked(vlm, "v", 0, lambda x: -x):
        src = patching.capture_z(vlm, clean, pos)
    tid = torch.stack([vlm.answer_ids(clean, ["blue", "blue"]), vlm.answer_ids(clean, ["red", "green"])], 1)
    slow = patching.naive_head_patch(vlm, clean, src, pos, tid)
    for shared in (True, False):  # shared-prefix attention, and the engine that copies the prefix per row
        fast = patching.head_patch(vlm, clean, src, pos, tid, rows_per_forward=7, shared_prefix=shared)
        assert (fast - slow).abs().max() < 1e-4


def test_hand_written_single_head_patch_gives_the_same_score(vlm):
    """CMA score from the engine == one computed with a plain hook written here by hand."""
    clean, pos, src, tid = _setup(vlm)
    layer, head = 1, 1
    fast = patching.head_patch(vlm, clean, src, pos, tid, heads=[(layer, head)])[0]
    mod = vlm.attention(layer).o_proj
    d = vlm.head_dim

    def pre(m, args):
        x = args[0].clone()
        x[:, clean.last, head * d:(head + 1) * d] = src[layer][:, 0, head]
        return (x,)

    h = mod.register_forward_pre_hook(pre)
    try:
        hand = vlm.logits(clean).gather(1, tid)
    finally:
        h.remove()
    clean_logits = vlm.logits(clean).gather(1, tid)
    a, b = torch.tensor([0, 0]), torch.tensor([1, 1])
    s_fast = logit_diff_score(clean_logits.numpy(), fast.numpy(), a.numpy(), b.numpy())
    s_hand = logit_diff_score(clean_logits.numpy(), hand.numpy(), a.numpy(), b.numpy())
    assert abs(s_fast - s_hand).max() < 1e-4


def test_patching_from_an_identical_context_scores_exactly_zero(vlm):
    clean, pos, _, tid = _setup(vlm)
    same = patching.capture_z(vlm, clean, pos)
    out = patching.naive_head_patch(vlm, clean, same, pos, tid, heads=[(0, 0), (2, 3)])
    base = vlm.logits(clean).gather(1, tid)
    s = logit_diff_score(base.numpy(), out.numpy(), [0, 0], [1, 1])
    assert (s == 0).all()


def test_additive_intervention_with_alpha_zero_changes_nothing(vlm):
    clean, pos, src, tid = _setup(vlm)
    out = patching.naive_head_patch(vlm, clean, src, pos, tid, heads=[(1, 0)], mode="add", scale=0.0)
    assert torch.equal(out[0], vlm.logits(clean).gather(1, tid))


def test_mismatched_layouts_are_refused():
    import pytest

    from conftest import tiny

    vlm = tiny("llava")
    t = two_object_trials()
    with pytest.raises(ValueError, match="differ in shape|tokenize differently"):
        patching.check_same_layout(vlm.encode(t), vlm.encode(t[::-1]))


def test_attribution_is_exact_for_a_linear_readout_and_ranks_like_exact_patching():
    """On a tiny model the first-order estimate correlates with exact scores; with a tiny source step it is exact."""
    from scipy.stats import spearmanr

    from conftest import tiny
    from vismech.engine.attribution import attribution_scores

    vlm = tiny("qwen2_5_vl")
    clean, pos, src, tid = _setup(vlm)
    a1, a1s = tid[:, 0], tid[:, 1]
    base = vlm.logits(clean).gather(1, tid)
    # a small step from the clean values: first order is (nearly) exact
    same = patching.capture_z(vlm, clean, pos)
    step = {l: same[l] + 1e-3 * (src[l] - same[l]) for l in same}
    exact = patching.head_patch(vlm, clean, step, pos, tid)
    s_exact = logit_diff_score(base.numpy(), exact.numpy(), a1.new_zeros(2).numpy(), a1.new_ones(2).numpy())
    est = attribution_scores(vlm, clean, step, pos, a1, a1s).reshape(-1, 2).numpy()
    assert abs(est - s_exact).max() < 1e-3 * abs(s_exact).max() + 1e-7
    full = patching.head_patch(vlm, clean, src, pos, tid)
    s_full = logit_diff_score(base.numpy(), full.numpy(), [0, 0], [1, 1]).mean(1)
    est_full = attribution_scores(vlm, clean, src, pos, a1, a1s).reshape(-1, 2).numpy().mean(1)
    assert spearmanr(s_full, est_full).statistic > 0.5


def test_out_of_memory_halves_the_stacked_heads_and_gives_the_same_result(monkeypatch):
    from conftest import tiny

    vlm = tiny("llava")
    clean, pos, src, tid = _setup(vlm)
    ref = patching.head_patch(vlm, clean, src, pos, tid, rows_per_forward=12)
    real, sizes = patching._rows_forward, []

    def flaky(vlm_, inp, prefix, shared, starts, tail, vocab=None):
        sizes.append(len(starts) * len(clean))
        if len(starts) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(vlm_, inp, prefix, shared, starts, tail, vocab)

    monkeypatch.setattr(patching, "_rows_forward", flaky)
    out = patching.head_patch(vlm, clean, src, pos, tid, rows_per_forward=12)
    assert sizes[:3] == [24, 12, 6] and max(sizes[3:]) <= 6
    assert torch.equal(out, ref) or (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("condition", ["id_retrieval", "id_selection", "feature_retrieval"])
def test_fast_engine_equals_naive_on_the_organism(condition):
    """The shipped organism, every CMA condition, a spread of heads: fast == naive within 1e-4."""
    from vismech.engine.mediation import condition_positions
    from vismech.models.load import load_vlm
    from vismech.scenes.counterfactual import cma_pairs

    vlm = load_vlm("organism", device="cpu")
    pairs = cma_pairs(condition, 4, seed=3)
    clean = vlm.encode([p.clean for p in pairs])
    cf = vlm.encode([p.counterfactual for p in pairs])
    pos = condition_positions(clean, condition)
    src = patching.capture_z(vlm, cf, pos)
    tid = torch.stack(vlm.first_token_pairs(clean, [p.answer for p in pairs], [p.answer_star for p in pairs]), 1)
    heads = [(l, (3 * l + 1) % vlm.n_heads) for l in range(vlm.n_layers)]
    fast = patching.head_patch(vlm, clean, src, pos, tid, heads=heads)
    slow = patching.naive_head_patch(vlm, clean, src, pos, tid, heads=heads)
    assert (fast - slow).abs().max() < 1e-4


def test_the_fast_engine_checks_its_replay_against_the_full_forward(monkeypatch):
    """The normal path passes its self-check; a capture that drops an input (here Qwen's M-RoPE position ids:
    the replay then runs 1-D positions) stops every fast engine with a one-line error naming the family."""
    from conftest import tiny
    from vismech.engine.interventions import EditedRuns
    from vismech.errors import UserError

    vlm = tiny("qwen2_5_vl")
    clean = vlm.encode(two_object_trials())
    pos = [m[0] for m in clean.mentions]  # mid-prompt: the prefix cache and the shared-prefix engine run
    with hooks.hooked(vlm, "v", 0, lambda x: -x):
        src = patching.capture_z(vlm, clean, pos)
    tid = torch.stack([vlm.answer_ids(clean, ["blue", "blue"]), vlm.answer_ids(clean, ["red", "green"])], 1)
    inp, full = replay.lm_inputs(vlm, clean)
    assert replay.check_replay(vlm, full, replay.lm_logits(vlm, inp)) < 1e-5
    monkeypatch.setattr(hooks, "RUN_CONTROL", hooks.RUN_CONTROL + ("position_ids",))
    for kw in (dict(shared_prefix=True), dict(shared_prefix=False), dict(use_cache=False)):
        with pytest.raises(UserError, match=r"replay of the qwen2_5_vl language model differs from the full "
                                            r"forward by [0-9.e-]+ \(tolerance 0.001 at float32\)"):
            patching.head_patch(vlm, clean, src, pos, tid, heads=[(0, 0)], **kw)
    with pytest.raises(UserError, match="qwen2_5_vl language model differs"):
        EditedRuns(vlm, clean, first_position=min(p[0] for p in pos))


def test_replay_tolerance_follows_the_dtype_and_the_logit_scale():
    from conftest import tiny
    from vismech.errors import UserError

    vlm = tiny("llava")
    full = torch.tensor([[0.5, -40.0, 3.0]])  # scale 40: float32 allows 0.04
    assert replay.check_replay(vlm, full, full + 0.039) == pytest.approx(0.039, abs=1e-5)
    with pytest.raises(UserError, match=r"differs from the full forward by 0.041 \(tolerance 0.04 at float32\)"):
        replay.check_replay(vlm, full, full + 0.041)
    small = torch.tensor([[0.5, -0.2]])  # scale below 1 counts as 1
    with pytest.raises(UserError):
        replay.check_replay(vlm, small, small + 2e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an fp32 model run under bf16 autocast (training snapshots)
        assert replay.compute_dtype(vlm) == torch.bfloat16
        assert replay.check_replay(vlm, small, small + 6e-3) == pytest.approx(6e-3, abs=1e-6)
    assert replay.compute_dtype(vlm) == torch.float32
    assert replay.replay_tolerance(torch.float32) == 1e-3
    assert replay.replay_tolerance(torch.float16) == 8 * 2 ** -10
    assert replay.replay_tolerance(torch.bfloat16) == 2 ** -4
    # deeper models round more: 4x the depth of 8 layers allows 2x the steps; up to 8 layers nothing changes
    assert replay.replay_tolerance(torch.bfloat16, 32) == 2 ** -3
    assert replay.replay_tolerance(torch.bfloat16, 2) == 2 ** -4
    assert replay.replay_tolerance(torch.float32, 64) == 1e-3


def test_replay_check_allows_a_deep_models_rounding():
    from conftest import tiny
    from vismech.errors import UserError

    vlm = tiny("llava")
    full = torch.tensor([[0.5, -40.0, 3.0]])  # scale 40
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(UserError, match="tolerance 2.5 at bfloat16"):  # 8 steps of 2^-7 at scale 40
            replay.check_replay(vlm, full, full + 2.6)
        vlm.n_layers, shallow = 32, vlm.n_layers  # as deep as a 7-8B model: twice the steps
        try:
            assert replay.check_replay(vlm, full, full + 2.6) == pytest.approx(2.6, abs=1e-5)
            with pytest.raises(UserError, match="tolerance 5 at bfloat16"):
                replay.check_replay(vlm, full, full + 5.1)
        finally:
            vlm.n_layers = shallow


def test_a_replay_that_fails_outright_is_a_user_error_naming_the_family():
    from conftest import tiny
    from vismech.errors import UserError

    vlm = tiny("llava")
    with pytest.raises(UserError, match=r"cannot replay the llava language model on its captured inputs \(The size"):
        with replay.replay_errors(vlm):
            torch.zeros(40, 2) + torch.zeros(200, 2)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # out of memory passes (the engine retries smaller chunks)
        with replay.replay_errors(vlm):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")


def test_cma_baseline_scores_and_null_share_one_setup_and_equal_separate_setups(monkeypatch):
    import contextlib

    from vismech.engine import mediation
    from vismech.scenes.counterfactual import cma_pairs

    vlm = tiny("qwen2_5_vl")
    pairs = cma_pairs("id_retrieval", 4, 0, (2, 2))
    calls = []
    real = replay.lm_inputs
    monkeypatch.setattr(patching, "lm_inputs", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared = mediation.condition_scores(vlm, pairs, "id_retrieval", batch_size=2)
    n_shared = len(calls)
    monkeypatch.setattr(patching, "reused_setup", contextlib.nullcontext)
    separate = mediation.condition_scores(vlm, pairs, "id_retrieval", batch_size=2)
    assert n_shared == 2 and len(calls) - n_shared == 6  # one set-up per chunk instead of three
    assert np.array_equal(shared[0], separate[0]) and np.array_equal(shared[1], separate[1])
    assert np.abs(shared[0]).max() > 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_prefix_cache_cut_from_the_clean_forward_equals_a_run_of_the_prefix(family):
    from vismech.scenes.counterfactual import cma_pairs

    vlm = tiny(family)
    batch = vlm.encode([p.clean for p in cma_pairs("id_retrieval", 3, 0, (2, 2))])
    kept, full = replay.lm_inputs(vlm, batch, keys=True)
    plain, full_plain = replay.lm_inputs(vlm, batch)
    assert plain.kv is None and len(kept.kv) == vlm.n_layers
    assert float((full - full_plain).abs().max()) < 1e-5
    p0 = batch.length - 4
    cut, ran = replay.prefix_cache(vlm, kept, p0), replay.prefix_cache(vlm, plain, p0)
    for (k1, v1), (k2, v2) in zip(cut.kv, ran.kv):
        assert k1.shape == k2.shape == (len(batch), vlm.n_kv_heads, p0, vlm.head_dim)
        assert float((k1 - k2).abs().max()) < 1e-5 and float((v1 - v2).abs().max()) < 1e-5


def test_the_kept_cache_holds_no_autograd_graph():
    """A checkpoint loaded from disk has weights that require grad; the cache kept for a whole experiment must not
    hold the full forward's graph (every layer's saved activations) alive with it."""
    from vismech.scenes.counterfactual import cma_pairs

    vlm = tiny("qwen2_5_vl")
    vlm.model.requires_grad_(True)
    batch = vlm.encode([p.clean for p in cma_pairs("id_retrieval", 2, 0, (2, 2))])
    kept, full = replay.lm_inputs(vlm, batch, keys=True)
    assert kept.kv is not None and not full.requires_grad
    assert not any(t.requires_grad for kv in kept.kv for t in kv)


def test_head_patch_set_up_runs_the_text_backbone_once_less():
    vlm = tiny("qwen2_5_vl")
    clean, pos, src, tid = _setup(vlm)
    calls = []
    handle = hooks.language_model(vlm).register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        fast = patching.head_patch(vlm, clean, src, pos, tid, heads=[(1, 0)])
    finally:
        handle.remove()
    # the full forward (inputs, clean logits, keys and values), the clean suffix pass, the self-check, the rows;
    # no separate run of the prefix
    assert len(calls) == 4
    naive = patching.naive_head_patch(vlm, clean, src, pos, tid, heads=[(1, 0)])
    assert float((fast - naive).abs().max()) < 1e-4
