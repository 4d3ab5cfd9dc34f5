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

from vismech.errors import UserError


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group that torchrun set up (NCCL on GPUs, gloo on CPU); idempotent."""
    if launched() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend)


_SOLO = [False]


def active() -> bool:
    """True in a data-parallel run (several processes), except inside ``solo()``."""
    return not _SOLO[0] and _group()


class solo:
    """Within the block this process works alone: ``active()`` is False, so the patching engine does not split its
    heads across processes (the caller has already split the work another way, e.g. by pairs)."""

    def __enter__(self):
        self.old = _SOLO[0]
        _SOLO[0] = True

    def __exit__(self, *exc):
        _SOLO[0] = self.old


def _group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if _group() else 0


def world() -> int:
    return dist.get_world_size() if _group() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def default_device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{local_rank()}" if launched() else "cuda"
    return "cpu"


def process_gpus() -> list[int]:
    """The GPUs this process may use: all of them alone, or its own equal share (GPUs LOCAL_RANK*k .. +k-1,
    k = GPUs // LOCAL_WORLD_SIZE) when torchrun starts several processes on the host, so that data and model
    parallelism combine (each process a model sharded over its k GPUs)."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if n == 0:
        return []
    k = n // procs
    if k == 0:
        raise UserError(f"{procs} processes on this host but only {n} GPUs; start at most {n} with torchrun")
    return list(range(local_rank() * k, (local_rank() + 1) * k)) if procs > 1 else list(range(n))


def max_memory(fraction: float = 0.9) -> dict:
    """``{gpu: bytes}`` for ``process_gpus()`` (``fraction`` of each card), the budget of a ``device_map``."""
    return {i: int(torch.cuda.get_device_properties(i).total_memory * fraction) for i in process_gpus()}


def shard(items: list) -> list:
    """This process's share: every world()-th item starting at rank()."""
    return items[rank()::world()]


def unshard(local: torch.Tensor, n: int) -> torch.Tensor:
    """Reassemble [n, ...] from every process's ``shard`` result (its local rows); same on every process."""
    if not active():
        return local
    parts = gather(local.cpu())
    out = torch.empty((n,) + tuple(parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[r::world()] = part
    return out


def gather(obj) -> list:
    """Every process's ``obj`` (picklable; tensors travel on the CPU), in rank order, on every process."""
    if not _group():
        return [obj]
    parts: list = [None] * world()
    dist.all_gather_object(parts, obj)
    return parts


def from_main(obj):
    """Rank 0's ``obj`` on every process (``obj`` itself alone): decisions that read the file system (is this
    unit stored? is the run directory usable?) are taken by rank 0 only, so that processes never disagree."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    """Leave the process group (after a last barrier) so that every process exits cleanly; idempotent."""
    if dist.is_available() and dist.is_initialized():
        if _group():
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()
