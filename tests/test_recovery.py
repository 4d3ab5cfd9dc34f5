"""``vismech run recovery``: scored against declared ground truth, it tells right heads from wrong ones."""

import json

import numpy as np

from vismech.app.cli import main
from vismech.experiments import recovery
from vismech.experiments.cma import CMAResult
from vismech.models.ground_truth import Declared, GroundTruth
from vismech.store.io import read_csv

SMALL = ["--set", "cma_n=8", "--set", "rsa_n=16", "--batch-size", "16", "--device", "cpu"]


def _result(found: dict, shape=(4, 3)) -> CMAResult:
    """A CMA result whose significant heads are ``found`` per condition (scores 5 there, 0 elsewhere)."""
    res = CMAResult(tuple(found), {}, {}, {}, {})
    for c, heads in found.items():
        mask = np.zeros(shape, bool)
        for h in heads:
            mask[h] = True
        res.mean[c] = np.where(mask, 5.0, 0.0)
        res.scores[c] = res.mean[c][..., None].repeat(6, -1)
        p_adjusted = np.where(mask, 0.01, 0.5) + np.arange(mask.size).reshape(shape) / 1000
        res.significance[c] = {"mask": mask, "p_adjusted": p_adjusted}
    return res


def test_precision_recall_wrong_conditions_and_layer_order_by_hand():
    gt = GroundTruth({"id_retrieval": Declared(((0, 0), (0, 1)), "mentions", ""),
                      "id_selection": Declared(((1, 0),), "last", ""),
                      "feature_retrieval": Declared(((3, 2),), "last", "")})
    res = _result({"id_retrieval": [(0, 0), (2, 2)], "id_selection": [(1, 0), (0, 1)],
                   "feature_retrieval": [(3, 2)]})
    rows, out = recovery.cma_recovery(res, gt)
    assert out["id_retrieval"]["precision"] == 0.5 and out["id_retrieval"]["recall"] == 0.5
    assert out["id_selection"]["precision"] == 0.5 and out["id_selection"]["recall"] == 1.0
    assert out["id_selection"]["declared_of_other_stages_found_here"] == [(0, 1)]
    assert out["feature_retrieval"]["precision"] == 1.0 and out["feature_retrieval"]["recall"] == 1.0
    assert out["layer_order"]["median_found_layer"] == {"id_retrieval": 1.0, "id_selection": 0.5,
                                                        "feature_retrieval": 3.0}
    assert out["layer_order"]["ordered"] is False  # retrieval's median layer (1) is above selection's (0.5)
    assert {(r["stage"], r["measure"]): r["value"] for r in rows}[("id_selection", "precision")] == 0.5
    # the declared head not found, with how near it came (score 0, p_adjusted 0.5 + its index 1 / 1000)
    assert out["id_retrieval"]["missed"] == [{"head": [0, 1], "mean_score": 0.0, "p_adjusted": 0.501}]
    assert out["id_selection"]["missed"] == [] and out["feature_retrieval"]["missed"] == []
    text = recovery.caption({"cma": out, "cma_n": 8, "q": 0.05})
    assert "ID retrieval: precision 0.50, recall 0.50; missed L0H1 (score 0.00, p_adj 0.501)" in text
    none = recovery.cma_recovery(_result({"id_retrieval": [], "id_selection": [], "feature_retrieval": []}), gt)[1]
    text = recovery.caption({"cma": none, "cma_n": 8, "q": 0.05})
    assert "recall 0.00 (declared heads' smallest p_adj 0.500)" in text
    nothing = recovery.cma_recovery(_result({"id_retrieval": [], "id_selection": [], "feature_retrieval": []}),
                                    gt)[1]
    assert nothing["id_retrieval"]["precision"] is None and nothing["id_retrieval"]["recall"] == 0.0


def test_random_heads_keep_the_layers_and_avoid_declared_heads():
    import random

    rng = random.Random(0)
    heads = ((3, 0), (3, 1), (4, 0))
    for _ in range(20):
        r = recovery.random_heads(heads, 8, set(heads) | {(3, 5)}, rng)
        assert sorted(a for a, _ in r) == [3, 3, 4] and not set(r) & (set(heads) | {(3, 5)})


def test_a_model_without_ground_truth_gets_one_line(tmp_path, capsys):
    assert main(["run", "recovery", "--model", "tiny:qwen2_5_vl", "--out", str(tmp_path / "r")] + SMALL) == 2
    err = capsys.readouterr().err
    assert "needs declared ground truth" in err and "ground_truth=PATH" in err and len(err.strip().splitlines()) == 1


def test_recovery_finds_the_planted_heads_and_not_deliberately_wrong_ones(tmp_path):
    """The README's command on organism-ids (fewer trials): the declared heads are what CMA finds (precision and
    recall 1 for ID and feature retrieval with the demo's 20 pairs) and edits at them work where random heads' do not;
    scored against deliberately wrong heads, the same CMA result gives precision and recall 0."""
    out = tmp_path / "recovery"
    sets = {"stages": ["id_retrieval", "feature_retrieval"], "cma_n": 20, "rsa_n": 16, "n_boot": 20, "n_null": 2,
            "n": 8, "n_estimate": 24, "alphas": [5], "random_sets": 1}
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["run", "recovery", "--model", "organism-ids", "--out", str(out), "--device", "cpu"] + args) == 0
    s = json.loads((out / "results" / "recovery.json").read_text())
    for stage in ("id_retrieval", "feature_retrieval"):
        assert s["cma"][stage]["precision"] == 1.0 and s["cma"][stage]["recall"] == 1.0, s["cma"][stage]
        inter = s["interventions"][stage]
        assert inter["declared"]["value"] > 0.7 > inter["random_heads"]["value"], inter
    assert s["rsa"]["id_retrieval"]["declared_layer"] == 2 and -1 <= s["rsa"]["id_retrieval"]["r_at_declared"] <= 1
    assert (out / "figures" / "recovery.png").exists() and (out / "results" / "recovery_cma.csv").exists()
    assert "id='recovery'" in (out / "report.html").read_text()
    found = {c: [tuple(h) for h in s["cma"][c]["found"]] for c in ("id_retrieval", "feature_retrieval")}
    wrong = GroundTruth({"id_retrieval": Declared(((5, 6), (5, 7)), "mentions", ""),
                         "feature_retrieval": Declared(((0, 4),), "last", "")})
    w = recovery.cma_recovery(_result(found, (8, 8)), wrong)[1]
    for stage in ("id_retrieval", "feature_retrieval"):
        assert w[stage]["recall"] == 0.0 and w[stage]["precision"] == 0.0, w[stage]


def test_ablate_declared_removes_the_declared_heads_from_every_analysis(tmp_path):
    """With ``ablate_declared`` every declared head (helpers too) is zeroed for the whole experiment: its CMA score
    is 0 in every condition (up to float rounding between batches, so it is never significant), an ID edit at the declared heads changes no answer
    (efficacy = the unedited repeat rate), and recovery's CMA is not the intact model's CMA of the same run."""
    gt = GroundTruth({"id_retrieval": Declared(((0, 1),), "mentions", ""),
                      "id_selection": Declared(((1, 2),), "last", ""),
                      "feature_retrieval": Declared(((2, 0),), "last", "")},
                     {"copy": Declared(((0, 0),), "mentions", "")})
    path = gt.save(tmp_path)
    out = tmp_path / "run"
    sets = {"ground_truth": str(path), "ablate_declared": True, "cma_n": 3, "cma.n": 3, "null_samples": 200,
            "rsa_n": 8, "n_boot": 10, "n_null": 2, "n": 6, "n_estimate": 16, "alphas": [5], "random_sets": 1}
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    assert main(["run", "cma", "recovery", "--model", "tiny:qwen2_5_vl", "--out", str(out), "--device", "cpu"]
                + args) == 0
    s = json.loads((out / "results" / "recovery.json").read_text())
    assert s["ablated_heads"] == [[0, 0], [0, 1], [1, 2], [2, 0]]
    assert recovery.caption(s).startswith("Declared heads ablated (4 heads zeroed). ")
    declared = {(0, 0), (0, 1), (1, 2), (2, 0)}
    for c in ("id_retrieval", "id_selection", "feature_retrieval"):
        assert not declared & {tuple(h) for h in s["cma"][c]["found"]}
        assert abs(s["cma"][c]["declared_mean_score"]) < 1e-6
        assert s["interventions"][c]["declared"]["value"] == s["interventions"]["baseline_repeat_rate"]["value"]
    intact = {(r["condition"], int(r["layer"]), int(r["head"])): r["value"]
              for r in read_csv(out / "results" / "cma_heads.csv")}
    assert any(float(intact[(c, 0, 1)]) != 0.0 for c in ("id_retrieval", "id_selection", "feature_retrieval"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["options"]["cma"]["n"] == 3 and manifest["options"]["recovery"]["ablate_declared"] is True
