"""ID vectors, additive / key-swap / zero edits against hand-written hooks, and the intervention experiments end
to end (id-intervention, key-intervention, counting-ablation)."""

import json

import numpy as np
import pytest
import torch

from conftest import FAMILIES, tiny
from vismech.app.runner import run_one
from vismech.engine import hooks
from vismech.engine import interventions as iv
from vismech.errors import UserError
from vismech.experiments import cma, counting_ablation, id_intervention, key_intervention
from vismech.experiments.common import Context, resolve_options
from vismech.scenes.sets import scene_description_set

TWO = ["qwen2_5_vl", "llava"]


def _trials(n=5, seed=0):
    return scene_description_set(n, (1, 2), n_objects=2, seed=seed, entropy="high")


def _capture_plain(vlm, batch, module, rows_pos, head, d, post=False):
    """[items, d] activations of one head at given (row, position) items, by a plain hook written here."""
    got = {}
    if post:
        h = module.register_forward_hook(lambda m, a, out: got.__setitem__("x", out.detach().clone()))
    else:
        h = module.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].detach().clone()))
    try:
        vlm.logits(batch)
    finally:
        h.remove()
    return torch.stack([got["x"][r, p, head * d:(head + 1) * d] for r, p in rows_pos])


def _logits_with_plain_hooks(vlm, batch, pre=(), post=()):
    """Logits of ``batch`` with hand-written hooks registered here: ``pre`` (module, fn) forward-pre hooks and
    ``post`` (module, fn) forward hooks, all removed afterwards (the independent reference for vismech's edits)."""
    handles = [m.register_forward_pre_hook(fn) for m, fn in pre] + [m.register_forward_hook(fn) for m, fn in post]
    try:
        return vlm.logits(batch)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", TWO)
def test_id_vectors_are_label_means_of_plain_captures(family):
    vlm = tiny(family)
    trials = _trials(6)
    b = vlm.encode(trials)
    labels = [t.mentioned[0].cell for t in trials]
    vec = iv.id_vectors(vlm, trials, labels, "q", [(1, 3), (2, 0)], lambda b: [m[0] for m in b.mentions],
                        batch_size=4)
    assert vec.labels == sorted(set(labels)) and sum(vec.counts.values()) == 6
    d = vlm.head_dim
    for j, (layer, head) in enumerate(vec.heads):
        items = [(i, p) for i in range(len(b)) for p in b.mentions[i][0]]
        x = _capture_plain(vlm, b, vlm.attention(layer).q_proj, items, head, d, post=True)
        per_row = {i: x[[k for k, (r, _) in enumerate(items) if r == i]].mean(0) for i in range(len(b))}
        for lab in vec.labels:
            want = torch.stack([per_row[i] for i, x in enumerate(labels) if x == lab]).mean(0)
            torch.testing.assert_close(vec.d(lab)[j], want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one ID label per trial"):
        iv.id_vectors(vlm, trials, labels[:2], "z", [(0, 0)], lambda b: [[b.last]] * len(b))
    # a label the estimation trials never had (too few of them to cover every cell): one line that says what to do
    with pytest.raises(UserError, match=r"no ID vector for \(9, 9\).*raise n_estimate \(--set n_estimate=N\)"):
        vec.diff((9, 9), vec.labels[0])


@pytest.mark.parametrize("family", TWO)
def test_additive_edits_equal_a_hand_written_hook_and_alpha_zero_is_bit_equal(family):
    vlm = tiny(family)
    trials = _trials(4)
    b = vlm.encode(trials)
    heads = [(1, 2), (2, 0)]
    labels = [t.target.cell for t in trials]
    vec = iv.id_vectors(vlm, trials, labels, "z", heads, lambda b: [[b.last]] * len(b))
    orig, tgt = labels, [t.mentioned[0].cell for t in trials]
    pos = [[b.last]] * len(b)
    runs = iv.EditedRuns(vlm, b, first_position=b.last)
    clean = runs.logits()
    zero = runs.logits(iv.additive_edits(vec, orig, tgt, pos, 0.0))
    assert torch.equal(zero, clean)
    with hooks.intervene(vlm, iv.additive_edits(vec, orig, tgt, pos, 0.0)):
        assert torch.equal(vlm.logits(b), vlm.logits(b))
        full_zero = vlm.logits(b)
    assert torch.equal(full_zero, vlm.logits(b))

    alpha, d = 7.0, vlm.head_dim
    fast = runs.logits(iv.additive_edits(vec, orig, tgt, pos, alpha))
    hooks_ = []
    for layer in {l for l, _ in heads}:
        def pre(m, a, layer=layer):
            x = a[0].clone()
            for j, (l, h) in enumerate(heads):
                if l == layer:
                    for i in range(len(b)):
                        x[i, b.last, h * d:(h + 1) * d] += alpha * (vec.d(tgt[i])[j] - vec.d(orig[i])[j])
            return (x,)
        hooks_.append((vlm.attention(layer).o_proj, pre))
    hand = _logits_with_plain_hooks(vlm, b, pre=hooks_)
    torch.testing.assert_close(fast, hand, atol=2e-5, rtol=0)
    assert (fast - clean).abs().max() > 1e-4  # the edit did something


def test_random_direction_control_keeps_the_norm_and_changes_the_direction():
    vlm = tiny("llava")
    trials = _trials(4)
    b = vlm.encode(trials)
    labels = [t.target.cell for t in trials]
    vec = iv.id_vectors(vlm, trials, labels, "z", [(1, 2), (2, 0)], lambda b: [[b.last]] * len(b))
    tgt = [t.mentioned[0].cell for t in trials]
    real = iv.additive_edits(vec, labels, tgt, [[b.last]] * 4, 3.0)
    rand = iv.additive_edits(vec, labels, tgt, [[b.last]] * 4, 3.0, direction="random", seed=1)
    for e, r in zip(real, rand):
        torch.testing.assert_close(e.values.norm(dim=-1), r.values.norm(dim=-1))
        cos = torch.nn.functional.cosine_similarity(e.values, r.values, dim=-1)
        assert cos.abs().max() < 0.9
        assert torch.equal(e.rows, r.rows) and torch.equal(e.positions, r.positions)


@pytest.mark.parametrize("family", TWO)
def test_key_swap_edits_equal_a_hand_written_key_hook(family):
    vlm = tiny(family)
    trials = _trials(4)
    b = vlm.encode(trials)
    top = [(1, 3), (1, 2), (2, 1)]
    kv = iv.kv_heads_for(vlm, top)
    assert kv == [(1, hooks.kv_head_of(vlm, 3)), (2, hooks.kv_head_of(vlm, 1))] == [(1, 1), (2, 0)]
    vec = iv.key_id_vectors(vlm, trials, kv)
    assert vec.site == "k" and vec.counts == {(0, 0): 4, (0, 1): 4}  # both objects of every trial
    pairs = [(t.mentioned[0].cell, t.target.cell) for t in trials]
    first = min(p for objs in b.objects for ps in objs.values() for p in ps)
    runs = iv.EditedRuns(vlm, b, first_position=first)
    assert torch.equal(runs.logits(iv.key_swap_edits(vec, b, pairs, 0.0)), runs.logits())
    alpha, d = 2.0, vlm.head_dim
    fast = runs.logits(iv.key_swap_edits(vec, b, pairs, alpha))
    hooks_ = []
    for layer in {l for l, _ in kv}:
        def post(m, a, out, layer=layer):
            y = out.clone()
            for j, (l, h) in enumerate(kv):
                if l != layer:
                    continue
                for i, (c0, c1) in enumerate(pairs):
                    for a_, b_ in ((c0, c1), (c1, c0)):
                        for p in b.objects[i][a_]:
                            y[i, p, h * d:(h + 1) * d] += alpha * (vec.d(b_)[j] - vec.d(a_)[j])
            return y
        hooks_.append((vlm.attention(layer).k_proj, post))
    hand = _logits_with_plain_hooks(vlm, b, post=hooks_)
    torch.testing.assert_close(fast, hand, atol=2e-5, rtol=0)
    assert (fast - runs.logits()).abs().max() > 1e-5


def _zeroing_hooks(vlm, heads):
    """Plain pre-hooks on o_proj that zero ``heads``' slices of its input: the hand-written zero ablation."""
    d, out = vlm.head_dim, []
    for layer in sorted({l for l, _ in heads}):
        def pre(m, a, layer=layer):
            x = a[0].clone()
            for l, h in heads:
                if l == layer:
                    x[..., h * d:(h + 1) * d] = 0
            return (x,)
        out.append((vlm.attention(layer).o_proj, pre))
    return out


def test_zero_heads_equals_a_hand_written_zeroing_hook_and_runs_under_generation():
    vlm = tiny("qwen2_5_vl")
    b = vlm.encode(_trials(2))
    heads = [(0, 1), (2, 3), (2, 0)]
    with iv.zero_heads(vlm, heads):
        fast = vlm.logits(b)
        vlm.generate(b, 3)
    hand = _logits_with_plain_hooks(vlm, b, pre=_zeroing_hooks(vlm, heads))
    assert torch.equal(fast, hand)
    assert not torch.equal(fast, vlm.logits(b))


@pytest.mark.parametrize("family", TWO)
def test_ablated_heads_by_weights_equal_a_zeroing_hook_and_restore_the_weights_bit_exact(family):
    """Zeroing the heads' input columns of o_proj is the zero ablation, exactly: the logits equal those of a plain
    hook zeroing the heads' o_proj inputs; the weights come back bit for bit, also after an exception."""
    vlm = tiny(family)
    b = vlm.encode(_trials(2))
    heads, d = [(0, 1), (1, 3), (1, 0)], vlm.head_dim
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    with iv.ablated_heads(vlm, heads):
        ablated = vlm.logits(b)
        w = vlm.attention(1).o_proj.weight
        assert not w[:, 0:d].any() and not w[:, 3 * d:4 * d].any() and w[:, d:2 * d].any()
    assert torch.equal(ablated, _logits_with_plain_hooks(vlm, b, pre=_zeroing_hooks(vlm, heads)))
    assert not torch.equal(ablated, vlm.logits(b))
    with pytest.raises(RuntimeError, match="stop"):
        with iv.ablated_heads(vlm, heads):
            raise RuntimeError("stop")
    with pytest.raises(ValueError, match="out of range"):  # (0, 0) is zeroed before (0, H) is refused
        with iv.ablated_heads(vlm, [(0, 0), (0, vlm.n_heads)]):
            pass
    after = vlm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_head_order_and_k_grids():
    m = np.array([[0.1, 3.0], [2.0, 2.0], [-1.0, np.nan]])
    assert counting_ablation.head_order(m) == [(0, 1), (1, 0), (1, 1), (0, 0), (2, 0), (2, 1)]
    assert counting_ablation.k_grid(2560) == [0, 51, 128, 256, 512, 1280, 2560]
    assert id_intervention.k_grid(784) == [1, 2, 5, 10, 20, 50, 100, 200] and id_intervention.k_grid(12) == [1, 2, 5]


def _planted_cma(vlm, seed=0):
    rng = np.random.default_rng(seed)
    L, H = vlm.n_layers, vlm.n_heads
    mean = {c: rng.normal(size=(L, H)) for c in cma.CONDITIONS}
    return cma.CMAResult(tuple(cma.CONDITIONS), mean, {c: np.zeros((L, H)) for c in mean},
                         {c: mean[c][..., None] for c in mean}, {c: {} for c in mean})


def _ctx(mod, vlm, tmp_path, shared=None, **opts):
    ctx = Context(vlm, tmp_path, resolve_options(mod.DEFAULTS, opts), seed=0, batch_size=4,
                  shared=shared if shared is not None else {}, show_progress=False)
    if shared is None:
        cma.use_cma(ctx, _planted_cma(vlm))
    return ctx


def _figures_exist(tmp_path, names):
    for name in names:
        for ext in ("png", "pdf"):
            assert (tmp_path / "figures" / f"{name}.{ext}").stat().st_size > 0


@pytest.mark.parametrize("family", TWO)
def test_id_intervention_end_to_end(family, tmp_path):
    vlm = tiny(family)
    ctx = _ctx(id_intervention, vlm, tmp_path, n=5, n_estimate=6, k_grid=[1, 3], alphas=[0, 30])
    summary = run_one(id_intervention, ctx)
    json.dumps(summary)
    rows = [r.split(",") for r in (tmp_path / "results" / "id_intervention.csv").read_text().splitlines()]
    head, rows = rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]
    assert len(rows) == 3 * 2 * 2 * 2 and {"value", "ci_low", "ci_high", "n", "baseline_rate"} <= set(head)
    assert {r["measure"] for r in rows} == {"efficacy"}
    for r in rows:  # alpha = 0 changes nothing: efficacy is exactly the no-edit repeat rate
        if float(r["alpha"]) == 0:
            assert r["value"] == r["baseline_rate"]
    assert set(summary["best"]) == set(cma.CONDITIONS) and summary["best"]["feature_retrieval"]["site"] == "q"
    _figures_exist(tmp_path, ["id_intervention_surface", "id_intervention_best"])


def test_id_intervention_computes_cma_when_the_run_has_not(tmp_path):
    vlm = tiny("llava")
    ctx = _ctx(id_intervention, vlm, tmp_path, shared={}, n=2, n_estimate=4, k_grid=[2], alphas=[5],
               conditions=["id_selection"], cma_n=2)
    id_intervention.run(ctx)
    assert cma.cma_scores(ctx).scores["id_selection"].shape == (vlm.n_layers, vlm.n_heads, 2)


@pytest.mark.parametrize("family", TWO)
def test_key_intervention_end_to_end(family, tmp_path):
    vlm = tiny(family)
    summary = run_one(key_intervention, _ctx(key_intervention, vlm, tmp_path, n=4, n_estimate=4, top_k=3))
    json.dumps(summary)
    assert set(summary["efficacy"]) == {"none", "id", "random"} and summary["alpha"] == 2.0
    top = _planted_cma(vlm).top_k("feature_retrieval", 3)
    assert summary["key_heads"] == [list(x) for x in iv.kv_heads_for(vlm, top)]
    assert len((tmp_path / "results" / "key_intervention.csv").read_text().splitlines()) == 4
    _figures_exist(tmp_path, ["key_intervention"])


def test_key_intervention_skips_idefics2_with_a_note(tmp_path):
    summary = key_intervention.run(_ctx(key_intervention, tiny("idefics2"), tmp_path, n=2, n_estimate=2))
    assert "no per-patch image tokens" in summary["skipped"]


@pytest.mark.parametrize("family", TWO)
def test_counting_ablation_end_to_end(family, tmp_path):
    vlm = tiny(family)
    total = vlm.n_layers * vlm.n_heads
    summary = run_one(counting_ablation, _ctx(counting_ablation, vlm, tmp_path, n=3, k_grid=[0, 2, total],
                                         random_draws=2, max_new_tokens=4))
    json.dumps(summary)
    acc = summary["accuracy"]
    for m in ("generation", "first_token"):
        for k in ("0", str(total)):  # no head / every head ablated: the rankings coincide
            a = acc[m][k]
            assert a["top"] == a["bottom"] == a["random_mean"]
    rows = (tmp_path / "results" / "counting_ablation.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 2 * (2 + 2)  # K values x measures x (top, bottom, 2 random draws)
    _figures_exist(tmp_path, ["counting_ablation"])


def test_counting_settings_batched_as_row_blocks_equal_one_setting_at_a_time():
    """Zero-ablation settings run as row blocks of one batch (KV-cached generation) give the logits, texts and
    hits of one setting at a time under ``zero_heads``."""
    from vismech.scenes import answers
    from vismech.scenes.sets import counting_set

    vlm = tiny("qwen2_5_vl")
    trials = counting_set(3, seed=0, grid=(3, 3))
    b = vlm.encode(trials)
    sets = [[], [(0, 1), (2, 3)], [(1, 0), (1, 2), (2, 0)]]
    bb = vlm.encode(trials * len(sets))
    with iv.zero_heads_per_block(vlm, sets, len(b)):
        logits = vlm.logits(bb)
        texts = vlm.generate(bb, 5)
    for g, heads in enumerate(sets):
        with iv.zero_heads(vlm, heads):
            ref, ref_texts = vlm.logits(b), vlm.generate(b, 5)
        assert (logits[g * 3:(g + 1) * 3] - ref).abs().max() < 1e-5
        assert texts[g * 3:(g + 1) * 3] == ref_texts
    assert (logits[3:6] - logits[:3]).abs().max() > 1e-4  # the ablations change the model's output
    batches = [(b, vlm.answers(b, [[t.answer] for t in trials]))]
    got = counting_ablation.accuracies(vlm, batches, sets, True, 5, rows=4)  # 3 trials per forward: 3 passes
    for (first, gen), heads in zip(got, sets):
        with iv.zero_heads(vlm, heads):
            want_first = vlm.score_answers(b, [[t.answer] for t in trials]).greedy[:, 0].int().tolist()
            want_gen = [int(answers.is_correct(t, x)) for t, x in zip(trials, vlm.generate(b, 5))]
        assert first == want_first and gen == want_gen
    grown = counting_ablation.accuracies(vlm, batches, sets, True, 5, rows=3,  # 1 setting, then 2 per pass
                                         resize=lambda r, ran, peak: 2 * r)
    assert grown == got
    scored = counting_ablation.accuracies(vlm, batches, sets, False, 5, rows=4)  # a scoring forward, no generation
    assert [(f, []) for f, _ in got] == scored


@pytest.mark.parametrize("family", FAMILIES)
def test_stacked_edit_sets_equal_one_full_forward_each(family):
    """``EditedRuns.logits_many`` / ``scores_many`` run many edit sets as row blocks of few forwards (shared-prefix
    blocks joining at their own first edited layer, in any order given); each set's logits equal a full forward of
    the model under that set alone (left-padded rows of different lengths, the family's own positions and KV heads)."""
    vlm = tiny(family)
    trials = _trials(2, seed=3) + scene_description_set(2, (2, 2), n_objects=3, seed=4, entropy="high")
    b = vlm.encode(trials)
    assert (b.inputs["attention_mask"] == 0).any()  # some rows are left-padded
    g = torch.Generator().manual_seed(0)
    rows = torch.arange(len(b))
    L, H = vlm.n_layers, vlm.n_heads

    def z_edit(layer, head, pos):
        return hooks.Edit("z", layer, rows, torch.full_like(rows, pos), torch.full_like(rows, head),
                          torch.randn(len(b), vlm.head_dim, generator=g) * 3, "add")

    k = hooks.Edit("k", 0, rows, torch.full_like(rows, b.last - 1), torch.zeros_like(rows),
                   torch.randn(len(b), vlm.head_dim, generator=g) * 3, "add")
    sets = [[z_edit(L - 1, H - 1, b.last)], [], [z_edit(0, 0, b.last), z_edit(L - 1, 1, b.last - 1)], [k],
            [z_edit(L // 2, H // 2, b.last - 1)]]
    runs = iv.EditedRuns(vlm, b, first_position=b.last - 1)
    fast = runs.logits_many(sets, blocks=2)
    for es, got in zip(sets, fast):
        with hooks.intervene(vlm, es):
            want = vlm.logits(b)
        torch.testing.assert_close(got, want.float().cpu(), atol=1e-4, rtol=0)
    assert (fast[0] - fast[1]).abs().max() > 1e-3  # the edits do something
    answers = vlm.answers(b, [[t.mentioned[0].name, t.answer] for t in trials])
    scored = iv.EditedRuns(vlm, b, first_position=b.last - 1, answers=answers)
    many = scored.scores_many(sets)
    for es, s in zip(sets, many):
        one = scored.scores(es)
        torch.testing.assert_close(s.scores, one.scores, atol=1e-5, rtol=0)
        assert torch.equal(s.greedy, one.greedy)
