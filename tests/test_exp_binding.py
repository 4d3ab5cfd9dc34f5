"""The ID-selection experiments ``reuse``, ``relabs-patch`` and ``binding-errors``: golden checks of their logic
(prototypes, exact self-replacement, alpha = 0, generation under an edit, the relative/absolute construction, the
error-tracing counter and its permutation null) and end-to-end runs on two families with explicit head lists."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny
from vismech.app.runner import run_one
from vismech.engine import edits, hooks
from vismech.engine.edits import run_heads
from vismech.experiments import binding_errors, cma, relabs_patch, reuse
from vismech.experiments.cma import select_heads
from vismech.experiments.common import Context, resolve_options
from vismech.store.io import read_csv
from vismech.scenes.sets import entropy_set, spatial_relation_set

HEADS = [(1, 0), (2, 3), (2, 1)]


def _ctx(vlm, mod, path, **opts):
    return Context(vlm, path, resolve_options(mod.DEFAULTS, opts), show_progress=False)


# -- golden checks of the shared last-token machinery -------------------------------------------------------------
def test_capture_matches_a_plain_capture_and_prototypes_are_exact_means():
    vlm = tiny("llava")
    trials = entropy_set((2, 2), "high", k=1)[:6]
    r = run_heads(vlm, trials, HEADS, capture=True, batch_size=4)
    b = vlm.encode(trials)
    with hooks.capture(vlm, [("z", 1), ("z", 2)]) as got:
        vlm.logits(b)
    ref = np.stack([got[("z", l)][:, b.last, h].numpy() for l, h in HEADS], 1)
    np.testing.assert_allclose(r.z, ref, rtol=0, atol=1e-6)  # batches of 4 + 2 vs one batch of 6
    cells = [t.target.cell for t in trials]
    sel = np.array([1, 0, 1, 1, 0, 1], bool)
    protos, fallback = binding_errors.prototypes(r.z, cells, sel)
    for cell, p in protos.items():
        rows = [i for i, c in enumerate(cells) if c == cell and sel[i]]
        rows = rows or [i for i, c in enumerate(cells) if c == cell]
        assert np.array_equal(p, r.z[rows].mean(0))
    assert fallback == [c for c in dict.fromkeys(cells) if not any(sel[i] for i, x in enumerate(cells) if x == c)]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_replacing_with_a_single_trial_prototype_is_exact_and_other_values_move_logits(family):
    vlm = tiny(family)
    t = entropy_set((2, 2), "low", k=1)[5]
    cand = [["red circle", "blue square", "red square"]]
    r = run_heads(vlm, [t], HEADS, candidates=cand, capture=True)
    protos, _ = binding_errors.prototypes(r.z, [t.target.cell], [True])
    same = run_heads(vlm, [t], HEADS, protos[t.target.cell][None], "set", cand)
    assert np.array_equal(same.cand_logits, r.cand_logits) and np.array_equal(same.top, r.top)
    other = run_heads(vlm, [t], HEADS, r.z + 5.0, "set", cand)
    assert np.abs(other.cand_logits - r.cand_logits).max() > 1e-4


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_pure_addition_with_alpha_zero_changes_nothing(family):
    vlm = tiny(family)
    trials = spatial_relation_set(3, seed=1, grid=(2, 2))
    vectors = {t.target.cell: np.full((len(HEADS), vlm.head_dim), 3.0, np.float32) for t in trials}
    controls = reuse.control_cells(trials, 0)
    cells = [t.target.cell for t in trials]
    base = reuse.steer(vlm, trials, HEADS, vectors, cells, None, controls, gen_tokens=2)
    zero = reuse.steer(vlm, trials, HEADS, vectors, cells, 0.0, controls, gen_tokens=2)
    assert base == zero
    r0 = run_heads(vlm, trials, HEADS, candidates=[[t.answer] for t in trials])
    rz = run_heads(vlm, trials, HEADS, np.zeros((3, len(HEADS), vlm.head_dim)), "add",
                         [[t.answer] for t in trials])
    assert np.array_equal(r0.cand_logits, rz.cand_logits)


def test_generation_carries_the_edit_of_the_prompt_forward():
    """Greedy generation under an edit starts with the arg-max of the edited logits (the edit acts in the prefill
    and nowhere else, so decoding steps do not fail on the shorter sequences)."""
    vlm = tiny("llava")
    trials = entropy_set((2, 2), "low", k=1)[:4]
    base = run_heads(vlm, trials, HEADS, candidates=[[t.answer] for t in trials], gen_tokens=2)
    vals = torch.randn(4, len(HEADS), vlm.head_dim, generator=torch.Generator().manual_seed(0)) * 50
    ed = run_heads(vlm, trials, HEADS, vals, "add", [[t.answer] for t in trials], gen_tokens=2)
    assert (ed.top != base.top).any()
    for i in range(4):
        assert ed.texts[i].split()[0] == vlm.tokenizer.decode([int(ed.top[i])]).strip()
        assert base.texts[i].split()[0] == vlm.tokenizer.decode([int(base.top[i])]).strip()
    # one prompt forward for scores and generation (engine.decode) == a scoring forward, then HF generate
    plain = run_heads(vlm, trials, HEADS, vals, "add", [[t.answer] for t in trials])
    assert np.abs(plain.cand_logits - ed.cand_logits).max() < 1e-4 and np.array_equal(plain.top, ed.top)
    b = vlm.encode(trials)
    with edits.edit_last(vlm, HEADS, vals, "add", b.length, b.last):
        assert vlm.generate(b, 2) == ed.texts


# -- pure logic ----------------------------------------------------------------------------------------------------
def test_error_tracing_counts_a_hand_made_list():
    recs = [
        ((0, 1), (0, 1), (0, 0)),  # error, decoded wrong, answer = decoded object: match
        ((1, 0), (0, 1), (0, 0)),  # error, decoded wrong, other object
        ((1, 1), (0, 0), (0, 0)),  # error, decoded right: not in the denominator
        ((0, 0), (1, 1), (0, 0)),  # correct
        (None, (1, 0), (1, 1)),    # unparsed answer: not an error trial
        ((1, 0), (1, 0), (1, 1)),  # error, match
        ((0, 0), (0, 1), (1, 1)),  # error, decoded wrong, no match
    ]
    got = binding_errors.error_tracing(recs, n_objects=4)
    assert got == {"n_trials": 7, "n_error": 5, "n_error_decoded_wrong": 4, "n_match": 2, "fraction": 0.5,
                   "chance": 1 / 3}


def test_probe_decodes_a_planted_position_code():
    """Synthetic head outputs: a cell code in a few directions plus noise and large nuisance variance. The probe,
    fitted on the 'correct' rows only, decodes held-out rows; labels of the unused rows cannot leak in."""
    rng = np.random.default_rng(0)
    n, d, cells = 160, 300, 4
    code = rng.normal(size=(cells, d)) * 0.6
    y = np.arange(n) % cells
    X = code[y] + rng.normal(size=(n, d)) + rng.normal(size=(n, 1)) * rng.normal(size=(1, d)) * 5
    fit = np.arange(n) < 120
    y_bad = np.where(fit, y, (y + 1) % cells)  # wrong labels on the rows the probe must not use
    y_low = rng.integers(0, cells, 60)
    X_low = code[y_low] + rng.normal(size=(60, d))
    for dims in (0, 32):
        (cv, se), dec = binding_errors.decode_cells(X, y_bad, fit, X_low, folds=4, dims=dims, seed=0)
        assert cv > 0.9 and se < 0.1
        assert (dec == y_low).mean() > 0.9
    Xh, Xl = binding_errors.probe_features(X, X_low, fit, 32)
    assert Xh.shape == (n, 32) and Xl.shape == (60, 32)


def test_permutation_null_of_two_error_trials():
    """Two errors that both match: a permutation keeps them (fraction 1) or swaps the decoded cells (fraction 0)."""
    recs = [((0, 1), (0, 1), (0, 0)), ((1, 0), (1, 0), (1, 1)), ((0, 0), (0, 0), (0, 0))]
    null = binding_errors.permutation_null(recs, 4000, seed=0)
    assert abs(null["null_mean"] - 0.5) < 0.03 and null["null_low"] == 0 and null["null_high"] == 1
    assert abs(null["p"] - 0.5) < 0.03


def test_relabs_pairs_put_absolute_and_relative_matches_where_the_paper_says():
    for cells in ("centre", "shared"):
        first, second = relabs_patch.build_pairs(1, seed=2, cells=cells)
        assert len(first) == (16 if cells == "centre" else 48)
        for t1, t2 in zip(first, second):
            A, R = tuple(t1.meta["absolute_cell"]), tuple(t1.meta["relative_cell"])
            a2 = t2.meta["arrangement"]
            assert a2 != t1.meta["arrangement"]
            origin = relabs_patch.RELABS_ORIGINS[a2]
            rel = (origin[0] + R[0], origin[1] + R[1])
            assert rel != A and {o.cell for o in t2.scene.objects} == set(relabs_patch.arrangement_cells(a2))
            assert t2.scene.at(A).name == t2.meta["absolute_answer"]
            assert t2.scene.at(rel).name == t2.meta["relative_answer"]
            named = {o.cell for o in t2.mentioned}
            assert len(named) == 2 and named.isdisjoint({A, rel})
            assert t1.target.name in {o.name for o in t2.mentioned}  # the source target is never a candidate
            assert {o.name for o in t2.scene.objects} == {o.name for o in t1.scene.objects}
        if cells == "centre":
            assert all(tuple(t.meta["absolute_cell"]) == (1, 1) for t in first)


def test_relabs_self_patch_changes_nothing():
    """Patching image 2's own head outputs back into image 2 leaves every outcome as the baseline."""
    vlm = tiny("llava")
    _, second = relabs_patch.build_pairs(1, seed=0)
    second = second[:4]
    cand = [[t.meta["absolute_answer"], t.meta["relative_answer"]] for t in second]
    base = run_heads(vlm, second, HEADS, candidates=cand, capture=True)
    same = run_heads(vlm, second, HEADS, base.z, "set", cand)
    assert np.array_equal(base.cand_logits, same.cand_logits)
    assert relabs_patch.outcomes(base, "x") == relabs_patch.outcomes(same, "x")


def test_reuse_trial_sets_are_balanced():
    est = reuse.estimation_trials((3, 3), 4, seed=0)
    cells = [t.target.cell for t in est]
    assert all(cells.count(c) == 4 for c in set(cells)) and len(set(cells)) == 9
    assert len({t.target.name for t in est if t.target.cell == (1, 1)}) == 4  # spread over identities
    ev = reuse.relation_trials(3, (3, 3), seed=0)
    assert [t.meta["relation"] for t in ev] == [r for r in ("above", "below", "left", "right") for _ in range(3)]
    ctl = reuse.control_cells(ev, 0)
    assert all(c != t.target.cell and t.scene.at(c) is not None for c, t in zip(ctl, ev))


# -- end to end ----------------------------------------------------------------------------------------------------
def _outputs(path, names):
    for n in names:
        assert (path / "results" / f"{n}.csv").stat().st_size > 0
    figs = {p.name for p in (path / "figures").iterdir()}
    return figs


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_experiments_run_end_to_end(family, tmp_path):
    """Generation and the 3x3 reuse grid on LLaVA only: the tiny Qwen's vision tower is slow on CPU (the
    generate=False paths and a 2x2 reuse grid run there)."""
    vlm = tiny(family)
    heads = [list(h) for h in HEADS]
    gen = family == "llava"
    grid = (3, 3) if gen else (2, 2)
    s = run_one(reuse, _ctx(vlm, reuse, tmp_path, n=1, n_estimate=1, heads=heads, generate=gen, grid=grid))
    assert s["head_source"] == "given" and s["baseline_first_token_accuracy"]["n"] == 4
    assert len(s["id_vector_norms"]) == grid[0] * grid[1] and "before" in reuse.caption(s)
    s = run_one(relabs_patch, _ctx(vlm, relabs_patch, tmp_path, n=1, heads=heads))
    assert s["n_pairs"] == 16 and s["choice_absolute_baseline"]["value"] + s["choice_relative_baseline"]["value"] == 1
    assert "relative match" in relabs_patch.caption(s)
    pairs = read_csv(tmp_path / "results" / "relabs_patch_trials.csv")
    assert any(p["baseline_logit_abs_minus_rel"] != p["patched_logit_abs_minus_rel"] for p in pairs)
    s = run_one(binding_errors, _ctx(vlm, binding_errors, tmp_path, n=1, heads=heads, n_perm=50, generate=gen))
    assert s["low_first_token_accuracy"]["n"] == 16 and "decoded_accuracy_low" in s["tracing"]
    assert ("low+patch_generation_accuracy" in s) == gen and ("answer_is_object_at_decoded_cell" in s["tracing"]) == gen
    assert "high entropy" in binding_errors.caption(s)
    json.dumps(s)
    figs = _outputs(tmp_path, ["reuse", "reuse_trials", "relabs_patch", "relabs_patch_trials", "binding_errors",
                               "binding_errors_trials", "binding_errors_tracing"])
    for f in ("reuse", "relabs_patch", "binding_errors"):
        assert {f + ".png", f + ".pdf"} <= figs
    rows = (tmp_path / "results" / "binding_errors_trials.csv").read_text().splitlines()
    assert len(rows) == 1 + 16 + 16


def test_default_heads_come_from_the_cma_ranking(tmp_path):
    vlm = tiny("llava")
    ctx = _ctx(vlm, relabs_patch, tmp_path, n=1, k=2, cma_n=2)
    heads, source = select_heads(ctx, 2)
    assert source == "cma top-2 id_selection" and len(heads) == 2
    assert heads == cma.cma_scores(ctx).top_k("id_selection", 2)
    s = relabs_patch.run(ctx)
    assert s["heads"] == [list(h) for h in heads]
    capped, _ = select_heads(ctx, 10_000)
    assert len(capped) == vlm.n_layers * vlm.n_heads
    with pytest.raises(ValueError, match="out of range"):
        select_heads(ctx, 2, heads=[[9, 0]])


def test_binding_errors_caption_with_and_without_a_permutation_null():
    base = {f"{k}_generation_accuracy": {"value": 0.5, "ci_low": 0.4, "ci_high": 0.6, "n": 10, "k": 5}
            for k in ("high", "low", "low+patch", "low+control")}
    base["low+patch-low_generation_accuracy_change"] = {"value": -0.1, "ci_low": -0.2, "ci_high": 0.0}
    trace = {"n": 1, "value": 1.0, "ci_low": 0.21, "ci_high": 1.0, "chance": 1 / 3,
             "permutation_mean": float("nan"), "p_permutation": float("nan")}
    one = binding_errors.caption({**base, "tracing": {"answer_is_object_at_decoded_cell": trace}})
    assert "On 1 error trial with" in one and "needs 2 or more" in one and "nan" not in one
    many = binding_errors.caption({**base, "tracing": {"answer_is_object_at_decoded_cell": {
        **trace, "n": 6, "permutation_mean": 0.25, "p_permutation": 0.04}}})
    assert "On 6 error trials" in many and "permutation null 25%, p = 0.04" in many


def test_binding_errors_figure_draws_the_accuracy_rows(tmp_path):
    """The figure is drawn from the stored tables. The old one keyed the rows of a condition by measure alone, so
    the control-object rate (a later row with the same condition and measure) replaced the accuracy: on the
    organism's demo the low-entropy generation bar showed 0.08 instead of 0.75."""
    from vismech.store.io import csv_text
    from vismech.store.results import Stored, tidy

    rows = [{"condition": c, "measure": m, "stat": "accuracy", "value": v, "ci_low": v - 0.1, "ci_high": min(1, v + 0.1),
             "n": 64} for m, vals in (("first_token", (1, 1, 1, 1)), ("generation", (1, 0.75, 0.5, 0.25)))
            for c, v in zip(binding_errors.CONDITIONS, vals)]
    rows += [{"condition": c, "measure": "generation", "stat": "control_object_rate", "value": 0.078, "n": 64}
             for c in ("low+control", "low")]
    trace = [{"measure": "answer_is_object_at_decoded_cell", "value": 0.4, "ci_low": 0.1, "ci_high": 0.7, "n": 5,
              "chance": 1 / 3, "permutation_mean": 0.3, "permutation_low": 0.2, "permutation_high": 0.5}]
    (tmp_path / "results").mkdir()
    for name, rs in (("binding_errors", rows), ("binding_errors_tracing", trace)):
        (tmp_path / "results" / f"{name}.csv").write_text(csv_text(tidy(rs, "m", "binding-errors", name)))
    fig = binding_errors.plot(Stored(tmp_path, "binding-errors", {"heads": [[0, 0]] * 3, "grid": [2, 2]},
                                     model="m"))["binding_errors"]
    bars = [p.get_height() for p in fig.axes[0].patches]  # per condition: first token, generation
    assert bars == [1, 1, 1, 0.75, 1, 0.5, 1, 0.25]
    assert [p.get_height() for p in fig.axes[1].patches] == pytest.approx([0.4, 1 / 3, 0.3])
