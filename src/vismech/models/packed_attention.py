"""Packed attention for the Qwen-family vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL).

HF's vision attention for these families, without flash-attn, calls SDPA once per window (or image) of the packed
sequence: a batch of 16 images at vismech's sizes is thousands of small calls per forward (on Qwen2.5-VL-7B the
vision tower took 13 of a 17 s prefill of 432 rows, `benchmarks/README.md`). ``_packed_sdpa`` batches all windows of
one length into one SDPA call, with the same numbers (tested against HF's SDPA, values and gradients).
``use_packed(model)`` switches a model's vision tower to it for good (every ``VLM`` of a family whose spec sets
``packed_vision``, unless the model was loaded with a flash-attention implementation of its own);
``packed_vision_attention(model, enabled)`` sets it on or off within a block (the organism trainer).
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
    cu = cu_seq_lens_q.tolist()
    starts, lengths = np.array(cu[:-1]), np.diff(cu)
    outs, order = [], []
    for n in sorted(set(lengths.tolist())):
        if n == 0:
            continue
        idx = torch.as_tensor(starts[lengths == n][:, None] + np.arange(n)[None], device=query.device)
        q, k, v = (x[0][:, idx].transpose(0, 1) for x in (query, key, value))  # [chunks, heads, n, d]
        o = F.scaled_dot_product_attention(q, k, v, scale=scaling)
        outs.append(o.permute(0, 2, 1, 3).reshape(-1, o.shape[1], o.shape[3]))  # [chunks*n, heads, d]
        order.append(idx.reshape(-1))
    out = torch.cat(outs)[torch.argsort(torch.cat(order))]
    return out.unsqueeze(0), None


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
