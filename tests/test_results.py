"""The shape of stored results (``store.results``): core columns, cells as numbers, arrays with dimension names,
and the report's tables for people."""

import json

import numpy as np
import pytest

from vismech.store.results import CORE, arrays_bytes, file_stem, number, read_arrays, tidy


def test_tidy_puts_the_core_columns_first_and_splits_cells():
    rows = [{"layer": 0, "ci_high": 0.9, "value": 0.5, "measure": "pearson_r", "ci_low": 0.1, "n": 8,
             "target_cell": "0,1"},
            {"layer": 1, "measure": "pearson_r", "value": 0.7, "n": 8, "target_cell": (2, 0), "extra": "x"}]
    got = tidy(rows, "organism", "rsa", "rsa")
    assert list(got[0]) == list(CORE) + ["layer", "target_row", "target_col", "extra"]
    assert got[0] == {"model": "organism", "experiment": "rsa", "measure": "pearson_r", "value": 0.5, "ci_low": 0.1,
                      "ci_high": 0.9, "n": 8, "layer": 0, "target_row": 0, "target_col": 1, "extra": ""}
    assert (got[1]["ci_low"], got[1]["target_row"], got[1]["target_col"]) == ("", 2, 0)


def test_tidy_refuses_a_table_without_measure_or_with_packed_cells():
    with pytest.raises(ValueError, match="'measure' and 'value'"):
        tidy([{"r": 0.5}], "m", "rsa", "rsa")
    with pytest.raises(ValueError, match="holds a list"):
        tidy([{"measure": "x", "value": 1, "ci": [0, 1]}], "m", "rsa", "rsa")
    trials = tidy([{"trial": 0, "answer": "red"}], "m", "behaviour", "behaviour_trials")  # per-trial records
    assert list(trials[0]) == ["model", "experiment", "trial", "answer"]


def test_numbers_come_back_as_numbers():
    assert [number(x) for x in ("3", "0.25", "nan", "", "red")][:2] == [3, 0.25]
    assert np.isnan(number("nan")) and number("") == "" and number("red") == "red"
    assert file_stem("binding-errors") == "binding_errors"


def test_arrays_keep_their_dimension_names(tmp_path):
    a = np.arange(24.0).reshape(2, 3, 4)
    data, dims = arrays_bytes({"scores": a, "null": np.ones(5)}, {"scores": ("layer", "head", "pair"),
                                                                 "null": ("sample",)})
    (tmp_path / "x.npz").write_bytes(data)
    (tmp_path / "x.dims.json").write_bytes(dims)
    got = read_arrays(tmp_path / "x.npz")
    assert got["scores"][0] == ("layer", "head", "pair") and np.array_equal(got["scores"][1], a)
    assert json.loads(dims) == {"null": ["sample"], "scores": ["layer", "head", "pair"]}
    with pytest.raises(ValueError, match="needs 3 dimension names"):
        arrays_bytes({"scores": a}, {"scores": ("layer", "head")})


def test_report_table_orders_columns_for_people():
    """Conditions first, then measure, value, the interval in one column (low before high) and n; the model and
    experiment columns, the same on every row, are left out. (The old report printed the summary's keys
    alphabetically: ci_high before ci_low.)"""
    from vismech.app.report import table_html

    rows = tidy([{"measure": "accuracy", "value": 0.75, "ci_low": 0.3, "ci_high": 0.95, "n": 4, "task": "count"}],
                "organism", "behaviour", "behaviour")
    html = table_html("t", rows)
    heads = [h.split("</th>")[0] for h in html.split("<th>")[1:]]
    assert heads == ["task", "measure", "value", "95% interval", "n"]
    assert "<td>[0.3, 0.95]</td>" in html and "organism" not in html


def test_stage_map_with_palette_colours_mixes_them():
    from vismech.analysis.cma import stage_map

    m = {"a": np.array([[1.0, 0.0]]), "b": np.array([[0.0, 2.0]])}
    got = stage_map(m, ["#FF0000", "#0080FF"])
    assert np.allclose(got[0, 0], [1, 0, 0]) and np.allclose(got[0, 1], [0, 128 / 255, 1])
    assert np.allclose(stage_map(m)[0, 1], [0, 1, 0])
