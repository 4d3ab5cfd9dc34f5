"""The Python API (``vismech.run``, ``vismech.load``, the names ``vismech`` exports), the tutorial, the resume keys
and the command line's conventions (--version, -q/-v, experiment and option listings, no default model)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vismech
from vismech.app.cli import main
from vismech.experiments import EXPERIMENTS, get

ROOT = Path(__file__).resolve().parent.parent
TINY = "tiny:qwen2_5_vl"
FAST = {"n": 2, "tasks": ["scene_description", "color_retrieval"], "generate": False}


def test_run_with_a_loaded_model_equals_the_cli_run(tmp_path, monkeypatch, capsys):
    """``vismech.run`` on a VLM the user loaded gives the CLI's results byte for byte, returns every summary, and
    loads no model itself."""
    vlm = vismech.load(TINY)
    import vismech.models.load as load

    def no_loading(*a, **k):
        raise AssertionError("vismech.run loaded a model although it was given one")

    monkeypatch.setattr(load, "load_vlm", no_loading)
    res = vismech.run("behaviour", vlm=vlm, out=tmp_path / "api", **FAST)
    monkeypatch.undo()
    assert main(["run", "behaviour", "--model", TINY, "--out", str(tmp_path / "cli"), "-n", "2", "--set",
                 'tasks=["scene_description", "color_retrieval"]', "--set", "generate=false"]) == 0
    for f in ("behaviour.csv", "behaviour_trials.csv", "behaviour.json"):
        assert (tmp_path / "api" / "results" / f).read_bytes() == (tmp_path / "cli" / "results" / f).read_bytes()
    assert list(res) == ["behaviour"] and res.out == tmp_path / "api"
    assert res["behaviour"] == json.loads((tmp_path / "cli" / "results" / "behaviour.json").read_text())
    rows = res.table("behaviour")
    assert {r["task"] for r in rows} == {"scene_description", "color_retrieval"}
    assert all(isinstance(r["value"], float) and isinstance(r["n"], int) for r in rows)
    assert [r["n"] for r in rows if r["target_row"] == ""] == [2, 2]
    assert all(isinstance(r["target_row"], int) for r in rows if r["target_row"] != "")  # no "0,1" strings
    again = vismech.run(["behaviour"], vlm=TINY, out=tmp_path / "api", resume=True, **FAST)  # by name, resumed
    assert again["behaviour"] == res["behaviour"]


def test_run_errors_are_user_errors_before_anything_is_written(tmp_path):
    with pytest.raises(vismech.UserError, match="unknown experiment"):
        vismech.run(["rsa", "nope"], vlm=TINY, out=tmp_path / "x")
    with pytest.raises(vismech.UserError, match="not taken by any"):
        vismech.run(["rsa"], vlm=TINY, out=tmp_path / "x", no_such_option=1)
    assert not (tmp_path / "x").exists()


def test_import_loads_nothing_and_leaves_the_plotting_backend_alone():
    """``import vismech`` imports neither torch nor matplotlib, and importing every experiment (their plotting
    modules included) leaves a notebook's backend as it was (it used to be switched to Agg at import)."""
    code = ("import sys, matplotlib; matplotlib.use('pdf'); import vismech; "
            "assert 'torch' not in sys.modules and 'vismech.engine' not in sys.modules; "
            "from vismech.experiments import EXPERIMENTS, get; [get(n) for n in EXPERIMENTS]; "
            "import vismech.organism.emergence; print(matplotlib.get_backend(), vismech.__version__, "
            "vismech.run.__module__, vismech.hooks.__name__)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.pop("MPLBACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["pdf", vismech.__version__, "vismech.api", "vismech.engine.hooks"]


def test_the_tutorial_runs(tmp_path):
    """examples/tutorial.py (percent cells): loads the organism, runs RSA and CMA, plots both."""
    src = (ROOT / "examples" / "tutorial.py").read_text()
    assert src.count("# %%") >= 6
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "VISMECH_TUTORIAL_OUT": str(tmp_path / "t"),
           "MPLBACKEND": "Agg"}
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "tutorial.py")], capture_output=True, text=True,
                       env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Results(['rsa', 'cma']" in r.stdout
    assert (tmp_path / "t" / "tutorial.png").stat().st_size > 10_000
    assert "12 figure files redrawn" in r.stdout  # rsa, rsa_heads, cma_stage_map, cma_CONDITION x3; png + pdf
    assert json.loads((tmp_path / "t" / "results" / "rsa.json").read_text())["k"] == 4


def test_unit_keys_cover_every_option(tmp_path):
    """A unit computed under one grid is not reused under another. The behaviour experiment's key used to name
    only the task and n, so a second run into the same directory with another grid got the first grid's rows."""
    from vismech.experiments import behaviour
    from vismech.experiments.common import Context

    vlm = vismech.load(TINY)
    opts = {**behaviour.DEFAULTS, "tasks": ["scene_description"], "n": 2, "generate": False}
    a = behaviour.run(Context(vlm, tmp_path, {**opts, "grid": [2, 2]}, show_progress=False))
    b = behaviour.run(Context(vlm, tmp_path, {**opts, "grid": [3, 3]}, show_progress=False))
    assert [r["grid"] for r in a["accuracy"]] == ["2x2"] and [r["grid"] for r in b["accuracy"]] == ["3x3"]
    ctx = Context(vlm, tmp_path, {"x": 1, "y": [1, 2]})
    assert ctx.unit_key("u") == Context(vlm, tmp_path, {"y": [1, 2], "x": 1}).unit_key("u")
    assert ctx.unit_key("u") != Context(vlm, tmp_path, {"x": 1, "y": [1, 3]}).unit_key("u")
    assert ctx.unit_key("u") != Context(vlm, tmp_path, {"x": 1, "y": [1, 2]}, seed=1).unit_key("u")
    assert ctx.unit_key("u", heads=[(0, 1)]) != ctx.unit_key("u", heads=[(0, 2)])


def _run(argv, capsys):
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def test_version_and_experiment_listings(capsys):
    code, out = _run(["--version"], capsys)
    assert code == 0 and out.out.strip() == f"vismech {vismech.__version__}"
    code, out = _run(["run", "--help"], capsys)
    assert code == 0
    for name in EXPERIMENTS:
        assert f"  {name} " in out.out, name
    code, out = _run(["run", "cma", "key-intervention", "--help-options"], capsys)
    assert code == 0
    for name in ("cma", "key-intervention"):
        for key, default in get(name).DEFAULTS.items():
            assert f"  {key} = {json.dumps(default)}" in out.out, (name, key)
    assert "null re-pairings" in out.out or "null_samples" in out.out


def test_model_is_required_and_verbosity_flags(tmp_path, capsys):
    code, out = _run(["run", "behaviour", "--out", tmp_path / "r"], capsys)
    assert code == 2 and out.err.count("\n") == 1 and "--model" in out.err and "organism" in out.err
    assert not (tmp_path / "r").exists()
    argv = ["run", "behaviour", "--model", TINY, "-n", "1", "--set", 'tasks=["scene_description"]', "--set",
            "generate=false"]
    code, out = _run([*argv, "--out", tmp_path / "a"], capsys)
    assert code == 0 and "[behaviour] done in" in out.out  # the runner logs progress to stdout
    code, out = _run([*argv, "--out", tmp_path / "b", "-q"], capsys)
    assert code == 0 and "[behaviour]" not in out.out and out.err == ""
    code, out = _run(["-v", *argv, "--out", tmp_path / "a", "--resume"], capsys)
    assert code == 0 and "[behaviour] already done, skipped" in out.out


def test_readme_python_api_runs_as_written(tmp_path, monkeypatch):
    """Both code blocks of the README's Python API section, run as written (in a scratch directory)."""
    import re

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):text.index("\n## ", text.index("## Python API") + 3)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], "README:python-api-1", "exec"), scope)
    assert set(scope["res"]) == {"rsa", "cma"} and (tmp_path / "runs" / "api" / "report.html").exists()
    assert {r["condition"] for r in scope["heads"]} == {"id_retrieval", "id_selection", "feature_retrieval"}
    assert len(scope["heads"]) == 3 * scope["vlm"].n_layers * scope["vlm"].n_heads
    scope = {}
    exec(compile(blocks[1], "README:python-api-2", "exec"), scope)
    assert tuple(scope["acts"][("z", 2)].shape[::2]) == (8, scope["vlm"].n_heads)
