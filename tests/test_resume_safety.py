"""Run directories are untrusted and resumes are exact: planted pickles run nothing, the report embeds nothing from
outside, damaged files are recomputed (one line each), other weights are refused, a failed start leaves the
directory usable, two runs never share one directory, and a run killed after ``cma`` with the demo's option set
resumes to byte-identical results."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_probe import Payload, cli, tree
from vismech.app.cli import main

ARGS = ["run", "behaviour", "--model", "tiny:llava", "-n", "3", "--batch-size", "2", "--set", "generate=false",
        "--set", 'tasks=["scene_description","color_retrieval"]']


def _results(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "results").iterdir())}


@pytest.fixture(scope="module")
def ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(ARGS + ["--out", str(out)]) == 0
    return out


def _torch_saved(obj) -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_planted_pickle_in_a_unit_runs_no_code(ref, tmp_path, capsys):
    """The issue's reproduction: results/behaviour.json deleted, every unit replaced by a torch.save'd pickle whose
    __reduce__ calls eval, --resume. The payload must not run; the units are recomputed, one line each."""
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    (run / "results" / "behaviour.json").unlink()
    marker = tmp_path / "PWNED"
    units = sorted((run / "units").iterdir())
    assert len(units) == 2
    for u in units:
        u.write_bytes(_torch_saved(Payload(marker)))
        u.with_suffix(".pt").write_bytes(_torch_saved(Payload(marker)))  # where the old format kept them
    code, err = cli(ARGS + ["--out", run, "--resume"], capsys)
    assert code == 0 and not marker.exists()
    notes = [e for e in err if e.startswith("vismech: ")]
    assert len(notes) == 2 and all("damaged" in e and "computing it again" in e for e in notes), notes
    assert _results(run) == _results(ref)


def test_report_embeds_only_regular_files_inside_the_run(ref, tmp_path, capsys):
    import base64

    run = tmp_path / "run"
    shutil.copytree(ref, run)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret bytes that must not leave the machine")
    figures = run / "figures"
    figures.mkdir(exist_ok=True)
    (figures / "behaviour_evil.png").symlink_to(secret)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(secret, outside / "behaviour_x.png")
    (figures / "sub").symlink_to(outside, target_is_directory=True)
    own = figures / "behaviour_own.png"
    own.write_bytes(b"\x89PNG own figure")
    # the report embeds the figures the manifest records for an experiment: a tampered manifest may name links,
    # files reached through a linked folder, or paths out of the run directory
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["outputs"]["behaviour"] += ["figures/behaviour_evil.png", "figures/sub/behaviour_x.png",
                                         "../secret.png", "figures/behaviour_own.png"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    assert base64.b64encode(secret.read_bytes()).decode() not in html
    assert base64.b64encode(own.read_bytes()).decode() in html  # regular figures still embedded
    # a results file that is a link out of the run directory is refused with one line naming it
    (run / "results" / "behaviour.json").unlink()
    (run / "results" / "behaviour.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text(json.dumps({"accuracy": [], "leak": "private"}))
    code, err = cli(["report", run], capsys)
    assert code == 2 and len(err) == 1 and "results/behaviour.json" in err[0]


@pytest.mark.parametrize("victim", ["results/behaviour.json", "results/behaviour.csv", "results/behaviour_trials.csv",
                                    "units/*"])
def test_damaged_files_are_recomputed_with_one_line(victim, ref, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    path = next(run.glob(victim))
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    if victim.startswith("units"):  # a finished experiment does not read its units: make it run again
        (run / "results" / "behaviour.json").unlink()
    code, err = cli(ARGS + ["--out", run, "--resume"], capsys)
    assert code == 0
    notes = [e for e in err if e.startswith("vismech: ")]
    assert len(notes) == 1 and path.relative_to(run).as_posix() in notes[0], notes
    assert _results(run) == _results(ref)
    assert path.read_bytes() == (ref / path.relative_to(run)).read_bytes()


def test_other_weights_at_the_same_path_are_refused(tmp_path, capsys):
    from vismech.models.load import load_vlm

    ck = tmp_path / "ck"
    for seed in (0, 1):
        vlm = load_vlm("tiny:llava", device="cpu", seed=seed)
        vlm.model.save_pretrained(ck)
        vlm.tokenizer.save_pretrained(ck)
        args = [a if a != "tiny:llava" else str(ck) for a in ARGS] + ["--out", tmp_path / "run"]
        if seed == 0:
            assert main([str(a) for a in args]) == 0
            (tmp_path / "run" / "results" / "behaviour.json").unlink()  # something left to resume
            before = tree(tmp_path / "run")
    code, err = cli(args + ["--resume"], capsys)
    assert code == 2 and len(err) == 1 and "weights" in err[0], err
    assert tree(tmp_path / "run") == before


def test_a_failed_start_leaves_the_directory_as_it_was(tmp_path, capsys):
    """A value only the loaded model can refuse (a head beyond its layers) fails before any work is stored: a new
    directory is removed, an existing one keeps only its own files, and the corrected command then runs without
    --resume."""
    out = tmp_path / "run"
    base = ["run", "reuse", "--model", "tiny:llava", "-n", "1", "--set", "n_estimate=2", "--set", "generate=false",
            "--out", out]
    code, err = cli(base + ["--set", "heads=[[99,0]]"], capsys)
    assert code == 2 and len(err) == 1 and "head (99, 0) is out of range" in err[0], err
    assert not out.exists()
    out.mkdir()
    (out / "mine.txt").write_text("the user's own file")
    code, err = cli(base + ["--set", "heads=[[99,0]]"], capsys)
    assert code == 2 and tree(out) == {str(out / "mine.txt"): b"the user's own file"}
    code, err = cli(base + ["--set", "heads=[[1,0]]"], capsys)
    assert code == 0, err


def test_a_second_run_into_the_same_out_is_refused(tmp_path, capsys):
    from vismech.store.rundir import Lock

    out = tmp_path / "run"
    out.mkdir()
    held = Lock(out).acquire()
    try:
        before = tree(out)
        code, err = cli(ARGS + ["--out", out], capsys)
        assert code == 2 and len(err) == 1 and f"pid {os.getpid()}" in err[0] and "another vismech run" in err[0]
        assert tree(out) == before
    finally:
        held.release()
    assert main([str(a) for a in ARGS + ["--out", out]]) == 0


def test_two_runs_started_at_once_do_the_work_once(tmp_path):
    """Two processes into one new --out at the same moment, twice: one runs, the other is refused with one
    line (by the lock, or by the finished run's manifest)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for i in range(2):
        out = tmp_path / f"run{i}"
        procs = [subprocess.Popen([sys.executable, "-m", "vismech"] + ARGS + ["--out", str(out)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        codes = sorted(c for c, _ in results)
        assert codes == [0, 2], results
        refused = next(e for c, e in results if c == 2).strip().splitlines()
        assert len(refused) == 1 and ("another vismech run" in refused[0] or "already holds" in refused[0])


# -- the demo's option set (n differs from cma_n), killed after cma ---------------------------------------------
DEMO = ["run", "cma", "reuse", "--model", "tiny:qwen2_5_vl", "-n", "2", "--batch-size", "8", "--set", "cma_n=4",
        "--set", "null_samples=100", "--set", "k=3", "--set", "n_estimate=4", "--set", "generate=false"]


def test_demo_options_killed_after_cma_resume_to_identical_results(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(DEMO + ["--out", str(ref)]) == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vismech"] + DEMO + ["--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = run / "results" / "cma.json"
    deadline = time.time() + 300
    while time.time() < deadline and not done.exists() and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert done.exists() and not (run / "results" / "reuse.json").exists(), "not killed between cma and reuse"
    assert main(DEMO + ["--out", str(run), "--resume"]) == 0
    assert _results(run) == _results(ref)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["options"]["reuse"]["cma_n"] == 4 and manifest["options"]["cma"]["n"] == 2


def test_an_unreachable_hub_fails_at_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "vismech", "run", "behaviour", "--model", "nobody-xyz/not-a-model",
                        "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=120)
    seconds = time.time() - t0
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "nobody-xyz/not-a-model" in r.stderr and seconds < 15, seconds
    assert not (tmp_path / "o").exists()


def test_stimuli_into_a_folder_with_an_older_set_leaves_no_stale_image(tmp_path):
    out = tmp_path / "stim"
    assert main(["stimuli", "scene_description", "-n", "6", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 6
    mine = out / "notes.png"
    mine.write_bytes(b"a user's own file, not listed by the manifest")
    assert main(["stimuli", "scene_description", "-n", "2", "--out", str(out)]) == 0
    listed = {t["image"] for t in json.loads((out / "manifest.json").read_text())["trials"]}
    assert {p.name for p in out.glob("*.png")} == listed | {"notes.png"} and len(listed) == 2
