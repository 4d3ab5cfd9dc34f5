"""The language model's inputs for one batch, as captured (``hooks.capture_lm_inputs``); how the fast engine cuts
them: rows of the batch, stacked copies of the batch, and positions (a suffix after a cached prefix); and how it
replays them: ``lm_inputs`` captures them (with the clean forward's logits, and its keys and values where asked),
``prefix_cache`` keeps a prefix's keys and values, ``lm_logits`` runs the text backbone alone (``output_logits``:
the logits of its output), ``check_replay`` is the self-check against the full forward.

Every argument is kept, whatever the family passes. Each tensor (also inside a list, tuple or dict) is cut along
its axes, found from its name and shape:

- ``position_ids`` of 3 dims (M-RoPE, [axes, batch, pos]): batch axis 1, position axis 2; of 2 dims [batch, pos];
- ``attention_mask``: [batch, keys], or [batch, heads, queries, keys] (a mask the model built itself): a suffix
  keeps every key up to its end (the cached prefix included) and its own queries;
- the family's packed inputs (``Family.packed_inputs``): tensors whose rows are the True positions of a boolean
  [batch, pos] mask input, row-major over the batch (Qwen3-VL's DeepStack features): cut with their mask;
- any other tensor whose dim 0 is the batch size: batch axis 0, and position axis 1 when dim 1 is the sequence
  length; other tensors and non-tensor values are passed as they are.

A cached prefix must end where no earlier token attends to a later one (``causal_start``): a model-built 4-D mask
may let a block of tokens attend both ways (Gemma 3's image tokens).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from vismech.engine import hooks
from vismech.errors import UserError
from vismech.models.vlm import VLM, Batch


def _tree(v, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``fn`` applied to every tensor in ``v`` (a tensor, or lists, tuples and dicts of them); others as they are."""
    if torch.is_tensor(v):
        return fn(v)
    if isinstance(v, (list, tuple)):
        return type(v)(_tree(x, fn) for x in v)
    if isinstance(v, dict):
        return {k: _tree(x, fn) for k, x in v.items()}
    return v


def _take(t: torch.Tensor, axis: int, a: int, b: int) -> torch.Tensor:
    return t.narrow(axis, a, b - a)


@dataclass
class LMInputs:
    """What the language model receives for a batch of ``rows`` rows: every argument it was called with."""

    tensors: dict[str, Any]
    rows: int
    packed: dict[str, str] = field(default_factory=dict)
    #: every layer's keys and values [rows, kv heads, length, dim] of the forward the inputs were captured from
    #: (``lm_inputs(keys=True)``), where its cache kept every position; not carried by cuts of the inputs
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = field(default=None, repr=False)

    @property
    def length(self) -> int:
        """The sequence length."""
        x = self.tensors.get("inputs_embeds")
        return (x if x is not None else self.tensors["input_ids"]).shape[1]

    def _axes(self, key: str, t: torch.Tensor) -> tuple[int | None, int | None, int | None]:
        """(batch axis, position axis, key axis) of tensor input ``key``; None where it has none."""
        if key == "position_ids" and t.dim() == 3:
            return 1, 2, None
        if key == "attention_mask":
            if t.dim() == 4:
                return (0 if t.shape[0] == self.rows else None), 2, 3
            return 0, None, t.dim() - 1
        batch = 0 if t.dim() >= 1 and t.shape[0] == self.rows else None
        pos = 1 if batch == 0 and t.dim() >= 2 and t.shape[1] == self.length else None
        return batch, pos, None

    def _map(self, plain: Callable, packed: Callable) -> dict[str, Any]:
        out = {}
        for k, v in self.tensors.items():
            if k in self.packed:
                mask = self.tensors[self.packed[k]]
                out[k] = _tree(v, lambda t, mask=mask: packed(t, mask))
            else:
                out[k] = _tree(v, lambda t, k=k: plain(k, t))
        return out

    def rows_slice(self, a: int, b: int) -> "LMInputs":
        """Rows [a, b) of the batch."""
        def plain(k, t):
            batch = self._axes(k, t)[0]
            return t if batch is None else _take(t, batch, a, b)

        def packed(t, mask):
            n = mask.sum(1).tolist()
            return t[sum(n[:a]):sum(n[:b])]

        return LMInputs(self._map(plain, packed), b - a, self.packed)

    def repeat(self, r: int) -> "LMInputs":
        """``r`` stacked copies of the batch (rows j*B..(j+1)*B-1 are copy j)."""
        def plain(k, t):
            batch = self._axes(k, t)[0]
            if batch is None:
                return t
            reps = [1] * t.dim()
            reps[batch] = r
            return t.repeat(*reps)

        return LMInputs(self._map(plain, lambda t, mask: t.repeat(r, *([1] * (t.dim() - 1)))), self.rows * r,
                        self.packed)

    def causal_start(self, p: int) -> int:
        """The largest position <= ``p`` that no earlier query attends past, so that a cache of positions before it
        stays exact whatever is edited from ``p`` on: ``p`` itself under causal attention; the start of a block of
        tokens that attend to each other both ways and holds ``p`` (a 4-D mask the model built: Gemma 3's image
        blocks). Queries at padding (keys no query sees) do not count."""
        masks = []
        _tree(self.tensors.get("attention_mask"), lambda t: masks.append(t) if t.dim() == 4 else None)
        if p <= 0 or not masks:
            return p
        first = None  # per key: the earliest real query that sees it
        for m in masks:
            allowed = (m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2).any(1)  # [B, Tq, Tk]
            t = min(allowed.shape[1], allowed.shape[2])
            allowed = allowed[:, :t, :t] & allowed[:, :t, :t].any(1)[:, :, None]  # real queries only
            q = torch.arange(t, device=m.device)[None, :, None].expand_as(allowed)
            f = torch.where(allowed, q, t).amin(1).amin(0)  # [Tk]
            first = f if first is None else torch.minimum(first, f)
        # the suffix minimum: from s on, no key is seen by a query before s iff min(first[s:]) >= s
        tail = first.flip(0).cummin(0).values.flip(0).tolist()
        while p > 0 and p < len(tail) and tail[p] < p:
            p = tail[p]
        return p

    def positions(self, a: int, b: int) -> dict[str, Any]:
        """The arguments of a forward of positions [a, b) that follows a cache of positions [0, a)."""
        def plain(k, t):
            _, pos, keys = self._axes(k, t)
            if pos is not None:
                t = _take(t, pos, a, b)
            return t if keys is None else _take(t, keys, 0, b)

        def packed(t, mask):
            col = mask.nonzero()[:, 1].to(t.device)
            return t[(col >= a) & (col < b)]

        return self._map(plain, packed)


# -- capturing, replaying and checking the language model ------------------------------------------------------
def lm_inputs(vlm: VLM, batch: Batch, logits: bool = True, keys: bool = False
              ) -> tuple[LMInputs, torch.Tensor | None]:
    """Run ``batch`` once; return the language model's inputs (all of them: ``hooks.capture_lm_inputs``) and the
    clean last-token logits of that full forward; with ``logits=False``, None, and the forward stops where the
    language model would start (the vision tower and the embeddings run, the text backbone does not). With
    ``keys``, the forward also keeps every layer's keys and values (``LMInputs.kv``), so that a prefix cache is
    cut from it instead of running the text backbone on the prefix again (``prefix_cache``)."""
    kv = None
    with hooks.capture_lm_inputs(vlm, stop=not logits) as got:
        try:
            out, kv = _logits_and_kv(vlm, batch) if keys else (vlm.logits(batch), None)
        except hooks.StopForward:
            out = None
    return LMInputs(dict(got), len(batch), dict(vlm.family.packed_inputs), kv), out


@torch.no_grad()  # a loaded checkpoint's weights require grad: the kept cache would hold the whole forward's graph
def _logits_and_kv(vlm: VLM, batch: Batch) -> tuple[torch.Tensor, list | None]:
    """The full forward's last-token logits and its cache's keys and values: None where the model takes no cache
    argument or its cache did not keep every position of every layer (then ``prefix_cache`` runs the prefix)."""
    from transformers import DynamicCache

    try:
        out = vlm.model(**vlm.to_device(batch.inputs), logits_to_keep=1, use_cache=True,
                        **{cache_kwarg(vlm.model): DynamicCache()})
    except TypeError:  # no cache argument: the plain forward
        return vlm.logits(batch), None
    kv = _cache_kv(out)
    if len(kv) != vlm.n_layers or any(k.shape[2] != batch.length for k, _ in kv):
        kv = None
    return out.logits[:, -1].float(), kv


def _cache_kv(out) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's (keys, values) of the cache a forward with ``use_cache`` returned in ``out``."""
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # older transformers


def replay_tolerance(dtype: torch.dtype, layers: int = 8) -> float:
    """Largest difference allowed between the replayed and the full forward's clean logits, as a fraction of the
    logit scale (max |logit|, at least 1): 8 rounding steps of ``dtype`` (``torch.finfo(dtype).eps``; the step
    ``experiments.cma.resolution`` reports) for a language model of up to 8 ``layers``, growing with the square
    root of the depth beyond that (independent roundings of each layer add up in quadrature), at least 1e-3. A
    replay given every input computes the same function and only rounds differently where the fast engine splits
    the work (a cached prefix, shared-prefix attention in float32): float32 differs by ~1e-6 of the scale, so 1e-3
    leaves a wide margin; bfloat16 (eps 2^-7: bound 0.0625 up to 8 layers) and float16 (eps 2^-10: bound 0.0078)
    differ by 0.0072 and 0.0008 on the shipped 8-layer organism, and bfloat16 by 0.065 of the scale on random
    weights of Qwen2.5-VL-32B's 64 layers (bound 0.177; on one H200, 2026-12-02). A dropped input moves logits by
    far more: Qwen3-VL without its DeepStack features 0.275 on a tiny model (issue 20), Qwen2.5-VL without its
    M-RoPE positions 0.0022 on a tiny model of logit scale 0.47."""
    return max(1e-3, 8 * torch.finfo(dtype).eps * max(1.0, layers / 8) ** 0.5)


def compute_dtype(vlm: VLM) -> torch.dtype:
    """The precision the model computes in: its weights' dtype, or the autocast dtype where autocast is on for its
    device and lower (an fp32 organism trained under bf16 autocast runs its snapshots in bf16)."""
    dev = vlm.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        if torch.finfo(low).eps > torch.finfo(vlm.dtype).eps:
            return low
    return vlm.dtype


def check_replay(vlm: VLM, full: torch.Tensor, replayed: torch.Tensor) -> float:
    """The fast engine's self-check: ``replayed`` (clean last-token logits [B, vocab], or [B, tail, vocab], from the
    language model alone) must match the full forward's ``full`` [B, vocab]; a ``UserError`` naming the family and
    the difference otherwise. Returns the max abs difference."""
    if replayed.dim() == 3:
        replayed = replayed[:, -1]
    full, replayed = full.float().cpu(), replayed.float().cpu()
    diff = float((full - replayed).abs().max())
    dtype = compute_dtype(vlm)
    tol = replay_tolerance(dtype, vlm.n_layers) * max(1.0, float(full.abs().max()))
    if not diff <= tol:
        raise UserError(f"the fast engine's replay of the {vlm.family.name} language model differs from the full "
                        f"forward by {diff:.4g} (tolerance {tol:.3g} at {str(dtype).replace('torch.', '')}): it "
                        "misses an input of this family's language model; use the naive engine (cma: --set "
                        "engine=naive) and report it")
    return diff


@contextlib.contextmanager
def replay_errors(vlm: VLM):
    """A replay that fails outright (an input the engine cuts wrongly: shapes that no longer match) becomes a
    ``UserError`` naming the family; out-of-memory errors pass as they are."""
    try:
        yield
    except RuntimeError as e:
        if is_oom(e):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"the fast engine cannot replay the {vlm.family.name} language model on its captured inputs "
                        f"({first}); an input packed over image tokens needs the family's packed_inputs; use the "
                        "naive engine (cma: --set engine=naive) and report it") from e


@dataclass
class PrefixCache:
    """Keys and values of positions [0, p0) of every layer, computed once for a batch."""

    p0: int
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    def expand(self, r: int):
        """A fresh HF cache holding the prefix for ``r`` stacked copies of the batch."""
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(self.kv):
            cache.update(k.repeat(r, 1, 1, 1), v.repeat(r, 1, 1, 1), i)
        return cache


def cache_kwarg(lm) -> str:
    """The keyword under which ``lm``'s forward takes a cache: ``cache`` where its signature has it, else
    ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


@torch.no_grad()
def prefix_cache(vlm: VLM, inp: LMInputs, p0: int) -> PrefixCache:
    """Keys and values of positions [0, p0): cut from the clean forward's (``inp.kv``, ``lm_inputs(keys=True)``;
    under causal attention a position's keys and values do not depend on later positions), else from a run of the
    text backbone on the prefix (every position kept: a cache the model made itself would keep only a sliding
    window's worth in its local layers, which the replayed masks do not expect)."""
    from transformers import DynamicCache

    if inp.kv is not None:
        return PrefixCache(p0, [(k[:, :, :p0].contiguous(), v[:, :, :p0].contiguous()) for k, v in inp.kv])
    lm = hooks.language_model(vlm)
    out = lm(**inp.positions(0, p0), use_cache=True, **{cache_kwarg(lm): DynamicCache()})
    return PrefixCache(p0, _cache_kv(out))


@torch.no_grad()
def lm_logits(vlm: VLM, inp: LMInputs, prefix: PrefixCache | None = None, tail: int = 1,
              vocab: torch.Tensor | None = None) -> torch.Tensor:
    """Last-token logits [rows, vocab] (float32) from the text backbone alone, optionally after a cached prefix;
    with ``tail`` > 1 the logits of the last ``tail`` positions, [rows, tail, vocab]; with ``vocab`` (token ids)
    only those columns."""
    lm = hooks.language_model(vlm)
    if prefix is None:
        out = lm(**inp.tensors, use_cache=False)
    else:
        suf = inp.positions(prefix.p0, inp.length)
        r = inp.rows // prefix.kv[0][0].shape[0]
        out = lm(**suf, use_cache=True, **{cache_kwarg(lm): prefix.expand(r)})
    return output_logits(vlm, out, tail, vocab)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def output_logits(vlm, out, tail: int = 1, vocab: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (float32) of a language-model output ``out`` (what ``language_model(vlm)`` returns): of its last
    position [rows, vocab], or of its last ``tail`` positions [rows, tail, vocab]. With ``vocab`` (token ids) only
    those columns, [rows, len(vocab)] (the output projection's rows of those ids: a patched run that reads two
    answers' logits skips the rest of a 150,000-word projection and its float32 copy)."""
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    hidden = hidden[:, -1] if tail == 1 else hidden[:, -tail:]
    head = vlm.model.get_output_embeddings()
    if vocab is None:
        return head(hidden).float()
    ids = vocab.to(head.weight.device)
    bias = None if getattr(head, "bias", None) is None else head.bias[ids]
    return torch.nn.functional.linear(hidden.to(head.weight.device), head.weight[ids], bias).float()
