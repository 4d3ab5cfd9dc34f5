"""Every experiment of ``run all`` runs end to end on a tiny random model of every supported family (numbers
meaningless); ``recovery``, which needs declared ground truth, has its own tests."""

import json

import pytest

from conftest import FAMILIES
from vismech.app.cli import main
from vismech.experiments import EXPERIMENTS as EVERY, NOT_IN_ALL

EXPERIMENTS = [n for n in EVERY if n not in NOT_IN_ALL]  # what "all" runs

# cma_n equal to n: the head rankings reuse the cma experiment's stored scores (results depend on options alone)
SMALL = ["--n", "2", "--set", "cma_n=2", "--set", "null_samples=200", "--set", "max_new_tokens=4",
         "--set", "n_boot=30", "--set", "grids=[[2,2]]", "--set", "n_null=5", "--batch-size", "32"]


@pytest.mark.parametrize("family", FAMILIES)
def test_run_all_on_every_family(family, tmp_path):
    out = tmp_path / family
    assert main(["run", "all", "--model", f"tiny:{family}", "--out", str(out), "--device", "cpu"] + SMALL) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] and set(manifest["wall_seconds"]) == set(EXPERIMENTS)
    assert manifest["peak_gpu_gib"] == {n: None for n in EXPERIMENTS}  # recorded per experiment; None on CPU
    for name in EXPERIMENTS:
        summary = json.loads((out / "results" / f"{name}.json").read_text())
        if "skipped" in summary:  # object-token edits on a model without per-patch tokens; coco without --images
            assert (family == "idefics2" and name == "key-intervention") or name == "coco"
            continue
        assert list((out / "results").glob(f"{name.replace('-', '_')}*.csv")) or list(
            (out / "results").glob(f"{name}*.csv")), name
    assert len(list((out / "figures").glob("*.png"))) >= len(EXPERIMENTS) - 2
    html = (out / "report.html").read_text()
    assert all(f"id='{n}'" in html for n in EXPERIMENTS)
