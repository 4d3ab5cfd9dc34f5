"""Data parallel through the CLI: the README's torchrun command runs as written (2 gloo processes, tiny model) and
resumes; every rank-sensitive step of a run directory, repeated under 2 processes. (That data parallel equals one
process is test_distributed.py's.)"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = str(Path(__file__).with_name("dp_rundir_worker.py"))


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(k, None)
    if env.get("PYTHONPATH"):  # the commands run in another directory
        env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep))
    return env


def readme_torchrun_command() -> list[str]:
    """The README's data-parallel command, as documented (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^\s*(torchrun --standalone --nproc-per-node 4 -m vismech run cma .*?)\n\s*```", text, re.S | re.M)
    assert m, "the README no longer documents the data-parallel torchrun command"
    return shlex.split(m.group(1).replace("\\\n", " "))


def test_readme_torchrun_command_runs_as_written(tmp_path):
    cmd = readme_torchrun_command()
    assert "--trials" in cmd and "--n" not in cmd  # torchrun's own parser takes --n for an abbreviation of its options
    swap = {"4": "2", "random:Qwen2.5-VL-7B": "tiny:qwen2_5_vl", "48": "4", "12": "2", "runs/cma-dp": str(tmp_path / "dp")}
    cmd = [swap.get(a, a) if i and cmd[i - 1] in ("--nproc-per-node", "--model", "--trials", "--batch-size", "--out")
           else a for i, a in enumerate(cmd)]
    assert cmd[:6] == ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "vismech"], cmd
    launcher = [sys.executable, "-m", "torch.distributed.run"]  # the torchrun console script, for this python
    r = subprocess.run(launcher + cmd[1:], env=_env(), capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    dp = tmp_path / "dp"
    manifest = json.loads((dp / "manifest.json").read_text())
    assert manifest["finished"] and manifest["options"]["cma"]["n"] == 4 and manifest["dtype"] == "bf16"
    assert (dp / "results" / "cma_heads.csv").exists() and (dp / "report.html").exists()
    # and resumed under torchrun: everything verified and skipped, nothing rewritten
    before = {p: p.read_bytes() for p in (dp / "results").iterdir()}
    r = subprocess.run(launcher + cmd[1:] + ["--resume"], env=_env(), capture_output=True, text=True, timeout=400,
                       cwd=tmp_path)
    assert r.returncode == 0 and "[cma] already done, skipped" in r.stdout, r.stderr[-3000:]
    assert {p: p.read_bytes() for p in (dp / "results").iterdir()} == before


def test_rank_sensitive_steps_under_two_processes_repeated(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        WORKER, str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert [x["world"] for x in ranks] == [2, 2]
    for i, (a, b) in enumerate(zip(ranks[0]["rounds"], ranks[1]["rounds"])):
        assert a["opened"] and not b["opened"]  # rank 0 opens the run, the other takes its decision
        assert a["values"] == b["values"] == [6 * i] * 3
        assert a["calls"] == b["calls"] == [1, 3]  # computed, loaded, recomputed after the damage: on both ranks
        assert a["second"] == b["second"] and "another vismech run" in a["second"]
        assert a["files"] == b["files"] == [".lock", "manifest.json", "units", "units/u.safetensors"]
    assert r.stderr.count("computing it again") == len(ranks[0]["rounds"])  # one line a damaged unit, rank 0's
    assert ranks[0]["sums"] == ranks[1]["sums"] and len(set(ranks[0]["sums"])) == 3
    assert ranks[0]["memmaps"] == ranks[1]["memmaps"]  # both see both processes' files, each in its own folder
    assert {m.split("/")[1] for m in ranks[0]["memmaps"]} == {"rank0", "rank1"} and len(ranks[0]["memmaps"]) == 6
