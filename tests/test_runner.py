"""Run directories: manifest, resume after SIGKILL (nothing lost, nothing duplicated), refusal to mix, report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vismech.app.cli import main

ARGS = ["run", "behaviour", "--model", "tiny:llava", "--n", "6", "--batch-size", "2",
        "--set", 'tasks=["scene_description","color_retrieval","spatial_relation"]', "--set", "generate=false"]


def test_kill_and_resume_loses_nothing_and_duplicates_nothing(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(ARGS + ["--out", str(ref)]) == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vismech"] + ARGS + ["--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    units = run / "units"
    deadline = time.time() + 120
    while time.time() < deadline and not (units.exists() and any(units.glob("*.safetensors"))):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "results" / "behaviour.json").exists(), "the run finished before it could be killed"
    kept = {p.name: p.stat().st_mtime_ns for p in units.glob("*.safetensors")}
    assert kept and not list(units.glob(".*tmp*"))  # finished units whole, no half-written file visible
    assert main(ARGS + ["--out", str(run)]) == 2  # without --resume the directory is refused
    assert main(ARGS + ["--out", str(run), "--resume"]) == 0
    for name, mtime in kept.items():  # finished units were loaded, not recomputed
        assert (units / name).stat().st_mtime_ns == mtime
    for table in ("behaviour_trials.csv", "behaviour.csv"):
        assert (run / "results" / table).read_text() == (ref / "results" / table).read_text()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["finished"] and manifest["options"]["behaviour"]["n"] == 6
    assert "versions" in manifest and "wall_seconds" in manifest


def test_resume_with_other_options_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(ARGS + ["--out", str(out)]) == 0
    args = [a if a != "6" else "5" for a in ARGS]
    assert main(args + ["--out", str(out), "--resume"]) == 2
    assert "different options" in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(ARGS + ["--out", str(blocker / "sub")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert main(["run", "behaviour", "--model", "tiny:llava", "--set", "nope=1", "--out", str(tmp_path / "x")]) == 2
    assert "not taken by any" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing half-written
    assert main(["run", "behaviour", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_report_embeds_figures_and_escapes_user_strings(tmp_path):
    from vismech.app.report import write_report
    from vismech.store.io import csv_text
    from vismech.store.results import tidy

    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    (run / "figures").mkdir()
    evil = "<script>alert(1)</script>"
    (run / "manifest.json").write_text(json.dumps({"model": evil, "experiments": ["behaviour"], "seed": 0, "outputs": {
        "behaviour": ["results/behaviour.csv", "figures/behaviour.png", "results/behaviour.json"]}}))
    row = {"task": evil, "grid": "2x2", "entropy": "", "measure": "first_token", "n": 4, "value": 0.5,
           "ci_low": 0.15, "ci_high": 0.85}
    (run / "results" / "behaviour.json").write_text(json.dumps({"accuracy": [row]}))
    (run / "results" / "behaviour.csv").write_text(csv_text(tidy([row], evil, "behaviour", "behaviour")))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    fig.savefig(run / "figures" / "behaviour.png")
    html = write_report(run).read_text()
    assert evil not in html and "&lt;script&gt;" in html
    assert "data:image/png;base64," in html and "http" not in html.split("<body>")[1].split("Manifest")[0]
    assert "50%" in html  # the caption computed from the results
    assert "<td>[0.15, 0.85]</td>" in html  # the table: the interval in one column, low first


def test_name_dot_key_sets_one_experiments_option_and_wins_over_key():
    from vismech.app.runner import plan
    from vismech.errors import UserError

    _, options = plan(["cma", "rsa"], None, {"n": 4, "cma.n": 8})
    assert options["cma"]["n"] == 8 and options["rsa"]["n"] == 4
    with pytest.raises(UserError, match="unknown option.*bogus"):
        plan(["cma"], None, {"cma.bogus": 1})
    with pytest.raises(UserError, match="not taken by any of cma"):
        plan(["cma"], None, {"rsa.n": 4})
    with pytest.raises(UserError, match="option n"):
        plan(["cma"], None, {"cma.n": 0})
