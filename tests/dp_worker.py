"""Worker for the data-parallel test: run under torchrun, patch every head, rank 0 saves the result."""

import os
import sys

import torch

from vismech import distributed
from vismech.engine import hooks, patching
from vismech.models.load import load_vlm
from vismech.scenes.counterfactual import cma_pairs

distributed.init()
vlm = load_vlm("tiny:qwen2_5_vl", device="cpu")
pairs = cma_pairs("id_selection", 3, seed=1)
clean = vlm.encode([p.clean for p in pairs])
cf = vlm.encode([p.counterfactual for p in pairs])
pos = [[clean.last]] * len(pairs)
src = patching.capture_z(vlm, cf, pos)
tid = torch.stack(vlm.first_token_pairs(clean, [p.answer for p in pairs], [p.answer_star for p in pairs]), 1)
out = patching.head_patch(vlm, clean, src, pos, tid, rows_per_forward=3)
if distributed.is_main():
    torch.save({"out": out, "world": distributed.world()}, sys.argv[1])

# the CMA sweep with its null: 3 chunks of 2 pairs, so 2 processes split the chunks (not the heads)
from vismech.engine.mediation import condition_scores  # noqa: E402

scores, nulls = condition_scores(vlm, cma_pairs("id_retrieval", 6, seed=2), "id_retrieval", batch_size=2, seed=0)
# and in bf16, where any change in how rows are grouped would move the rounding: 2 chunks, one a process
half = load_vlm("tiny:qwen2_5_vl", device="cpu", dtype="bf16")
bf16, bf16_null = condition_scores(half, cma_pairs("id_selection", 4, seed=3), "id_selection", batch_size=2, seed=0)
if distributed.is_main():
    torch.save({"out": out, "world": distributed.world(), "scores": scores, "nulls": nulls, "bf16": bf16,
                "bf16_null": bf16_null}, sys.argv[1])
distributed.shutdown()
# Skip the interpreter's teardown: gloo's threads occasionally abort there ("terminate called without an active
# exception", about 1 run in 15 under pytest) after every result has been computed, saved and the group destroyed.
sys.stdout.flush()
os._exit(0)
