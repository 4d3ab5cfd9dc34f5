"""Every experiment of ``run all`` runs end to end on a tiny random model of every supported family (numbers
meaningless); ``recovery``, which needs declared ground truth, has its own tests."""

import json
import math

import pytest

from conftest import FAMILIES
from vismech.app.cli import main
from vismech.experiments import EXPERIMENTS as EVERY, NOT_IN_ALL
from vismech.store.results import CORE, file_stem, read_arrays
from vismech.store.io import read_csv

EXPERIMENTS = [n for n in EVERY if n not in NOT_IN_ALL]  # what "all" runs

# cma_n equal to n: the head rankings reuse the cma experiment's stored scores (results depend on options alone)
SMALL = ["--n", "2", "--set", "cma_n=2", "--set", "null_samples=200", "--set", "max_new_tokens=4",
         "--set", "n_boot=30", "--set", "grids=[[2,2]]", "--set", "n_null=5", "--set", "n_estimate=2",
         "--batch-size", "32"]


@pytest.mark.parametrize("family", FAMILIES)
def test_run_all_on_every_family(family, tmp_path):
    """Figures are drawn from the stored results alone, the same code for every family: drawn (and redrawn) on
    qwen2_5_vl; the other families run with --no-figures, which stores none."""
    out = tmp_path / family
    figures = family == "qwen2_5_vl"
    assert main(["run", "all", "--model", f"tiny:{family}", "--out", str(out), "--device", "cpu"] + SMALL
                + ([] if figures else ["--no-figures"])) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] and set(manifest["wall_seconds"]) == set(EXPERIMENTS)
    assert manifest["peak_gpu_gib"] == {n: None for n in EXPERIMENTS}  # recorded per experiment; None on CPU
    for name in EXPERIMENTS:
        summary = json.loads((out / "results" / f"{file_stem(name)}.json").read_text())
        if "skipped" in summary:  # object-token edits on a model without per-patch tokens; coco without --images
            assert (family == "idefics2" and name == "key-intervention") or name == "coco"
            continue
        assert list((out / "results").glob(f"{file_stem(name)}*.csv")), name
    pngs = list((out / "figures").glob("*.png"))
    assert len(pngs) >= len(EXPERIMENTS) - 2 if figures else pngs == []
    html = (out / "report.html").read_text()
    assert all(f"id='{n}'" in html for n in EXPERIMENTS)
    check_tidy(out, family)
    if figures:
        check_replot(out)


def check_tidy(out, family):
    """One naming scheme; every table long format with the core columns first and numbers as numbers; arrays with
    dimension names."""
    stems = {file_stem(n) for n in EXPERIMENTS}
    for f in list((out / "results").iterdir()) + list((out / "figures").glob("*")):
        assert any(f.name.split(".")[0] == s or f.name.startswith(s + "_") for s in stems), f.name
    for f in (out / "results").glob("*.csv"):
        rows = read_csv(f)
        cols = list(rows[0])
        trials = f.stem.endswith("_trials")
        assert cols[:2 if trials else len(CORE)] == list(CORE[:2 if trials else len(CORE)]), f.name
        assert {r["model"] for r in rows} == {f"tiny:{family}"}
        for r in rows:
            for k, v in r.items():
                assert not ("," in v and all(x.strip().lstrip("-").isdigit() for x in v.split(","))), (f.name, k, v)
            if not trials:
                assert r["value"] == "" or isinstance(float(r["value"]), float)
                assert r["n"] == "" or float(r["n"]) >= 0
                for c in ("ci_low", "ci_high"):
                    assert r[c] == "" or not math.isnan(float(r[c])) or math.isnan(float(r["value"] or "nan"))
    behaviour = read_csv(out / "results" / "behaviour.csv")  # one row per measure and condition (counting, which has
    keys = [tuple(v for k, v in r.items() if k not in ("value", "ci_low", "ci_high", "n")) for r in behaviour]
    assert len(keys) == len(set(keys))  # no target cell, was listed twice)
    arrays = read_arrays(out / "results" / "cma_scores.npz")
    assert arrays["scores_id_selection"][0] == ("layer", "head", "pair")
    assert arrays["scores_id_selection"][1].ndim == 3 and arrays["null_means_id_selection"][0] == ("sample",)


def check_replot(out):
    """`vismech plot` redraws every figure from the stored results: the same files, the same pixels."""
    before = {p.name: p.read_bytes() for p in (out / "figures").iterdir()}
    for p in (out / "figures").iterdir():
        p.unlink()
    assert main(["plot", str(out)]) == 0
    after = {p.name: p.read_bytes() for p in (out / "figures").iterdir()}
    assert set(after) == set(before) and len(after) >= 2 * (len(EXPERIMENTS) - 2)
    assert all(after[n] == before[n] for n in after if n.endswith(".png"))
    # the report embeds each experiment's own figures: rsa's section holds rsa.png, not rsa_relative.png
    html = (out / "report.html").read_text()
    rsa = html[html.index("id='rsa'"):html.index("id='rsa-relative'")]
    assert "figures/rsa.png" in rsa and "rsa_relative" not in rsa


def test_figures_left_out_of_a_run_are_drawn_later_by_plot_as_the_run_would_have(tmp_path):
    """`vismech run --no-figures` stores results and a report without figures; `vismech plot` then draws the same
    files, pixel for pixel, as a run that drew them, and the report embeds them."""
    args = ["--model", "tiny:qwen2_5_vl", "--device", "cpu", "--n", "2", "--set", "n_boot=30", "--set", "n_null=5"]
    assert main(["run", "behaviour", "rsa", "--out", str(tmp_path / "drawn")] + args) == 0
    assert main(["run", "behaviour", "rsa", "--no-figures", "--out", str(tmp_path / "later")] + args) == 0
    drawn, later = tmp_path / "drawn" / "figures", tmp_path / "later" / "figures"
    assert not later.exists() or not any(later.iterdir())
    assert "<img" not in (tmp_path / "later" / "report.html").read_text()
    assert main(["plot", str(tmp_path / "later")]) == 0
    pngs = sorted(p.name for p in drawn.glob("*.png"))
    assert len(pngs) >= 2 and sorted(p.name for p in later.glob("*.png")) == pngs
    assert all((drawn / n).read_bytes() == (later / n).read_bytes() for n in pngs)
    assert (tmp_path / "later" / "report.html").read_text().count("<img") == len(pngs)
