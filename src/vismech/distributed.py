"""Data parallelism across processes started by ``torchrun`` (one model copy per process).

Under ``torchrun --nproc-per-node N -m vismech run ...`` every process loads its own model (on ``cuda:LOCAL_RANK``
when there are GPUs), the patching engine gives each process every N-th head and gathers the results, so all
processes hold the same full result, and only rank 0 writes files and shows progress. Without ``torchrun`` (no
``WORLD_SIZE`` in the environment) everything here is a no-op and vismech runs as one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group that torchrun set up (NCCL on GPUs, gloo on CPU); idempotent."""
    if launched() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{local_rank()}" if launched() else "cuda"
    return "cpu"


def shard(items: list) -> list:
    """This process's share: every world()-th item starting at rank()."""
    return items[rank()::world()]


def unshard(local: torch.Tensor, n: int) -> torch.Tensor:
    """Reassemble [n, ...] from every process's ``shard`` result (its local rows); same on every process."""
    if not active():
        return local
    parts: list = [None] * world()
    dist.all_gather_object(parts, local.cpu())
    out = torch.empty((n,) + tuple(parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[r::world()] = part
    return out


def barrier() -> None:
    if active():
        dist.barrier()
