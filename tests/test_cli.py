"""The command line: help on every command, stimuli, eval and run on a tiny model, one-line errors."""

import json

import pytest

from vismech.app.cli import build_parser, main


def test_every_command_has_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: vismech " + name in capsys.readouterr().out


def test_models_lists_families_presets_organisms(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for word in ("qwen2_5_vl", "llava_onevision", "idefics2", "Qwen2.5-VL-7B", "LLaVA-1.5-13B", "organism"):
        assert word in out


def test_stimuli_same_seed_same_bytes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        assert main(["stimuli", "cma-id_selection", "--model", "llava", "--n", "3", "--seed", "5",
                     "--out", str(d)]) == 0
    files = sorted(p.name for p in a.iterdir())
    assert "manifest.json" in files and any(f.endswith(".png") for f in files)
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes()


def test_eval_writes_tidy_results(tmp_path):
    out = tmp_path / "ev"
    assert main(["eval", "--model", "tiny:llava", "--task", "scene_description", "color_retrieval",
                 "--n", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    tasks = {r["task"] for r in summary["accuracy"]}
    assert tasks == {"scene_description", "color_retrieval"}
    lines = (out / "trials.csv").read_text().splitlines()
    assert len(lines) == 1 + 6 and lines[0].startswith("model,experiment,trial,task,grid")
    acc = (out / "accuracy.csv").read_text().splitlines()
    assert acc[0].startswith("model,experiment,measure,value,ci_low,ci_high,n,task,grid")


def test_user_errors_exit_2_with_one_line(capsys, tmp_path):
    assert main(["eval", "--model", "tiny:nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown family" in err[0]
    assert main(["run", "nonsense", "--model", "tiny:llava", "--out", str(tmp_path)]) == 2
    assert "unknown experiment" in capsys.readouterr().err
