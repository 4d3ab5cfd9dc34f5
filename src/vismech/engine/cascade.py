"""Shared-prefix (cascade) attention: many patched rows of a batch run against the batch's one prefix.

Every patched row of pair b (one row per patched head, or per edit) sees the same keys and values at positions
[0, p0): those of pair b's clean run. Instead of giving each row its own copy of that prefix cache, the rows'
queries are folded into the query axis of one attention against the single prefix K/V (grouped-query heads viewed
onto their key/value head, no copies), each row attends to its own suffix [p0, T) separately, and the two softmax
parts are merged by their log-sum-exp (``cascade_attention``).

A row whose edit sits at layer l is identical to the clean run below l, so it joins the batch at layer l from the
clean suffix's residual stream there (``SharedPrefix.hidden[l]``): rows are ordered by the layer they join at and
appended to the running batch as the forward reaches that layer (``run``). The clean suffix pass that records those
residual streams uses the same attention, so an edit that changes nothing reproduces the clean numbers.

The model's own forward runs (its rotary embeddings, norms, MLPs, hooks): the decoder-layer list is cut to start at
the first joining layer, a pre-hook appends joining rows, and the attention function is routed here.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from vismech.engine import hooks, replay


_BMM_OUT_DTYPE: dict[str, bool] = {}


def _bmm_out_dtype(device) -> bool:
    """Whether this torch multiplies bf16 matrices into float32 results on ``device`` (``bmm(out_dtype=float32)``:
    CUDA, torch 2.8 and later); tried once per device type."""
    kind = torch.device(device).type
    if kind not in _BMM_OUT_DTYPE:
        try:
            x = torch.zeros(1, 1, 1, dtype=torch.bfloat16, device=device)
            _BMM_OUT_DTYPE[kind] = torch.bmm(x, x, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):  # an older torch, or a backend without it
            _BMM_OUT_DTYPE[kind] = False
    return _BMM_OUT_DTYPE[kind]


def _mm32(a: torch.Tensor, b: torch.Tensor, low: bool) -> torch.Tensor:
    """Batched ``a @ b`` (3-D) with float32 results: with ``low``, bf16/fp16 inputs multiplied as they are with float32
    accumulation and output where the backend can (tensor cores on CUDA: ``bmm(out_dtype=float32)``; elsewhere the
    same numbers through float32), else both inputs in float32."""
    if low and _bmm_out_dtype(a.device):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def cascade_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor, v_pre: torch.Tensor,
                      pre_valid: torch.Tensor, suf_valid: torch.Tensor, scale: float, low: bool | None = None
                      ) -> torch.Tensor:
    """Causal attention of R rows per pair over a shared prefix and their own suffix; scores, softmax and sums in
    float32.

    ``q`` [R, B, H, S, D] (suffix queries); ``k``, ``v`` [R, B, Hkv, S, D] (each row's suffix keys/values);
    ``k_pre``, ``v_pre`` [B, Hkv, P, D] (the pair's prefix, shared by its R rows); ``pre_valid`` [B, P] and
    ``suf_valid`` [B, S] (bool: key not padding). Suffix query i sees the whole prefix and suffix keys 0..i.
    ``low`` (default: bf16/fp16 inputs on CUDA) multiplies the inputs in their own precision with float32
    accumulation, as fused attention kernels do (the weights are rounded to that precision before they multiply
    the values); otherwise every product is in float32. Returns [R, B, H, S, D] in ``q``'s dtype."""
    R, B, H, S, D = q.shape
    hkv, P = k.shape[2], k_pre.shape[2]
    g = H // hkv
    low = (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)) if low is None else low
    lo = q.dtype if low else torch.float32
    neg = float("-inf")
    # own suffix: [R, B, Hkv, g*S, S]
    qs = q.reshape(R * B * hkv, g * S, D)
    ss = _mm32(qs, k.reshape(R * B * hkv, S, D).transpose(1, 2), low).reshape(R, B, hkv, g * S, S) * scale
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    allowed = causal[None] & suf_valid.to(q.device)[:, None, :]  # [B, S, S]
    allowed = allowed[:, None, None].expand(B, 1, g, S, S).reshape(B, 1, g * S, S)
    ss = ss.masked_fill(~allowed[None], neg)
    m = ss.amax(-1, keepdim=True).reshape(R, B, hkv, g, S, 1)
    if P:
        # shared prefix: every row's queries folded into the query axis, [B, Hkv, R*g*S, P]
        qp = q.reshape(R, B, hkv, g * S, D).permute(1, 2, 0, 3, 4).reshape(B * hkv, R * g * S, D)
        sp = _mm32(qp, k_pre.reshape(B * hkv, P, D).transpose(1, 2), low).reshape(B, hkv, R * g * S, P) * scale
        sp = sp.masked_fill(~pre_valid.to(q.device)[:, None, None, :], neg)
        m_p = sp.amax(-1, keepdim=True).reshape(B, hkv, R, g, S, 1).permute(2, 0, 1, 3, 4, 5)
        m = torch.maximum(m, m_p)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a query with no allowed key (padding)
    # suffix part
    w = (ss - m.reshape(R, B, hkv, g * S, 1)).exp()
    num = _mm32(w.to(lo).reshape(R * B * hkv, g * S, S), v.reshape(R * B * hkv, S, D), low).reshape(R, B, hkv, g, S, D)
    den = w.sum(-1, keepdim=True).reshape(R, B, hkv, g, S, 1)
    if P:
        mq = m.permute(1, 2, 0, 3, 4, 5).reshape(B, hkv, R * g * S, 1)
        w = (sp - mq).exp()
        pv = _mm32(w.to(lo).reshape(B * hkv, R * g * S, P), v_pre.reshape(B * hkv, P, D), low)
        num = num + pv.reshape(B, hkv, R, g, S, D).permute(2, 0, 1, 3, 4, 5)
        den = den + w.sum(-1, keepdim=True).reshape(B, hkv, R, g, S, 1).permute(2, 0, 1, 3, 4, 5)
    out = num / den.clamp_min(torch.finfo(torch.float32).tiny)
    return out.reshape(R, B, H, S, D).to(q.dtype)


def _repeat_rows(t: torch.Tensor, r: int, batch_dim: int) -> torch.Tensor:
    reps = [1] * t.dim()
    reps[batch_dim] = r
    return t.repeat(*reps)


def _batch_dim(key: str, t: torch.Tensor) -> int:
    """The batch axis: position ids of M-RoPE are [axes, batch, pos], its rotary tables [axes, batch, pos, dim]."""
    return 1 if (key == "position_ids" and t.dim() == 3) or (key == "rotary" and t.dim() == 4) else 0


@dataclass
class SharedPrefix:
    """What the patched rows of one batch share: per layer the prefix keys/values [B, Hkv, p0, D] and the clean
    suffix's layer input [B, S, hidden]; key validity of prefix and suffix; the suffix's position ids and rotary
    tables as the model passes them to its layers."""

    p0: int
    rows: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    hidden: list[torch.Tensor]
    pre_valid: torch.Tensor
    suf_valid: torch.Tensor
    position_ids: torch.Tensor | None
    rotary: tuple[torch.Tensor, ...] | None


#: The language-model inputs the cascade path replays; a batch whose language model takes other tensors runs
#: on the engine that copies the prefix cache per row (which replays every input). Inputs packed over a mask's
#: positions (``Family.packed_inputs``, e.g. Qwen3-VL's DeepStack features) act at those positions only, so where
#: the mask marks no position of the recomputed suffix they (and their mask) add nothing to it and are left out.
PLAIN_INPUTS = ("inputs_embeds", "attention_mask", "position_ids")


def _plain(inp, p0: int = 0) -> bool:
    def tensors(v):
        return torch.is_tensor(v) or (isinstance(v, (list, tuple, dict)) and len(v) > 0)

    idle = set()
    for key, mask_key in inp.packed.items():
        mask = inp.tensors.get(mask_key)
        if torch.is_tensor(mask) and not mask[:, p0:].any():
            idle |= {key, mask_key}
    mask = inp.tensors.get("attention_mask")
    return (all(k in PLAIN_INPUTS or k in idle or not tensors(v) for k, v in inp.tensors.items())
            and (mask is None or (torch.is_tensor(mask) and mask.dim() == 2)))


def supported(vlm, length: int, inp=None, p0: int = 0) -> bool:
    """Whether the cascade path is exact for this model: attention routable, one attention type in all layers,
    no sliding window shorter than the sequence, and (given the batch's ``inp``, ``replay.LMInputs``, recomputed
    from position ``p0`` on) only the ``PLAIN_INPUTS`` with a [batch, pos] attention mask, besides packed inputs
    whose mask marks no position from ``p0`` on."""
    tc = vlm.text_config
    window = getattr(tc, "sliding_window", None) if getattr(tc, "use_sliding_window", True) else None
    return (hooks.attention_routable(vlm) and len(set(getattr(tc, "layer_types", None) or ["full"])) == 1
            and (window is None or window >= length) and (inp is None or _plain(inp, p0)))


@contextlib.contextmanager
def _layers_from(vlm, start: int):
    """The language model runs decoder layers start..L-1 only (the others are skipped, not changed)."""
    lm = hooks.language_model(vlm)
    name = next(n for n, c in lm.named_children() if c is vlm.layers)
    setattr(lm, name, torch.nn.ModuleList(list(vlm.layers)[start:]))
    try:
        yield lm
    finally:
        setattr(lm, name, vlm.layers)


def _attend(sp: SharedPrefix):
    def fn(layer, inner, module, query, key, value, attention_mask, *args, **kwargs):
        n, h, s, d = query.shape
        r, b = n // sp.rows, sp.rows
        k_pre, v_pre = sp.kv[layer]
        scale = kwargs.get("scaling") or module.scaling
        out = cascade_attention(query.reshape(r, b, h, s, d), key.reshape(r, b, -1, s, d),
                                value.reshape(r, b, -1, s, d), k_pre, v_pre, sp.pre_valid, sp.suf_valid, scale)
        return out.reshape(n, h, s, d).transpose(1, 2).contiguous(), None

    return fn


@torch.no_grad()
def run(vlm, sp: SharedPrefix, starts: list[int], tail: int = 1, record: dict | None = None,
        vocab: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the last position(s) of ``len(starts)`` row blocks (block j = rows j*B..(j+1)*B-1, one per pair),
    block j joining at layer ``starts[j]`` (non-decreasing) from the clean suffix there. Edits registered by the
    caller (``hooks.intervene``, rows and positions relative to the suffix) apply as usual. With ``record`` (a
    dict) the rows' layer inputs and rotary tables are stored into it (the clean pass). Returns [rows, vocab] or
    [rows, tail, vocab], float32 (with ``vocab``, token ids: those columns only, ``replay.output_logits``)."""
    if any(b < a for a, b in zip(starts, starts[1:])):
        raise ValueError("row blocks must be ordered by the layer they join at")
    first = starts[0]
    joined = [sum(1 for s in starts if s <= layer) for layer in range(vlm.n_layers)]
    pos = sp.position_ids
    # (the layers' own position_ids argument keeps the first layer's batch: attention reads positions from the
    # rotary tables, which follow the rows)

    def join(layer, hidden, kwargs):
        if layer < first:
            return None
        n = joined[layer]
        if record is not None:
            record.setdefault("hidden", {})[layer] = hidden
            if "rotary" not in record and kwargs.get("position_embeddings") is not None:
                record["rotary"] = kwargs["position_embeddings"]
            return None
        have = hidden.shape[0] // sp.rows
        if n > have:
            new = sp.hidden[layer].to(hidden.device, hidden.dtype)
            hidden = torch.cat([hidden, _repeat_rows(new, n - have, 0)])
        if sp.rotary is not None:
            kwargs = {**kwargs, "position_embeddings": tuple(_repeat_rows(t, n, _batch_dim("rotary", t))
                                                              for t in sp.rotary)}
        return hidden, kwargs

    inputs = {"inputs_embeds": _repeat_rows(sp.hidden[first], joined[first], 0)}
    if pos is not None:
        inputs["position_ids"] = _repeat_rows(pos, joined[first], _batch_dim("position_ids", pos))
    with hooks.layer_inputs(vlm, join), hooks.attention_function(vlm, _attend(sp)), _layers_from(vlm, first) as lm:
        out = lm(**inputs, use_cache=False)
    return replay.output_logits(vlm, out, tail, vocab)


@torch.no_grad()
def shared_prefix(vlm, inp, prefix) -> SharedPrefix:
    """The shared prefix of a batch: ``prefix`` (``replay.PrefixCache``) and a clean pass of the suffix through
    every layer with cascade attention, recording each layer's input there."""
    t = inp.tensors
    p0, B = prefix.p0, inp.rows
    mask = t.get("attention_mask")
    T = t["inputs_embeds"].shape[1]
    valid = mask.bool() if mask is not None and mask.dim() == 2 else torch.ones(B, T, dtype=torch.bool)
    pos = t.get("position_ids")
    # without position ids the model counts positions from 0; the suffix starts at p0 (one row per pair)
    pos = pos[..., p0:] if pos is not None else torch.arange(p0, T, device=valid.device).expand(B, T - p0)
    sp = SharedPrefix(p0, B, prefix.kv, [t["inputs_embeds"][:, p0:]] * vlm.n_layers, valid[:, :p0],
                      valid[:, p0:], pos, None)
    got: dict = {}
    run(vlm, sp, [0], record=got)
    sp.hidden = [got["hidden"][layer] for layer in range(vlm.n_layers)]
    sp.rotary = got.get("rotary")
    return sp
