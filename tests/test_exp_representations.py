"""The representational experiments (pca, rsa, rsa-relative, entropy): end to end on tiny models, reuse of one
capture across experiments, and golden checks of the RSA/PCA plumbing on fake activations with known structure."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny
from vismech.app.runner import run_one
from vismech.engine import activations
from vismech.analysis.rsa import position_rsm, rsa_score
from vismech.app.cli import main
from vismech.experiments import get
from vismech.experiments.common import Context, resolve_options
from vismech.experiments.rsa import last_targets, rsa_trials
from vismech.store.io import read_csv

SMALL = {"n_boot": 20, "n_null": 3, "folds": 2, "grids": [[2, 2]]}


def run_exp(name, vlm, out, shared=None, **opts):
    m = get(name)
    given = {k: v for k, v in {**SMALL, **opts}.items() if k in m.DEFAULTS}
    ctx = Context(vlm, out, resolve_options(m.DEFAULTS, given), seed=0, batch_size=16,
                  shared={} if shared is None else shared, show_progress=False)
    return run_one(m, ctx)


def _rows(out, name):
    return read_csv(out / "results" / f"{name}.csv")


def _check_figures(out, *names):
    for n in names:
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{n}.{ext}").stat().st_size > 1000


def _check_design(out, vlm, n_grids=1):
    L, H = vlm.n_layers, vlm.n_heads
    pca = _rows(out, "pca")
    assert len(pca) == L * 2 * 2
    assert {"layer", "label", "measure", "value", "se", "chance", "n"} <= set(pca[0])
    assert {(r["label"], r["measure"]) for r in pca} == {(a, b) for a in ("position", "features")
                                                        for b in ("silhouette", "probe_accuracy")}
    assert len(_rows(out, "pca_trials")) == 2 * 36
    rsa = _rows(out, "rsa")
    assert len(rsa) == L * 6
    assert {"curve", "token", "target", "layer", "value", "ci_low", "ci_high", "null_mean", "null_low",
            "null_high", "n"} <= set(rsa[0]) and {r["measure"] for r in rsa} == {"pearson_r"}
    assert all(float(r["ci_low"]) <= float(r["ci_high"]) for r in rsa)
    assert len(_rows(out, "rsa_heads")) == 2 * L * H
    assert len(_rows(out, "rsa_relative")) == L * 4
    ent = _rows(out, "entropy_rsa")
    assert len(ent) == n_grids * 3 * 2 * (L + 1)  # (low, high, high-low) x (prompt, last) x (layers + mean)
    assert len(_rows(out, "entropy_accuracy")) == n_grids * 2
    _check_figures(out, "pca", "rsa", "rsa_heads", "rsa_relative", "entropy_by_layer", "entropy_bars")


def test_cli_runs_all_four_on_tiny_qwen_and_reuses_the_capture(tmp_path):
    out = tmp_path / "run"
    sets = [f"{k}={json.dumps(v)}" for k, v in SMALL.items()]
    argv = ["run", "pca", "rsa", "rsa-relative", "entropy", "--model", "tiny:qwen2_5_vl", "--out", str(out),
            "--n", "1"]
    assert main(argv + [x for s in sets for x in ("--set", s)]) == 0
    vlm = tiny("qwen2_5_vl")
    _check_design(out, vlm)
    s = json.loads((out / "results" / "pca.json").read_text())
    assert s["n_trials"] == 36 and 0 <= s["position_layer"] < vlm.n_layers
    assert s["probe_chance"]["position"] == pytest.approx(1 / 6)
    s = json.loads((out / "results" / "rsa.json").read_text())
    assert set(s["curves"]) == {"position_prompt", "position_last", "features_last", "features_prompt",
                                "color_last", "shape_last"}
    assert s["n_trials"] == 16 and s["first_token_accuracy"]["n"] == 16
    s = json.loads((out / "results" / "rsa_relative.json").read_text())
    assert s["n_trials"] == 64 and s["comparison"]["winner"] in ("relative", "absolute", "neither")
    s = json.loads((out / "results" / "entropy.json").read_text())
    assert s["grids"]["2x2"]["n_trials"] == {"low": 16, "high": 16}


def test_llava_end_to_end_and_entropy_reuses_the_rsa_capture(tmp_path, monkeypatch):
    vlm = tiny("llava")
    calls = []
    real = vlm.logits
    monkeypatch.setattr(vlm, "logits", lambda b: calls.append(len(b)) or real(b))
    shared = {}
    for name in ("pca", "rsa", "rsa-relative"):
        run_exp(name, vlm, tmp_path, shared, n=1)
    before = sum(calls)
    run_exp("entropy", vlm, tmp_path, shared, n=1)
    assert sum(calls) - before == 16  # only the low-entropy set runs; the high one is the rsa set
    assert shared["activations_stats"]["reused"] == 1
    _check_design(tmp_path, vlm)


# ---------------------------------------------------------------------------------------------- golden checks
POS2 = np.linalg.cholesky(position_rsm([(r, c) for r in range(2) for c in range(2)]) + 1e-12 * np.eye(4))


def exact_position(cell):
    """Unit vectors whose cosine similarities are exactly the 2x2 position target RSM."""
    return POS2[cell[0] * 2 + cell[1]]


def fake_forward(encoders, d=24, noise=None):
    """A stand-in for the model: layer l of the state at each captured position is encoders[l](obj, trial)."""
    ids = {}
    rng = np.random.default_rng(0)

    def identity(obj, trial):
        v = np.zeros(d)
        v[ids.setdefault((obj.color, obj.shape), len(ids))] = 1
        return v

    def fwd(vlm, batch, positions, with_z, dtype=torch.float32):
        B, P = positions.shape
        out = np.zeros((B, P, len(encoders), d))
        for j, t in enumerate(batch.trials):
            for p in range(P):
                obj = t.target if p == 0 else t.mentioned[p - 1]
                for layer, enc in enumerate(encoders):
                    v = identity(obj, t) if enc == "identity" else rng.normal(size=d) if enc == "random" \
                        else enc(obj, t)
                    out[j, p, layer, :len(v)] = v
                    if noise is not None:
                        out[j, p, layer] += noise(t, layer) * rng.normal(size=d)
        z = torch.tensor(rng.normal(size=(B, P, len(encoders), 2, 4)), dtype=dtype) if with_z else None
        want = vlm.answer_ids(batch, [t.answer for t in batch.trials])
        return torch.tensor(out, dtype=dtype), z, want

    return fwd


def _by(rows, **kw):
    return {int(r["layer"]): r for r in rows if all(r[k] == v for k, v in kw.items()) and r["layer"] != "mean"}


def test_golden_rsa_position_at_layer_0_features_at_layer_1(tmp_path, monkeypatch):
    monkeypatch.setattr(activations, "forward_positions",
                        fake_forward([lambda o, t: exact_position(o.cell), "identity", "random"]))
    s = run_exp("rsa", tiny("llava"), tmp_path, n=2, n_boot=100, n_null=20)
    rows = _rows(tmp_path, "rsa")
    pos_last, feat_last = _by(rows, curve="position_last"), _by(rows, curve="features_last")
    pos_prompt = _by(rows, curve="position_prompt")
    assert float(pos_last[0]["value"]) == pytest.approx(1, abs=1e-9)
    assert float(pos_prompt[0]["value"]) > 0.999
    assert float(pos_last[0]["ci_low"]) > 0.99
    # the model RSM at layer 0 IS the position target, so its feature r is the targets' own correlation, small
    # because identities are balanced across cells in the K x N x N design (not 0: pairs i != j only)
    trials = rsa_trials((2, 2), 2, "high", 0)
    T = last_targets(trials)
    expected = rsa_score(T["position"], T["features"])
    assert abs(expected) < 0.15
    assert float(feat_last[0]["value"]) == pytest.approx(expected, abs=1e-9)
    assert float(feat_last[1]["value"]) == pytest.approx(1, abs=1e-9)
    assert float(pos_last[1]["value"]) == pytest.approx(expected, abs=1e-9)
    for layer in (0, 1):  # permuted labels: no structure left
        assert abs(float(pos_last[layer]["null_mean"])) < 0.1 and float(pos_last[layer]["null_high"]) < 0.5
    assert s["curves"]["position_last"]["peak_layer"] == 0 and s["curves"]["features_last"]["peak_layer"] == 1
    assert s["first_token_accuracy"]["value"] == 1.0  # the fake predicts every answer


def test_golden_relative_coding_wins(tmp_path, monkeypatch):
    rel = lambda o, t: exact_position(t.meta["relative_cell"])  # noqa: E731
    monkeypatch.setattr(activations, "forward_positions", fake_forward([rel, "identity", "random"]))
    s = run_exp("rsa-relative", tiny("llava"), tmp_path, n=1, n_boot=100)
    assert s["curves"]["relative"]["peak_layer"] == 0
    assert s["curves"]["relative"]["peak_r"] == pytest.approx(1, abs=1e-9)
    assert s["curves"]["features"]["peak_layer"] == 1
    c = s["comparison"]
    assert c["layer"] == 0 and c["winner"] == "relative" and c["ci"][0] > 0
    assert c["relative_minus_absolute"] == pytest.approx(1 - c["absolute_r"])


def test_golden_entropy_detects_noisier_ids_in_low_entropy(tmp_path, monkeypatch):
    noise = lambda t, layer: 1.5 if t.meta["entropy"] == "low" else 0.0  # noqa: E731
    monkeypatch.setattr(activations, "forward_positions",
                        fake_forward([lambda o, t: exact_position(o.cell)] * 2, noise=noise))
    s = run_exp("entropy", tiny("llava"), tmp_path, n=2, n_boot=100)
    g = s["grids"]["2x2"]
    for tok in ("prompt", "last"):
        assert g["rsa_layer_mean"]["high"][tok]["r"] == pytest.approx(1, abs=1e-6)
        assert g["rsa_layer_mean"]["low"][tok]["r"] < 0.8
        assert g["high_minus_low_layer_mean"][tok]["lo"] > 0
    assert g["accuracy"]["low"]["first_token"]["value"] == 1.0


def test_golden_pca_finds_the_position_and_feature_layers(tmp_path, monkeypatch):
    ring = {}

    def feat(o, t):  # the 6 objects on a circle, far apart
        a = 2 * np.pi * ring.setdefault(o.name, len(ring)) / 6
        return np.array([np.cos(a), np.sin(a)]) * 10

    cell = lambda o, t: np.array([o.cell[0], o.cell[1]], float) * 10  # noqa: E731
    noise = lambda t, layer: 0.3  # noqa: E731
    monkeypatch.setattr(activations, "forward_positions", fake_forward([cell, feat, "random"], d=6, noise=noise))
    s = run_exp("pca", tiny("llava"), tmp_path, n=2)
    assert s["position_layer"] == 0 and s["feature_layer"] == 1
    assert s["at_position_layer"]["position_silhouette"] > 0.8
    assert s["at_position_layer"]["position_probe_accuracy"] == 1.0
    assert s["at_position_layer"]["features_silhouette"] < 0.2
    assert s["at_feature_layer"]["features_probe_accuracy"] > 0.95
    assert s["at_feature_layer"]["features_silhouette"] > 0.8


def test_permutation_null_equals_rsa_of_explicitly_permuted_targets():
    from vismech.analysis.rsa import cosine_rsm
    from vismech.analysis.rsa import permutation_null

    rng = np.random.default_rng(1)
    X = [rng.normal(size=(2, 10, 5)) for _ in range(2)]  # 2 comma slots, 2 layers, 10 trials
    T = [t + t.T for t in rng.normal(size=(2, 10, 10))]
    got = permutation_null(X, {"a": T}, 3, seed=5)["a"]
    r = np.random.default_rng(5)  # the draws permutation_null makes with seed 5
    perms = [r.permutation(10) for _ in range(3)]
    ref = [[rsa_score([cosine_rsm(g[layer]) for g in X], [t[np.ix_(p, p)] for t in T]) for layer in range(2)]
           for p in perms]
    assert np.allclose(got, ref, atol=1e-12)


def test_permutation_null_of_few_kinds_equals_explicitly_permuted_targets():
    """Targets of few kinds of trials (colours, grid cells) take the path through the kinds' sums of the
    activations; a target that is not symmetric the full correlation: both equal the explicit RSA."""
    from vismech.analysis.rsa import _kinds, cosine_rsm, feature_rsm, identity_rsm, permutation_null, position_rsm

    rng = np.random.default_rng(2)
    n = 40
    X = [rng.normal(size=(3, n, 6)) for _ in range(2)]
    X[0][1, 5, :] = 0.0  # a zero row: similarity 0, also to itself
    cells = rng.integers(0, 3, size=(n, 2))
    targets = {"position": [position_rsm(cells), position_rsm(cells[::-1])],
               "color": [identity_rsm(rng.integers(0, 4, n)) for _ in X], "skew": list(rng.normal(size=(2, n, n))),
               "features": [feature_rsm(rng.integers(0, 2, n), rng.integers(0, 3, n))] * 2}
    assert len(_kinds(targets["position"][0])[1]) <= 9 and len(_kinds(targets["color"][0])[1]) <= 4
    m = rng.normal(size=(n, n))
    assert _kinds(targets["skew"][0]) is None and len(_kinds(m + m.T)[1]) == n  # every trial its own kind
    got = permutation_null(X, targets, 4, seed=7)
    r = np.random.default_rng(7)
    perms = [r.permutation(n) for _ in range(4)]
    for k, t in targets.items():
        ref = [[rsa_score([cosine_rsm(g[layer]) for g in X], [u[np.ix_(p, p)] for u in t]) for layer in range(3)]
               for p in perms]
        if k == "skew":  # not symmetric: each group's lower triangle of the permuted matrix, as gathered
            a, b = np.tril_indices(n, -1)
            ref = [[np.corrcoef(np.concatenate([cosine_rsm(g[layer])[a, b] for g in X]),
                                np.concatenate([u[p[a], p[b]] for u in t]))[0, 1] for layer in range(3)]
                   for p in perms]
        assert np.allclose(got[k], ref, atol=1e-12), k
    constant = permutation_null(X[0], {"c": np.ones((n, n))}, 2)["c"]
    assert np.isnan(constant).all()
    with pytest.raises(ValueError, match="one target RSM per described object"):
        permutation_null(X, {"position": targets["position"][0]}, 2)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava", "llava_onevision", "idefics2"])
def test_rsa_smoke_on_every_family(tmp_path, family):
    """RSA needs no object image tokens, so it runs on Idefics2 too (the paper's Fig. 19)."""
    vlm = tiny(family)
    s = run_exp("rsa", vlm, tmp_path, n=1, n_boot=10, n_null=2)
    rows = _rows(tmp_path, "rsa")
    assert len(rows) == 6 * vlm.n_layers and all(np.isfinite(float(r["value"])) for r in rows)
    assert len(_rows(tmp_path, "rsa_heads")) == 2 * vlm.n_layers * vlm.n_heads
    assert s["curves"]["position_last"]["peak_layer"] in range(vlm.n_layers)


def test_blas_threads_restores_counts_and_changes_no_result():
    from vismech.analysis.pca import probe_accuracy
    from threadpoolctl import threadpool_info

    from vismech.experiments.pca import blas_threads

    def counts():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 20)), rng.integers(0, 3, 60)
    before = counts()
    assert before, "numpy's BLAS is seen"
    with blas_threads(1):
        assert counts() == [1] * len(before)
        one = probe_accuracy(X, y, folds=3)
    assert counts() == before
    assert probe_accuracy(X, y, folds=3) == one
