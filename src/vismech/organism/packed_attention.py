"""Packed attention for the Qwen2.5-VL vision tower, a training speed-up on CUDA.

HF's Qwen2.5-VL vision attention calls SDPA once per window (or image) in the packed sequence; ``_packed_sdpa``
batches all windows of one length into one SDPA call, with the same numbers (tested against HF's SDPA, values and
gradients). ``packed_vision_attention(model)`` switches a Qwen2.5-VL model's vision tower to it within a block.
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


@contextlib.contextmanager
def packed_vision_attention(model, enabled: bool = True):
    """Within the block, a Qwen2.5-VL vision tower attends with ``_packed_sdpa``; other models are unchanged."""
    vc = getattr(model.config, "vision_config", None)
    if not enabled or getattr(model.config, "model_type", "") != "qwen2_5_vl" or vc is None:
        yield
        return
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED, _packed_sdpa)
    old = vc._attn_implementation
    vc._attn_implementation = PACKED
    try:
        yield
    finally:
        vc._attn_implementation = old
