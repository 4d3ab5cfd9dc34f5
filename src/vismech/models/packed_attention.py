"""Packed attention for the Qwen-family vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

HF's vision attention for these families, without flash-attn, calls SDPA once per window (or image) of the packed
sequence: a batch of 16 images at vismech's sizes is thousands of small calls per forward (on Qwen2.5-VL-7B the
vision tower took 13 of a 17 s prefill of 432 rows, `benchmarks/README.md`). ``_packed_sdpa`` batches all windows of
one length into one SDPA call, with the same numbers (tested against HF's SDPA, values and gradients).
``use_packed(model)`` switches a model's vision tower to it for good (every ``VLM`` of a family whose spec sets
``packed_vision``, unless the model was loaded with a flash-attention implementation of its own);
``packed_vision_attention(model, enabled)`` sets it on or off within a block (the organism trainer).

``cached_vision_tables(model)``: within a block, a Qwen2.5-VL vision tower gets the tables HF builds per image in
Python on every forward (rotary positions, window order, sequence bounds: about 5,700 small operators a planting step
of 160 images, over half the step's) from pieces cached per image size, put together on the CPU and copied once; the
chunk plan ``_packed_sdpa`` needs rides on the bound tensors. The same numbers (tested against HF's own functions).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F


def _packed_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, is_causal=False,
                 cu_seq_lens_q=None, **kwargs):
    """Block-diagonal attention over the packed windows/images given by ``cu_seq_lens_q``: chunks of one length
    are batched into one SDPA call. query/key/value: [1, heads, total, head_dim]; returns [1, total, heads, d]."""
    chunks, inverse = getattr(cu_seq_lens_q, PLAN, None) or _chunk_plan(cu_seq_lens_q.tolist(), query.device)
    outs = []
    for idx in chunks:  # [chunks, n] token indices: every window of one length n
        q, k, v = (x[0][:, idx].transpose(0, 1) for x in (query, key, value))  # [chunks, heads, n, d]
        o = F.scaled_dot_product_attention(q, k, v, scale=scaling)
        outs.append(o.permute(0, 2, 1, 3).reshape(-1, o.shape[1], o.shape[3]))  # [chunks*n, heads, d]
    return torch.cat(outs)[inverse].unsqueeze(0), None


PLAN = "_vismech_chunks"  # attribute of a bound tensor (``cached_vision_tables``) that holds its chunk plan


def _chunk_plan(cu: list[int], device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """For the bounds ``cu``: per distinct window length n, the [windows, n] token indices of those windows, and the
    permutation that puts their concatenated outputs back in token order. Built on the CPU, copied in one go."""
    starts, lengths = np.array(cu[:-1]), np.diff(cu)
    idx = [starts[lengths == n][:, None] + np.arange(n)[None] for n in sorted(set(lengths.tolist()) - {0})]
    flat = np.concatenate([i.reshape(-1) for i in idx])
    both = torch.from_numpy(np.concatenate([flat, np.argsort(flat, kind="stable")])).to(device)
    views, at = [], 0
    for i in idx:
        views.append(both[at:at + i.size].view(i.shape))
        at += i.size
    return views, both[at:]


PACKED = "flash_vismech_packed_sdpa"  # "flash" in the name routes HF's vision attention to its packed branch


def _vision_config(model):
    """The vision config of a model whose family's vision attention takes the packed branch (its spec sets
    ``Family.packed_vision``), else None."""
    from .families import FAMILIES, MODEL_TYPES

    name = MODEL_TYPES.get(getattr(model.config, "model_type", None))
    vc = getattr(model.config, "vision_config", None)
    return vc if vc is not None and name is not None and FAMILIES[name].packed_vision else None


def use_packed(model) -> bool:
    """Switch the model's vision tower to ``_packed_sdpa`` (kept for the model's life); False, and nothing changed,
    where the model has no such tower or already runs a flash-attention implementation."""
    vc = _vision_config(model)
    if vc is None or "flash" in str(vc._attn_implementation or ""):
        return vc is not None and vc._attn_implementation == PACKED
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED, _packed_sdpa)
    vc._attn_implementation = PACKED
    return True


@contextlib.contextmanager
def packed_vision_attention(model, enabled: bool = True):
    """Within the block, a Qwen-family vision tower attends with ``_packed_sdpa`` (``enabled``) or with HF's SDPA
    (not); other models are unchanged. The implementation before the block is restored after it."""
    vc = _vision_config(model)
    if vc is None:
        yield
        return
    old = vc._attn_implementation
    if enabled:
        use_packed(model)
    elif old == PACKED:
        vc._attn_implementation = "sdpa"
    try:
        yield
    finally:
        vc._attn_implementation = old


def _one_grid(tower, grid: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HF's own tables for one image of ``grid`` (t, h, w), as arrays: rotary positions [t*h*w, 2], window order
    [t*h*w / merge**2] and window bounds (in patches, from 0)."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    thw = torch.tensor([grid])
    pos = get_vision_position_ids(thw, tower.spatial_merge_size)
    order, bounds = get_vision_window_index(thw, spatial_merge_size=tower.spatial_merge_size,
                                            window_size=tower.window_size, patch_size=tower.patch_size)
    return pos.numpy(), order.numpy(), bounds.long().numpy()


def vision_tables(tower, grids: list[tuple[int, int, int]], cache: dict, device) -> dict:
    """The keyword arguments that make a Qwen2.5-VL vision tower skip building its tables for images of ``grids``:
    ``position_ids``, ``cu_seqlens``, ``window_index``, ``cu_window_seqlens`` (and the two maximum lengths where
    the attention is a flash kind, which would read them from the device). Per-grid pieces come from ``cache``."""
    from transformers.utils.generic import is_flash_attention_requested

    for g in set(grids) - set(cache):
        cache[g] = _one_grid(tower, g)
    pos, order, bounds = zip(*(cache[g] for g in grids))
    m = tower.spatial_merge_size
    merged = np.array([t * (h // m) * (w // m) for t, h, w in grids])  # each image's tokens after merging
    patches = np.array([t * h * w for t, h, w in grids])
    windows = np.array([len(b) - 1 for b in bounds])
    cu = np.concatenate([[0], np.cumsum(np.repeat([h * w for _, h, w in grids], [t for t, _, _ in grids]))])
    cu_win = np.concatenate([[0], np.concatenate([b[1:] for b in bounds])
                             + np.repeat(np.cumsum(patches) - patches, windows)])
    out = {"position_ids": torch.from_numpy(np.concatenate(pos)).to(device),
           "window_index": torch.from_numpy(np.concatenate(order) + np.repeat(np.cumsum(merged) - merged, merged))
           .to(device)}
    for key, longest, bounds in (("cu_seqlens", "max_seqlen", cu.tolist()),
                                 ("cu_window_seqlens", "max_window_seqlen", cu_win.tolist())):
        t = torch.tensor(bounds, dtype=torch.int32).to(device)
        if is_flash_attention_requested(tower.config):
            out[longest] = int(np.diff(bounds).max())
            if tower.config._attn_implementation == PACKED:
                setattr(t, PLAN, _chunk_plan(bounds, device))
        out[key] = t
    return out


@contextlib.contextmanager
def cached_vision_tables(model):
    """Within the block, every forward of a Qwen2.5-VL vision tower gets its tables from ``vision_tables`` (per-grid
    pieces cached for the block); other models are unchanged. Tables the caller passes are kept."""
    from .families import MODEL_TYPES

    tower = getattr(getattr(model, "model", model), "visual", None)
    if MODEL_TYPES.get(getattr(model.config, "model_type", None)) != "qwen2_5_vl" or tower is None:
        yield
        return
    cache: dict = {}

    def add_tables(module, args, kwargs):
        grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid_thw is None or "position_ids" in kwargs or "window_index" in kwargs:
            return None
        grids = [tuple(g) for g in grid_thw.tolist()]
        return args, {**kwargs, **vision_tables(module, grids, cache, args[0].device)}

    handle = tower.register_forward_pre_hook(add_tables, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
