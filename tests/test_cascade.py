"""Shared-prefix (cascade) attention: the merge against plain softmax attention, and the engine built on it against
one full forward per head on every family, every CMA condition (left padding, M-RoPE, grouped-query attention)."""

import numpy as np
import pytest
import torch

from conftest import FAMILIES, tiny, two_object_trials
from vismech.engine import cascade, hooks, mediation, patching
from vismech.scenes.counterfactual import CONDITIONS, cma_pairs


def _plain_attention(q, k, v, k_pre, v_pre, pre_valid, suf_valid, scale):
    """Softmax attention of each row over its pair's prefix keys followed by its own suffix keys, GQA by
    repeating key/value heads: the textbook computation, row by row."""
    R, B, H, S, D = q.shape
    g = H // k.shape[2]
    out = torch.empty(R, B, H, S, D, dtype=torch.float64)
    for r in range(R):
        for b in range(B):
            keys = torch.cat([k_pre[b], k[r, b]], 1).double().repeat_interleave(g, 0)  # [H, P+S, D]
            vals = torch.cat([v_pre[b], v[r, b]], 1).double().repeat_interleave(g, 0)
            allowed = torch.cat([pre_valid[b].expand(S, -1),
                                 torch.ones(S, S, dtype=torch.bool).tril() & suf_valid[b][None]], 1)
            scores = (q[r, b].double() @ keys.transpose(1, 2)) * scale
            out[r, b] = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vals
    return out


@pytest.mark.parametrize("H,Hkv,S,P", [(4, 2, 3, 6), (6, 6, 1, 5), (8, 2, 4, 0), (4, 1, 2, 7)])
def test_cascade_merge_equals_softmax_over_the_concatenated_keys(H, Hkv, S, P):
    g = torch.Generator().manual_seed(H * 100 + S * 10 + P)
    R, B, D = 3, 2, 5
    q = torch.randn(R, B, H, S, D, generator=g)
    k, v = torch.randn(R, B, Hkv, S, D, generator=g), torch.randn(R, B, Hkv, S, D, generator=g)
    k_pre, v_pre = torch.randn(B, Hkv, P, D, generator=g), torch.randn(B, Hkv, P, D, generator=g)
    pre_valid = torch.ones(B, P, dtype=torch.bool)
    pre_valid[1, : P // 2] = False  # left padding of pair 1
    suf_valid = torch.ones(B, S, dtype=torch.bool)
    if S > 1:
        suf_valid[0, -1] = False  # right padding of pair 0's suffix (answer tokens of unequal length)
    got = cascade.cascade_attention(q, k, v, k_pre, v_pre, pre_valid, suf_valid, 0.37)
    want = _plain_attention(q, k, v, k_pre, v_pre, pre_valid, suf_valid, 0.37)
    assert got.shape == (R, B, H, S, D) and got.dtype == q.dtype
    assert (got.double() - want).abs().max() < 1e-5
    # rows of one pair with identical queries and suffixes get identical outputs, and differ across pairs
    assert not torch.allclose(got[:, 0], got[:, 1])


def test_cascade_merge_keeps_bf16_inputs_and_accumulates_in_fp32():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, 1, 8, generator=g)
    k, v = torch.randn(2, 1, 2, 1, 8, generator=g), torch.randn(2, 1, 2, 1, 8, generator=g)
    kp, vp = torch.randn(1, 2, 300, 8, generator=g), torch.randn(1, 2, 300, 8, generator=g)
    ok = torch.ones(1, 300, dtype=torch.bool), torch.ones(1, 1, dtype=torch.bool)
    got = cascade.cascade_attention(*(t.bfloat16() for t in (q, k, v, kp, vp)), *ok, 0.35)
    want = _plain_attention(*(t.bfloat16().float() for t in (q, k, v, kp, vp)), *ok, 0.35)
    assert got.dtype == torch.bfloat16 and (got.double() - want).abs().max() < 1e-2


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_cascade_merge_in_low_precision_products_rounds_only_the_weights(device):
    """``low`` (the default for bf16 on CUDA): products of bf16 inputs with float32 accumulation, weights rounded
    to bf16 before they multiply the values, as fused attention kernels do; against the float32 products of the
    same bf16 inputs it differs by that rounding alone (2^-8 of a weight), on every padding case."""
    g = torch.Generator().manual_seed(1)
    R, B, H, Hkv, S, P, D = 3, 2, 8, 2, 3, 40, 16
    ts = [torch.randn(*shape, generator=g).bfloat16().to(device) for shape in
          [(R, B, H, S, D), (R, B, Hkv, S, D), (R, B, Hkv, S, D), (B, Hkv, P, D), (B, Hkv, P, D)]]
    pre_valid, suf_valid = torch.ones(B, P, dtype=torch.bool), torch.ones(B, S, dtype=torch.bool)
    pre_valid[1, :7], suf_valid[0, -1] = False, False
    low = cascade.cascade_attention(*ts, pre_valid, suf_valid, 0.25, low=True)
    full = cascade.cascade_attention(*ts, pre_valid, suf_valid, 0.25, low=False)
    want = _plain_attention(*(t.float().cpu() for t in ts), pre_valid, suf_valid, 0.25)
    err_low, err_full = (float((x.double().cpu() - want).abs().max()) for x in (low, full))
    assert low.dtype == torch.bfloat16 and err_low < 2e-2 and err_full < 1e-2
    assert float((low.float() - full.float()).abs().max()) < 2e-2
    if device == "cuda":  # the default there is the low-precision path
        assert torch.equal(cascade.cascade_attention(*ts, pre_valid, suf_valid, 0.25), low)
    else:  # no bf16-into-float32 product on the CPU (nor on CUDA before torch 2.8): float32 products instead
        assert cascade._bmm_out_dtype("cpu") is False


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefix_engine_equals_naive_on_every_condition(family, monkeypatch):
    """Every head of the tiny model, the three CMA conditions (their positions and answer scoring): fast == naive
    to 1e-4, with the shared-prefix path taken (rows joining at their heads' layers) on left-padded batches. The
    counterfactual values are scaled up so that the patches move the answer scores well beyond the tolerance."""
    vlm = tiny(family)
    joined, real = [], cascade.run
    monkeypatch.setattr(cascade, "run", lambda vlm_, sp, starts, *a, **k: joined.append(list(starts)) or
                        real(vlm_, sp, starts, *a, **k))
    setups = []
    for condition in CONDITIONS:
        pairs = cma_pairs(condition, 2, seed=11)
        clean, cf = vlm.encode([p.clean for p in pairs]), vlm.encode([p.counterfactual for p in pairs])
        pos, _ = patching.pad_positions(mediation.condition_positions(clean, condition))
        setups.append((clean, cf, pos, vlm.answers(clean, [[p.answer, p.answer_star] for p in pairs])))
    # a left-padded batch (prompts of different lengths), patched at its mention tokens and at its last token
    clean = vlm.encode(two_object_trials())
    assert (clean.inputs["attention_mask"] == 0).any()
    tid = torch.stack([vlm.answer_ids(clean, ["blue", "blue"]), vlm.answer_ids(clean, ["red", "green"])], 1)
    setups += [(clean, None, [m[0] for m in clean.mentions], tid), (clean, None, [[clean.last]] * 2, tid)]
    for i, (clean, cf, pos, answers) in enumerate(setups):
        if cf is None:
            with hooks.hooked(vlm, "v", 0, lambda x: -x):
                src = patching.capture_z(vlm, clean, pos)
        else:
            src = patching.capture_z(vlm, cf, pos)
        src = {layer: 30 * v for layer, v in src.items()}
        fast = patching.head_patch(vlm, clean, src, pos, answers, rows_per_forward=5)
        slow = patching.naive_head_patch(vlm, clean, src, pos, answers)
        base = (vlm.score_answers(clean, answers).scores if cf is not None
                else vlm.logits(clean).gather(1, answers))
        assert (fast - slow).abs().max() < 1e-4, (family, i)
        assert ((slow - base).abs().amax((1, 2)) > 1e-3).sum() >= 2, (family, i)  # the patches move the scores
    if not cascade.supported(vlm, clean.length):  # local and global attention layers (Gemma 3): the copying
        assert not joined  # engine ran, and was checked above
        return
    assert [0] in joined  # the clean suffix pass
    assert any(s[0] > 0 for s in joined)  # rows that start at their patched layer
    assert any(len(set(s)) > 1 for s in joined)  # rows that join mid-network


def test_cma_scores_and_null_of_the_shared_prefix_engine_equal_naive():
    """The sweep as the experiment runs it (baseline through the engine, re-paired null) on the M-RoPE family."""
    vlm = tiny("qwen2_5_vl")
    for condition in ("id_retrieval", "feature_retrieval"):
        pairs = cma_pairs(condition, 3, seed=11)
        fast, fnull = mediation.condition_scores(vlm, pairs, condition, seed=2)
        slow, snull = mediation.condition_scores(vlm, pairs, condition, engine="naive", seed=2)
        # fp32 rounding of the logits (~1e-7) is far below the scores (>= 2e-5 here)
        assert min(np.abs(slow).max(), np.abs(snull).max()) > 2e-5
        assert np.abs(fast - slow).max() < 1e-6 and np.abs(fnull - snull).max() < 1e-6


def test_unsupported_models_take_the_copying_engine(monkeypatch):
    vlm = tiny("idefics2")
    assert cascade.supported(vlm, 100)
    monkeypatch.setattr(vlm.text_config, "sliding_window", 50)
    assert not cascade.supported(vlm, 100)  # a window shorter than the sequence is not modelled here
    monkeypatch.setattr(vlm.text_config, "_attn_implementation", "eager")
    assert not cascade.supported(vlm, 10)


def test_batch_size_from_free_memory_and_a_measured_row_cost():
    gib = 2 ** 30
    # 40 GiB free, 0.5 GiB per stacked head: 80% of it holds 64 heads
    assert patching.rows_from_memory(40 * gib, 0.5 * gib, current=16) == 64
    # never below what already ran, never below one
    assert patching.rows_from_memory(1 * gib, 0.5 * gib, current=16) == 16
    assert patching.rows_from_memory(0, 0.5 * gib, current=1) == 1
    assert patching.rows_from_memory(10 * gib, 0, current=7) == 7  # nothing measured: keep the size
    # the shared-prefix engine is sized by recomputed tokens only (no per-row prefix copies)
    vlm = tiny("llava")
    batch = vlm.encode([p.clean for p in cma_pairs("id_selection", 2, seed=0)])
    assert patching.default_rows_per_forward(vlm, batch, 1, cache_bytes=None) == (1 << 15) // 2
    assert patching.default_rows_per_forward(vlm, batch, 1, cache_bytes=1.0) == 1
