"""Capture the representations the paper's analyses read, once per trial set, and share them between experiments.

What it is for: PCA (Fig. 1b), RSA (Figs. 1c, 2) and the entropy analysis (Figs. 6-7) all read the same few token
positions of the language model: the **last token** (where the target is named) and the **comma tokens** after
each described object (``Batch.commas``; the paper reads the described objects' positions there). ``capture``
runs every trial once, keeps only those positions at every layer, and records whether the answer is the model's
greedy answer (``models.answers``: in the same forward where the task's answers are single tokens, the arg-max of
the last-token logits is the answer's token; otherwise one teacher-forced forward more), so analyses can split
trials by correct/error.

What is kept, per trial set (n trials, L layers, S described objects per trial, P = 1 + S positions):

- ``resid``: the residual stream after each decoder layer (hook site ``"resid"``), array [L, P, n, d]; position 0
  is the last token, positions 1..S the comma tokens in prompt order. ``last()`` -> [L, n, d], ``commas()`` -> a
  list of S arrays [L, n, d] (the form ``analysis.rsa`` takes for the comma-token case).
- ``z`` (optional, ``CaptureSpec.z``): per-head attention outputs (the o_proj input) at the same positions,
  [L, H, P, n, d_head], for per-head RSA; ``last("z")`` -> [L, H, n, d_head].
- ``correct`` [n] (bool), ``predicted`` and ``answer_ids`` [n] (first-token ids; ``correct`` is the answer rule's).

Memory stays bounded: a forward keeps only the P positions (``hooks.capture`` gathers them inside the hook), they
are moved to the CPU as float32 (or float16, ``CaptureSpec.dtype``) and written into one preallocated array per
site. When that array would exceed ``memmap_over_bytes`` and a ``memmap_dir`` is given, the array is a
``numpy.memmap`` (an ``.npy`` file) there instead, so 7,200 trials of a 28-layer 3,584-wide model (2.9 GB of
last-token states) never sit in RAM at once; analyses read one layer at a time (``resid[l, 0]`` is contiguous).
``stream`` yields the per-batch blocks for callers that reduce on the fly instead (e.g.
``analysis.pca.StreamingMoments``).

Batches: trials are grouped with ``engine.evaluate.batches`` so a batch shares one grid (one canvas size);
results are always stored in the order of the given trials. Comma capture needs every trial to describe the same
number of objects (true within each of the paper's K x N x N sets); a mixed set is a clear error.

Sharing within a run: ``for_context(ctx, trials, ...)`` caches the capture in ``ctx.shared`` keyed by the model and
a digest of the trials' JSON; a later experiment asking for the same trials (and no more than was captured) gets
the same object without a forward. Asking for more (e.g. ``z`` after a capture without it) recaptures with the
union. Choices the paper leaves open, with their options: storage dtype (``act_dtype``, float32 by default) and
the in-memory limit before switching to a memmap (``memmap_mb``, 512 MiB by default; files under
``<run>/cache/``, left on disk after the run).
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from vismech import distributed
from vismech.engine import hooks
from vismech.engine.evaluate import batches
from vismech.scenes.core import Trial

DTYPES = {"float32": (torch.float32, np.float32), "float16": (torch.float16, np.float16)}


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture: the comma tokens too (else the last token only), per-head outputs too, storage dtype."""

    commas: bool = True
    z: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"activation dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")

    def covers(self, other: "CaptureSpec") -> bool:
        return (self.commas or not other.commas) and (self.z or not other.z) and self.dtype == other.dtype

    def union(self, other: "CaptureSpec") -> "CaptureSpec":
        return replace(self, commas=self.commas or other.commas, z=self.z or other.z)


@dataclass
class Activations:
    """Captured states of ``trials`` (see the module docstring for the array layouts)."""

    trials: list[Trial]
    spec: CaptureSpec
    resid: np.ndarray                 # [L, P, n, d]
    z: np.ndarray | None              # [L, H, P, n, dh]
    correct: np.ndarray               # [n] bool
    predicted: np.ndarray             # [n] first-token arg-max ids
    answer_ids: np.ndarray            # [n] first token of each answer
    n_slots: int                      # S comma positions per trial
    forwards: int = 0                 # model forwards this capture ran
    files: list[Path] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.trials)

    @property
    def n_layers(self) -> int:
        return self.resid.shape[0]

    def _site(self, site: str) -> np.ndarray:
        if site == "resid":
            return self.resid
        if site == "z":
            if self.z is None:
                raise ValueError("per-head outputs were not captured; capture with CaptureSpec(z=True)")
            return self.z
        raise ValueError(f"captured sites are 'resid' and 'z', not {site!r}")

    def last(self, site: str = "resid") -> np.ndarray:
        """Last-token states: [L, n, d] for resid, [L, H, n, dh] for z (a view, no copy)."""
        return self._site(site)[..., 0, :, :]

    def commas(self, site: str = "resid") -> list[np.ndarray]:
        """Comma-token states, one array per described object in prompt order: [L, n, d] (z: [L, H, n, dh])."""
        if not self.spec.commas:
            raise ValueError("comma tokens were not captured; capture with CaptureSpec(commas=True)")
        a = self._site(site)
        return [a[..., 1 + s, :, :] for s in range(self.n_slots)]


def trials_digest(trials: list[Trial]) -> str:
    """A stable digest of a trial list (scenes, prompts, answers, meta, order)."""
    h = hashlib.sha1()
    for t in trials:
        h.update(json.dumps(t.to_json(), sort_keys=True).encode())
    return h.hexdigest()


def n_slots_of(trials: list[Trial]) -> int:
    counts = sorted({len(t.commas) for t in trials})
    if len(counts) != 1:
        raise ValueError(f"comma-token capture needs every trial to describe the same number of objects, got "
                         f"{counts}; capture each grid's set separately")
    return counts[0]


def positions_of(batch, n_slots: int) -> torch.Tensor:
    """[B, 1 + S] absolute positions per row: the last token, then the comma after each described object."""
    rows = [[batch.last] + list(c[:n_slots]) for c in batch.commas]
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def forward_positions(vlm, batch, positions: torch.Tensor, with_z: bool, dtype: torch.dtype = torch.float32):
    """One forward of ``batch``: resid [B, P, L, d], z [B, P, L, H, dh] (or None) at ``positions``, arg-max [B].

    The only place this module touches the model; everything else is bookkeeping.
    """
    L = vlm.n_layers
    sites = [("resid", l) for l in range(L)] + ([("z", l) for l in range(L)] if with_z else [])
    # kept on the device and moved to the host once: a copy per layer would stop the host at every layer
    with hooks.capture(vlm, sites, positions=positions, dtype=dtype) as got:
        logits = vlm.logits(batch)
    resid = torch.stack([got[("resid", l)][:, :, 0].to(vlm.input_device) for l in range(L)], 2).cpu()
    z = torch.stack([got[("z", l)].to(vlm.input_device) for l in range(L)], 2).cpu() if with_z else None
    return resid, z, logits.argmax(-1).cpu()


def encoded(vlm, trials: list[Trial], groups: list[list[int]], prefetch: bool | None = None
            ) -> Iterator[tuple[list[int], object]]:
    """(indices, ``vlm.encode`` of those trials) per group; with ``prefetch`` (default: on CUDA) the next group is
    encoded on a worker thread while the caller runs the model on this one (rendering and image processing are
    host work that the device would otherwise wait for)."""
    if prefetch is None:
        prefetch = vlm.input_device.type == "cuda"
    if not prefetch:
        for idx in groups:
            yield idx, vlm.encode([trials[i] for i in idx])
        return
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(vlm.encode, [trials[i] for i in groups[0]]) if groups else None
        for k, idx in enumerate(groups):
            b = nxt.result()
            if k + 1 < len(groups):
                nxt = pool.submit(vlm.encode, [trials[i] for i in groups[k + 1]])
            yield idx, b


def stream(vlm, trials: list[Trial], spec: CaptureSpec = CaptureSpec(), batch_size: int = 16,
           prefetch: bool | None = None
           ) -> Iterator[tuple[list[int], np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]]:
    """Per batch: (trial indices, resid [L, P, B, d], z [L, H, P, B, dh] or None, predicted [B], answer ids [B],
    correct [B]: the answer is the greedy answer, ``models.answers``). ``prefetch``: see ``encoded``."""
    if not trials:
        raise ValueError("no trials to capture")
    S = n_slots_of(trials) if spec.commas else 0
    tdt, ndt = DTYPES[spec.dtype]
    for idx, b in encoded(vlm, trials, batches(trials, batch_size), prefetch):
        resid, z, top = forward_positions(vlm, b, positions_of(b, S), spec.z, tdt)
        want = vlm.answer_ids(b, [trials[i].answer for i in idx])
        aset = vlm.answers(b, [[trials[i].answer] for i in idx])
        if aset.rule == "first_token":  # the arg-max is the token of one of the answer's forms
            hit = torch.tensor([int(top[j]) in {s[0] for s in aset.seqs[j][0]} for j in range(len(idx))])
        else:  # every token of the answer is the arg-max, teacher forced (one more forward)
            hit = vlm.score_answers(b, aset).greedy[:, 0]
        r = resid.permute(2, 1, 0, 3).numpy().astype(ndt, copy=False)
        zz = None if z is None else z.permute(2, 3, 1, 0, 4).numpy().astype(ndt, copy=False)
        yield idx, r, zz, top.numpy(), want.numpy(), hit.numpy()


def _alloc(shape, dtype, path: Path | None) -> np.ndarray:
    if path is None:
        return np.empty(shape, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)


def _slot(idx: list[int]):
    """A slice when the indices are consecutive (memmap writes stay contiguous), else the index list."""
    return slice(idx[0], idx[-1] + 1) if idx == list(range(idx[0], idx[-1] + 1)) else idx


def capture(vlm, trials: list[Trial], spec: CaptureSpec = CaptureSpec(), batch_size: int = 16,
            memmap_dir: str | Path | None = None, memmap_over_bytes: int = 512 << 20, name: str = "acts",
            progress: Callable[[int], None] | None = None) -> Activations:
    """Run every trial once and keep the last-token (and comma-token) states at every layer.

    Arrays larger than ``memmap_over_bytes`` (all of them with 0) become ``.npy`` memmaps named ``NAME_*.npy`` in
    ``memmap_dir``; without a ``memmap_dir`` everything stays in memory.
    """
    n = len(trials)
    S = n_slots_of(trials) if spec.commas else 0
    ndt = DTYPES[spec.dtype][1]
    resid = z = None
    files: list[Path] = []
    correct, predicted, answer = (np.zeros(n, bool), np.zeros(n, np.int64), np.zeros(n, np.int64))
    forwards = 0

    def where(shape, tag):
        nbytes = int(np.prod(shape)) * np.dtype(ndt).itemsize
        if memmap_dir is None or nbytes <= memmap_over_bytes:
            return None
        p = Path(memmap_dir) / f"{name}_{tag}.npy"
        files.append(p)
        return p

    for idx, r, zz, top, want, hit in stream(vlm, trials, spec, batch_size):
        if resid is None:  # shapes are known after the first batch
            shape = (r.shape[0], 1 + S, n, r.shape[-1])
            resid = _alloc(shape, ndt, where(shape, "resid"))
            if zz is not None:
                zshape = (zz.shape[0], zz.shape[1], 1 + S, n, zz.shape[-1])
                z = _alloc(zshape, ndt, where(zshape, "z"))
        sl = _slot(idx)
        resid[:, :, sl] = r
        if z is not None:
            z[:, :, :, sl] = zz
        predicted[idx], answer[idx] = top, want
        correct[idx] = hit
        forwards += 1
        if progress:
            progress(len(idx))
    for a in (resid, z):
        if isinstance(a, np.memmap):
            a.flush()
    return Activations(list(trials), spec, resid, z, correct, predicted, answer, S, forwards, files)


def for_context(ctx, trials: list[Trial], commas: bool = True, z: bool = False, desc: str = "capture"
                ) -> Activations:
    """``capture`` for an experiment, shared through ``ctx.shared`` by every experiment of the run.

    Reads the experiment options ``act_dtype`` and ``memmap_mb`` when it has them; memmaps go to
    ``ctx.out / "cache"`` (``cache/rankR`` for each process of a data-parallel run, which all capture the same). ``ctx.shared["activations_stats"]`` counts captures, forwards and reuses.
    """
    spec = CaptureSpec(commas=commas, z=z, dtype=ctx.options.get("act_dtype", "float32"))
    cache = ctx.shared.setdefault("activations", {})
    stats = ctx.shared.setdefault("activations_stats", {"captures": 0, "forwards": 0, "reused": 0})
    digest = trials_digest(trials)
    key = (id(ctx.vlm), getattr(ctx.vlm, "name", ""), digest)
    old = cache.get(key)
    if old is not None and old.spec.covers(spec):
        stats["reused"] += 1
        return old
    if old is not None:
        spec = old.spec.union(spec)
    mb = ctx.options.get("memmap_mb", 512)
    tag = f"{digest[:12]}_{'c' if spec.commas else ''}{'z' if spec.z else ''}_{spec.dtype}"
    cache_dir = ctx.out / "cache" / (f"rank{distributed.rank()}" if distributed.world() > 1 else "")
    with ctx.progress(len(trials), desc) as update:
        acts = capture(ctx.vlm, trials, spec, ctx.batch_size, memmap_dir=cache_dir,
                       memmap_over_bytes=int(mb * (1 << 20)), name=tag, progress=update)
    cache[key] = acts
    stats["captures"] += 1
    stats["forwards"] += acts.forwards
    return acts
