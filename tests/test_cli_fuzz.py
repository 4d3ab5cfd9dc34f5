"""Every command fed a table of bad values: each exits with code 2, writes exactly one line to stderr (naming the
bad value or file), runs no planted code and leaves every file tree as it was (the run directory, the checkpoint
folders, the working directory)."""

import json
import shutil

import pytest

from cli_probe import cli, damaged_checkpoints, permissions_apply, tree
from vismech.app.cli import main

RUN = ["run", "behaviour", "--model", "tiny:llava", "-n", "1", "--set", "generate=false"]


@pytest.fixture(scope="module")
def area(tmp_path_factory):
    """Checkpoints (good and damaged), a file, a read-only folder, and finished / damaged run directories."""
    root = tmp_path_factory.mktemp("fuzz")
    marker = root / "PWNED"
    cks = damaged_checkpoints(root, marker)
    (root / "afile").write_text("not a directory")
    run = root / "run"
    assert main(RUN + ["--out", str(run)]) == 0
    bad = root / "run-truncated"
    shutil.copytree(run, bad)
    (bad / "results" / "behaviour.json").write_bytes((run / "results" / "behaviour.json").read_bytes()[:30])
    listy = root / "run-list-manifest"
    shutil.copytree(run, listy)
    (listy / "manifest.json").write_text("[1, 2]")
    (root / "ro").mkdir()
    (root / "ro" / "run").mkdir()
    shutil.copytree(run, root / "ro" / "run", dirs_exist_ok=True)
    (root / "ro" / "run" / "report.html").unlink()
    return {"root": root, "marker": marker, **{f"ck-{k}": v for k, v in cks.items()}, "run": run,
            "run-truncated": bad, "run-list-manifest": listy, "afile": root / "afile", "ro": root / "ro"}


# (command line, a word the one line must contain); {name} is replaced by the area's paths, OUT by a fresh folder
CASES = [
    # run: option values, checked by the experiments' declarations
    (RUN + ["--set", 'n="abc"'], "option n"),
    (RUN + ["--set", "grid=abc"], "option grid"),
    (RUN + ["--set", "grid=[0,3]"], "option grid"),
    (RUN + ["--set", "grid=[1,1]"], "option grid"),
    (RUN + ["--set", "grid=[11,11]"], "option grid"),
    (RUN + ["--set", "generate=maybe"], "option generate"),
    (RUN + ["--set", 'tasks=["nope"]'], "option tasks"),
    (RUN + ["--set", "tasks=[]"], "option tasks"),
    (RUN + ["--set", "max_new_tokens=0"], "option max_new_tokens"),
    (RUN + ["--set", "nope=1"], "nope"),
    (RUN + ["--set", "novalue"], "KEY=VALUE"),
    (["run", "cma", "--model", "tiny:llava", "--set", "q=2"], "option q"),
    (["run", "cma", "--model", "tiny:llava", "--set", "q=NaN"], "option q"),
    (["run", "cma", "--model", "tiny:llava", "--set", 'engine="bogus"'], "option engine"),
    (["run", "cma", "--model", "tiny:llava", "--set", "null_samples=-5"], "option null_samples"),
    (["run", "cma", "--model", "tiny:llava", "-n", "1"], "option n"),
    (["run", "cma", "--model", "tiny:llava", "--set", 'conditions=["id_nothing"]'], "option conditions"),
    (["run", "key-intervention", "--model", "tiny:llava", "--set", "cma_n=1"], "option cma_n"),
    (["run", "key-intervention", "--model", "tiny:llava", "--set", 'key_heads="some"'], "option key_heads"),
    (["run", "entropy", "--model", "tiny:llava", "--set", "grids=[[4,4]]"], "option grids"),
    (["run", "rsa", "--model", "tiny:llava", "--set", "ci=1.5"], "option ci"),
    (["run", "reuse", "--model", "tiny:llava", "--set", "heads=[[1]]"], "option heads"),
    (["run", "reuse", "--model", "tiny:llava", "--set", "grid=[4,4]"], "option grid"),
    (["run", "reuse", "--model", "tiny:llava", "--set", "alpha=\"x\""], "option alpha"),
    (["run", "counting-ablation", "--model", "tiny:llava", "--set", "k_grid=[-1]"], "option k_grid"),
    (["run", "pca", "--model", "tiny:llava", "--set", 'select_by="best"'], "option select_by"),
    (["run", "relabs-patch", "--model", "tiny:llava", "--set", 'cells="all"'], "option cells"),
    (["run", "id-intervention", "--model", "tiny:llava", "--set", "alphas=[]"], "option alphas"),
    # run: CLI arguments
    (RUN + ["--batch-size", "-1"], "--batch-size"),
    (RUN + ["--batch-size", "0"], "--batch-size"),
    (RUN + ["--trials", "0"], "--trials"),
    (RUN + ["-n", "-3"], "-n"),
    (RUN + ["--trials", "1000000000"], "--trials"),
    (RUN + ["--seed", "-1"], "--seed"),
    (RUN + ["--seed", "x"], "--seed"),
    (RUN + ["--device", "cuda"], "cuda"),
    (RUN + ["--device", "cuda:7"], "cuda:7"),
    (RUN + ["--device", "bogus"], "bogus"),
    (RUN + ["--dtype", "fp8"], "--dtype"),
    (RUN + ["--prompt-format", "xml"], "--prompt-format"),
    (["run", "nonsense", "--model", "tiny:llava"], "unknown experiment"),
    (["run", "behaviour", "--model", "tiny:nope"], "unknown family"),
    (["run", "behaviour", "--model", "random:nope"], "unknown preset"),
    (["run", "behaviour", "--model", "{root}/no-such-model"], "does not exist"),
    (["run", "behaviour", "--model", "{ck-truncated}"], "weights"),
    (["run", "behaviour", "--model", "{ck-random}"], "weights"),
    (["run", "behaviour", "--model", "{ck-pickle}"], "pickle"),
    (RUN + ["--out", "{afile}"], "is a file"),
    (RUN + ["--out", "{afile}/sub"], "is a file"),
    (RUN + ["--out", "{run}"], "already holds a run"),
    (RUN + ["--out", "{run}", "--resume", "-n", "2"], "different options"),
    (["run", "behaviour", "--model", "tiny:llava", "--set", "grid=[2,2]", "--debug-nope"], "unrecognized"),
    # demo
    (["demo", "--trials", "0"], "--trials"),
    (["demo", "--set", "n=0"], "option n"),
    (["demo", "--batch-size", "0"], "--batch-size"),
    (["demo", "--device", "bogus"], "bogus"),
    # eval
    (["eval", "--model", "tiny:llava", "--trials", "0"], "--trials"),
    (["eval", "--model", "tiny:llava", "-n", "-1"], "-n"),
    (["eval", "--model", "tiny:llava", "--out", "{afile}"], "is a file"),
    (["eval", "--model", "tiny:llava", "--task", "nope"], "unknown task"),
    (["eval", "--model", "tiny:llava", "--grid", "0x3"], "--grid"),
    (["eval", "--model", "tiny:llava", "--grid", "abc"], "--grid"),
    (["eval", "--model", "tiny:llava", "--batch-size", "0"], "--batch-size"),
    (["eval", "--model", "tiny:llava", "--device", "bogus"], "bogus"),
    (["eval", "--model", "tiny:llava", "--seed", "-1"], "--seed"),
    (["eval", "--model", "tiny:nope"], "unknown family"),
    (["eval", "--model", "{ck-truncated}"], "weights"),
    # stimuli
    (["stimuli", "scene_description", "--trials", "0"], "--trials"),
    (["stimuli", "scene_description", "-n", "-1"], "-n"),
    (["stimuli", "scene_description", "--n", "1000000000"], "--n"),
    (["stimuli", "scene_description", "--grid", "0x3"], "--grid"),
    (["stimuli", "scene_description", "--grid", "1x1"], "--grid"),
    (["stimuli", "scene_description", "--grid", "11x11"], "--grid"),
    (["stimuli", "scene_description", "--out", "{afile}"], "is a file"),
    (["stimuli", "nope"], "unknown task"),
    (["stimuli", "scene_description", "--seed", "-1"], "--seed"),
    (["stimuli", "scene_description", "--model", "nope"], "nope"),
    (["stimuli", "pca", "--grid", "2x2"], "3x3"),
    # report
    (["report", "{root}/no-such-run"], "not a vismech run directory"),
    (["report", "{run-truncated}"], "behaviour.json"),
    (["report", "{run-list-manifest}"], "manifest.json"),
    (["report", "{run-truncated}", "--replot"], "behaviour.json"),
    # plot
    (["plot", "{root}/no-such-run"], "not a vismech run directory"),
    (["plot", "{run-list-manifest}"], "manifest.json"),
    (["plot", "{afile}"], "not a vismech run directory"),
    # train-organism
    (["train-organism", "--arch", "llava", "--steps", "-1"], "--steps"),
    (["train-organism", "--arch", "llava", "--steps", "0"], "--steps"),
    (["train-organism", "--arch", "llava", "--batch-size", "0"], "--batch-size"),
    (["train-organism", "--arch", "llava", "--lr", "-1"], "--lr"),
    (["train-organism", "--arch", "llava", "--lr", "0"], "--lr"),
    (["train-organism", "--arch", "llava", "--seed", "-1"], "--seed"),
    (["train-organism", "--arch", "llava", "--eval-n", "0"], "--eval-n"),
    (["train-organism", "--arch", "llava", "--max-minutes", "-1"], "--max-minutes"),
    (["train-organism", "--arch", "llava", "--workers", "-1"], "--workers"),
    (["train-organism", "--arch", "bogus"], "--arch"),
    (["train-organism", "--arch", "llava", "--device", "bogus"], "bogus"),
    (["train-organism", "--arch", "llava", "--sizes", "{bad"], "--sizes"),
    (["train-organism", "--arch", "llava", "--weight", "nope=1"], "nope"),
    (["train-organism", "--arch", "llava", "--out", "{afile}"], "is a file"),
    # models
    (["models", "--bogus"], "unrecognized"),
]


def _fill(argv: list[str], area: dict, out) -> list[str]:
    filled = [a.format(**{k: str(v) for k, v in area.items()}) if "{" in a and "}" in a and not a.startswith("{bad")
              else a for a in argv]
    needs_out = filled[0] in ("run", "demo", "eval", "stimuli", "train-organism") and "--out" not in filled
    return filled + (["--out", str(out)] if needs_out else [])


@pytest.mark.parametrize("argv,word", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_bad_value_is_one_line_exit_2_and_leaves_nothing(argv, word, area, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default --out, or any stray file, would land here
    argv = _fill(argv, area, tmp_path / "OUT")
    before, cwd_before = tree(area["root"]), tree(tmp_path)
    code, err = cli(argv, capsys)
    assert code == 2, (argv, err)
    assert len(err) == 1 and word in err[0], err
    assert "Traceback" not in err[0]
    assert tree(area["root"]) == before and tree(tmp_path) == cwd_before
    assert not area["marker"].exists()


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys):
    code, err = cli(RUN + ["--set", 'n="abc"', "--out", tmp_path / "o", "--debug"], capsys)
    assert code == 2 and err[0].startswith("Traceback") and "UserError" in "\n".join(err)
    assert err[-1].startswith("vismech: error: option n")


def test_internal_errors_keep_their_traceback(monkeypatch, tmp_path):
    """A bug (any exception but a UserError) is not turned into one line: it propagates with its traceback."""
    from vismech.engine import evaluate
    def broken(*a, **k):
        raise ValueError("an internal bug")

    monkeypatch.setattr(evaluate, "evaluate", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(RUN + ["--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # and, as no work was stored, the run left nothing behind


def test_every_experiment_default_satisfies_its_own_rule():
    from vismech.experiments import EXPERIMENTS, get
    from vismech.experiments.options import check_options

    for name in EXPERIMENTS:
        m = get(name)
        assert check_options(m, dict(m.DEFAULTS)) == json.loads(json.dumps(dict(m.DEFAULTS))), name


def test_read_only_output_is_refused_before_any_work(area, monkeypatch, capsys):
    """eval and report into a read-only directory: one line before the model is loaded or the page built."""
    import vismech.models.load as load

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(load, "load_vlm", no_load)
    ro = area["ro"]
    before = tree(ro)
    ro.chmod(0o555)
    (ro / "run").chmod(0o555)
    try:
        with permissions_apply():
            code, err = cli(["eval", "--model", "tiny:llava", "--out", ro / "ev"], capsys)
            assert code == 2 and len(err) == 1 and "cannot write" in err[0], err
            code, err = cli(["report", ro / "run"], capsys)
            assert code == 2 and len(err) == 1 and "cannot write" in err[0], err
            code, err = cli(RUN + ["--out", ro / "new"], capsys)
            assert code == 2 and len(err) == 1 and "cannot write" in err[0], err
    finally:
        (ro / "run").chmod(0o755)
        ro.chmod(0o755)
    assert tree(ro) == before
