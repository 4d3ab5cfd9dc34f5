"""The benchmark scripts run as documented, on a tiny model on CPU (numbers meaningless, outputs checked)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def test_cma_engine_benchmark_checks_fast_against_naive(tmp_path):
    out = tmp_path / "cma.json"
    p = _run(["benchmarks/cma_engine.py", "--model", "tiny:llava", "--device", "cpu", "--dtype", "fp32",
              "--pairs", "2", "--sample-heads", "2", "--only-check", "--null", "--json", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["check"] == "ok" and set(res["fast_vs_naive_max_abs_score_diff"]) == {
        "id_retrieval", "id_selection", "feature_retrieval"}
    assert max(res["fast_vs_naive_max_abs_score_diff"].values()) < 1e-5
    assert res["fast_s"] > 0 and res["fast_with_null_s"] > 0 and min(res["null_sd"].values()) > 0
    assert "largest |score difference|" in p.stdout and "FLOP floor" in p.stdout


def test_run_all_benchmark_times_each_experiment(tmp_path):
    out, js = tmp_path / "run", tmp_path / "ra.json"
    p = _run(["benchmarks/run_all.py", "--model", "tiny:llava", "--device", "cpu", "--dtype", "fp32",
              "--experiments", "behaviour", "cma", "--n", "2", "--set", "null_samples=200",
              "--out", str(out), "--json", str(js)])
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(js.read_text())
    assert set(res["wall_seconds"]) == {"behaviour", "cma"} and res["peak_gpu_gib"] == {"behaviour": None,
                                                                                       "cma": None}
    assert "targets: total <=" in p.stdout
    again = _run(["benchmarks/run_all.py", "--model", "tiny:llava", "--out", str(out)])
    assert again.returncode == 2 and "exists" in again.stderr  # a timed run starts fresh


def test_edits_benchmark_stacks_settings_into_fewer_forwards_with_equal_hits():
    p = _run(["benchmarks/edits.py", "--model", "tiny:qwen2_5_vl", "--n", "4", "--batch-size", "4"])
    assert p.returncode == 0, p.stderr[-2000:]
    lines = {line.split(":")[0].strip(): line for line in p.stdout.splitlines()}
    one = int(lines["one forward per setting"].split(",")[1].split()[0])
    stacked = int(lines["settings stacked"].split(",")[1].split()[0])
    assert one > 70 and stacked < one / 5  # 70 settings (+ the set-up and clean runs), one forward each
    assert "hit counts equal: True" in p.stdout


def test_edit_writes_benchmark_compares_the_two_hook_paths_with_equal_scores():
    p = _run(["benchmarks/edit_writes.py", "--model", "tiny:llava", "--pairs", "2"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "one copy and write per edit:" in p.stdout and "edits joined:" in p.stdout
    assert "largest score difference 0\n" in p.stdout + "\n"


def test_counting_benchmark_compares_with_the_old_passes():
    p = _run(["benchmarks/counting.py", "--model", "tiny:qwen2_5_vl", "--device", "cpu", "--n", "2",
              "--batch-size", "2", "--max-new-tokens", "4"])
    assert p.returncode == 0, p.stderr[-2000:]
    assert "generation hits equal: True; first-token hits equal: True" in p.stdout
    assert "engine.decode.greedy" in p.stdout and "(equal: True)" in p.stdout and "ratio" in p.stdout


def test_setup_benchmark_times_the_engine_choices_with_equal_scores():
    p = _run(["benchmarks/setup_ab.py", "--model", "tiny:qwen2_5_vl", "--pairs", "4", "--repeats", "1"])
    assert p.returncode == 0, p.stderr[-2000:]
    lines = {name: line for name in ("as shipped", "prefix run again", "float32 products", "whole vocabulary")
             for line in p.stdout.splitlines() if line.strip().startswith(name)}
    assert len(lines) == 4 and all("x the shipped time" in line for line in lines.values())
    diffs = [float(line.split("largest score difference ")[1].split(";")[0]) for line in lines.values()]
    assert max(diffs) < 1e-4


def test_every_vismech_name_the_scripts_import_exists():
    """The benchmark and docs scripts run on the GPU, not in this suite: each ``from vismech... import name`` in them
    (function-level imports included) must still name something there (a benchmark that imported a function from
    the module it had left failed on the GPU and the run that read its rate fell back to a guess)."""
    import ast
    import importlib

    scripts = sorted(ROOT.glob("benchmarks/*.py")) + sorted(ROOT.glob("docs/**/*.py"))
    missing, checked = [], 0
    for path in scripts:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vismech":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    checked += 1
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{path.relative_to(ROOT)}: {node.module}.{alias.name}")
    assert checked > 100 and not missing, missing


def test_plant_data_benchmark_times_one_worker_in_both_regimes(tmp_path):
    out = tmp_path / "pd.json"
    p = _run(["benchmarks/plant_data.py", "--batch-size", "2", "--batches", "1", "--rounds", "1",
              "--invariance-from", "4", "--json", str(out)])
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["trees"]["this tree"]) == {"before", "after"} and min(res["trees"]["this tree"].values()) > 0
    assert "this tree    before step 4:" in p.stdout


def test_feeder_transfer_benchmark_compares_both_ways_of_receiving_a_batch():
    p = _run(["benchmarks/feeder_transfer.py", "--batch-size", "1", "--batches", "1", "--rounds", "1"])
    assert p.returncode == 0, p.stderr[-2000:]
    lines = {line.split(" ms")[0].rsplit(None, 1)[0].strip(): float(line.split(" ms")[0].rsplit(None, 1)[1])
             for line in p.stdout.splitlines() if line.endswith(" ms")}
    assert set(lines) == {"one buffer", "one tensor at a time"} and min(lines.values()) > 0
    assert "ratio (one tensor at a time / one buffer):" in p.stdout


def test_rsa_null_benchmark_equals_the_pair_by_pair_reference():
    p = _run(["benchmarks/rsa_null.py", "--n", "64", "--layers", "2", "--d", "16", "--perm", "3"])
    assert p.returncode == 0, p.stderr[-2000:]
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("permutation_null:") and "ratio" in last
    assert float(last.rsplit("largest difference ", 1)[1]) < 1e-12
