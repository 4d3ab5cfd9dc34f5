"""The emergence summaries: seed table numbers by hand, and the figure drawn from the shipped organisms' logs."""

import json

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


def test_shipped_organisms_have_log_spaced_snapshots_and_a_figure():
    for name in ("organism", "organism-llava"):
        snaps = read(organism_dir(name) / "emergence.jsonl")
        steps = [s["step"] for s in snaps]
        assert len(steps) >= 10 and steps == sorted(steps) and steps[0] == 0
    fig = plot_emergence({"organism": organism_dir("organism") / "emergence.jsonl"})
    assert len(fig.axes[0].lines) == len(snaps[-1]["accuracy"])
