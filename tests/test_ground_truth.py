"""Declared ground truth: the file format, its checks, and load_vlm exposing it."""

import json

import pytest

from vismech.models.ground_truth import Declared, GroundTruth, find_ground_truth, load_ground_truth, parse
from vismech.organism.plant import PlantSpec, ground_truth


def _valid():
    return {"format": "vismech-ground-truth", "version": 1, "method": "hand-made",
            "stages": {"id_retrieval": {"heads": [[0, 1]], "positions": "mentions", "variable": "cell"},
                       "feature_retrieval": {"heads": [[1, 0], [1, 1]], "positions": "last", "variable": "features",
                                             "parts": {"colour": [[1, 0]]}}},
            "helpers": {"copy": {"heads": [[0, 0]], "positions": "mentions", "variable": "previous word"}}}


def test_a_valid_file_round_trips(tmp_path):
    gt = parse(_valid())
    assert gt.stages["feature_retrieval"].heads == ((1, 0), (1, 1))
    assert gt.stages["feature_retrieval"].parts == {"colour": ((1, 0),)}
    assert gt.heads() == {(0, 1), (1, 0), (1, 1), (0, 0)}
    gt.save(tmp_path)
    again = load_ground_truth(tmp_path)
    assert again == gt and find_ground_truth(tmp_path) == gt
    assert find_ground_truth(tmp_path / "nothing-here") is None


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(format="other"), "not a vismech ground-truth"),
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d.update(stages={}), "declares no stages"),
    (lambda d: d["stages"].update(id_binding={"heads": [[0, 0]], "positions": "last"}), "unknown stage"),
    (lambda d: d["stages"]["id_retrieval"].update(positions="commas"), "positions must be one of"),
    (lambda d: d["stages"]["id_retrieval"].update(heads=[[0, "1"]]), "pair of integers"),
    (lambda d: d["stages"]["id_retrieval"].update(heads=[]), "non-empty"),
    (lambda d: d["stages"]["id_retrieval"].update(heads=[[0, 1], [0, 1]]), "listed twice"),
    (lambda d: d["helpers"]["copy"].update(heads=[[0, 1]]), "declared for both"),
    (lambda d: d["stages"]["feature_retrieval"]["parts"].update(x=[[5, 5]]), "not among the stage's heads"),
    (lambda d: d["stages"]["id_retrieval"].update(code="import os"), "unknown key"),
])
def test_bad_files_are_clear_errors(edit, message):
    d = _valid()
    edit(d)
    with pytest.raises(ValueError, match=message):
        parse(d)


def test_files_that_are_not_json_and_heads_outside_the_model(tmp_path):
    (tmp_path / "ground_truth.json").write_bytes(b"\x80\x04not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_ground_truth(tmp_path)
    with pytest.raises(ValueError, match="outside this model's 2 layers x 2 heads"):
        GroundTruth({"id_retrieval": Declared(((2, 0),), "mentions", "")}).check(2, 2)


def test_planting_declares_its_heads_by_stage():
    spec = PlantSpec()
    gt = ground_truth(spec)
    assert gt.stages["id_retrieval"].heads == spec.retrieval
    assert gt.stages["id_selection"].heads == spec.gathering + spec.selection
    assert gt.stages["id_selection"].parts == {"gathering": spec.gathering, "selection": spec.selection}
    assert gt.stages["feature_retrieval"].heads == spec.features
    assert gt.helpers["binding"].heads == spec.binding
    assert parse(json.loads(json.dumps(gt.to_json()))) == gt


def test_load_vlm_exposes_a_checkpoint_s_ground_truth(tmp_path):
    from vismech.models.load import load_vlm
    from vismech.models.tiny import build_tiny

    model, tok = build_tiny("llava", seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert load_vlm(str(tmp_path)).ground_truth is None
    d = _valid()
    (tmp_path / "ground_truth.json").write_text(json.dumps(d))
    vlm = load_vlm(str(tmp_path))
    assert vlm.ground_truth == parse(d)
    d["stages"]["id_retrieval"]["heads"] = [[0, vlm.n_heads]]
    (tmp_path / "ground_truth.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="outside this model"):
        load_vlm(str(tmp_path))


@pytest.mark.parametrize("name", ["organism-ids", "organism-llava-ids"])
def test_shipped_planted_organisms_declare_the_default_spec_heads_and_meet_their_recorded_validity(name):
    """Both planted organisms load offline by name with the heads planting declares, and their recorded validity
    shows the planted heads matter: resampling them all leaves accuracy below chance, while interchange of F moves
    the answer as the causal model says in >= 90% of trials. organism-ids' last MLP is zero, as its method says."""
    from vismech.models.load import load_vlm, organism_dir

    vlm = load_vlm(name, dtype="fp32", device="cpu")
    assert vlm.family.name == {"organism-ids": "qwen2_5_vl", "organism-llava-ids": "llava"}[name]
    # organism-ids was planted with its MLPs after the feature heads removed, which its declared method says
    dropped = name == "organism-ids"
    planted = ground_truth(PlantSpec(drop_late_mlps=dropped))
    assert (vlm.ground_truth.stages, vlm.ground_truth.helpers) == (planted.stages, planted.helpers)
    assert vlm.ground_truth.method.startswith(planted.method)
    late = [p for p in vlm.layers[-1].mlp.parameters()]  # the one layer after the feature heads' (6 of 8)
    assert all(bool((p == 0).all()) == dropped for p in late)
    v = json.loads((organism_dir(name) / "validity.json").read_text())
    assert v["ablation"]["declared_resampled"]["rate"] < v["ablation"]["chance"]
    assert v["interchange"]["F"]["rate"] >= 0.9
    if name == "organism-ids":  # erased, then repaired: its ID-retrieval outputs carry the cell and no features
        assert vlm.ground_truth.method.endswith("erased from the ID-retrieval heads' values (vismech.organism.erase, "
                                                "LEACE, rank 18, 2048 trials, seed 0); then trained again by "
                                                "vismech.organism.plant with layers 0-2 frozen")
        probes = v["probes"]
        assert probes["cell"]["rate"] >= 0.9
        assert all(probes[k]["rate"] - probes[k]["chance"] < 0.1 for k in ("color", "shape"))


@pytest.mark.parametrize("name", ["organism", "organism-llava", "organism-ids", "organism-llava-ids"])
def test_each_shipped_card_reproduces_through_commands_that_parse_and_chain(name):
    """Every command of a shipped card's Reproduce section is one the CLI accepts, and each stage starts from a
    folder an earlier stage wrote (or a shipped organism)."""
    import shlex

    from vismech.app.cli import build_parser
    from vismech.models.load import organism_dir
    from vismech.organism.card import reproduce_of

    commands = [line for block in reproduce_of(str(organism_dir(name))) for line in block.splitlines()]
    assert commands
    written, parser = set(), build_parser()
    for cmd in commands:
        argv = shlex.split(cmd)
        if argv[:3] == ["python", "-m", "vismech.organism.erase"]:
            source, out = argv[3], argv[argv.index("--out") + 1]
        else:
            assert argv[0] == "vismech"
            a = parser.parse_args(argv[1:])
            source, out = a.init_from or a.vision_from, a.out
        assert source is None or source in written or (organism_dir(source) / "config.json").is_file(), cmd
        written.add(out)


def test_a_continued_planting_keeps_the_history_and_adds_what_it_changed():
    """A run from a planted organism (``--init-from``) declares the same heads; its method is the prior's, then this
    run, and says the late MLPs were removed only where the history does not already say so."""
    plain, dropped = ground_truth(PlantSpec()), ground_truth(PlantSpec(drop_late_mlps=True))
    mlps = "; the MLPs after the feature heads' layer removed (zero)"
    got = ground_truth(PlantSpec(drop_late_mlps=True), prior=plain, freeze_through=2)
    assert got.stages == plain.stages
    assert got.method == plain.method + "; then trained again by vismech.organism.plant with layers 0-2 frozen" + mlps
    again = ground_truth(PlantSpec(drop_late_mlps=True), prior=dropped)
    assert again.method == dropped.method + "; then trained again by vismech.organism.plant"
