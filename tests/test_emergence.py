"""The emergence summaries: seed table numbers by hand, and the figure drawn from the shipped organisms' logs."""

import json
from pathlib import Path

import numpy as np

from vismech.models.load import organism_dir
from vismech.organism.emergence import plot_emergence, read, seed_table


def test_seed_table_by_hand(tmp_path):
    paths = []
    for i, v in enumerate([0.5, 0.7, 0.9]):
        p = tmp_path / f"s{i}.jsonl"
        p.write_text(json.dumps({"step": 0, "accuracy": {"a": 0.0}}) + "\n" +
                     json.dumps({"step": 10 + i, "accuracy": {"a": v}}) + "\n")
        paths.append(p)
    (row,) = seed_table(paths)
    assert row["values"] == [0.5, 0.7, 0.9] and row["steps"] == [10, 11, 12]
    assert abs(row["mean"] - 0.7) < 1e-12 and abs(row["sd"] - 0.2) < 1e-12
    (row,) = seed_table(paths[:2], step=0)
    assert row["values"] == [0.0, 0.0] and row["steps"] == [0, 0]


def test_seed_table_reads_analysis_summaries_and_skips_undefined(tmp_path):
    paths = []
    for i, (n, layer) in enumerate([(0, None), (2, 3.0), (4, 5.0)]):
        p = tmp_path / f"s{i}.jsonl"
        snap = {"step": 5, "accuracy": {"a": 1.0},
                "cma": {"id_selection": {"n_significant": n, "mean_layer": layer}},
                "rsa": {"position_prompt": {"peak_r": 0.1 * i, "peak_layer": i}}}
        p.write_text(json.dumps(snap) + "\n")
        paths.append(p)
    rows = {r["group"]: r for r in seed_table(paths)}
    assert rows["cma/id_selection/n_significant"]["mean"] == 2.0
    assert rows["cma/id_selection/mean_layer"]["mean"] == 4.0  # the run with no significant head has no layer
    assert abs(rows["cma/id_selection/mean_layer"]["sd"] - 2 ** 0.5) < 1e-12
    assert abs(rows["rsa/position_prompt/peak_r"]["mean"] - 0.1) < 1e-12
    one = {r["group"]: r for r in seed_table(paths[1:2])}  # one run: a mean, no spread
    assert one["cma/id_selection/mean_layer"]["mean"] == 3.0 and np.isnan(one["cma/id_selection/mean_layer"]["sd"])


def test_shipped_organisms_have_log_spaced_snapshots_and_a_figure():
    stages = Path(__file__).resolve().parent.parent / "docs" / "organism-stages"
    shipped = {name: organism_dir(name) / "emergence.jsonl" for name in ("organism", "organism-llava")}
    # the organism's last stage (a short continuation), its first two stages and organism-llava
    analysed = [*shipped.values(), stages / "stage1" / "emergence.jsonl", stages / "stage2" / "emergence.jsonl"]
    for path in analysed:
        snaps = read(path)
        steps = [s["step"] for s in snaps]
        assert len(steps) >= 10 and steps == sorted(steps) and steps[0] == 0
        assert "accuracy" in snaps[-1]
    for path in analysed:
        snaps = read(path)
        assert {"accuracy", "rsa", "cma"} <= set(snaps[-1])
        assert set(snaps[-1]["cma"]) == {"id_retrieval", "id_selection", "feature_retrieval"}
    fig = plot_emergence({"organism stage 2": analysed[-1]})
    assert len(fig.axes) == 3  # accuracy, RSA peaks, CMA head counts
    assert len(fig.axes[0].lines) == len(snaps[-1]["accuracy"]) and len(fig.axes[1].lines) == 3 + 1  # + the zero line
