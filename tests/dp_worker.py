"""Worker for the data-parallel test: run under torchrun, patch every head, rank 0 saves the result."""

import sys

import torch

from vismech import distributed, hooks, patching
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
