"""Data parallel on CPU: 2 processes (gloo) give the same per-head patching result, and the same CMA scores and
null scores (pairs split by chunks), as one process."""

import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = str(Path(__file__).with_name("dp_worker.py"))


def test_two_processes_equal_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    subprocess.run([sys.executable, WORKER, str(one)], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    "29517", WORKER, str(two)], check=True, env=env, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    a, b = torch.load(one, weights_only=False), torch.load(two, weights_only=False)
    assert a["world"] == 1 and b["world"] == 2
    assert a["out"].shape == b["out"].shape == (12, 3, 2)
    assert (a["out"] - b["out"]).abs().max() < 1e-5
    # the CMA sweep split by chunks of pairs: the same scores and null scores, every pair filled
    assert a["scores"].shape == b["scores"].shape == a["nulls"].shape == (3, 4, 6)
    assert abs(a["scores"]).max() > 0 and (abs(a["scores"]).sum((0, 1)) > 0).all()
    assert abs(a["scores"] - b["scores"]).max() < 1e-6 and abs(a["nulls"] - b["nulls"]).max() < 1e-6
    # bf16: the same chunks give the same numbers to the last bit
    assert abs(a["bf16"]).max() > 0 and (a["bf16"] == b["bf16"]).all() and (a["bf16_null"] == b["bf16_null"]).all()
