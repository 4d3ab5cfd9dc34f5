"""The language model's inputs for one batch, as captured (``hooks.capture_lm_inputs``), and how the fast engine
cuts them: rows of the batch, stacked copies of the batch, and positions (a suffix after a cached prefix).

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

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


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
    #: (``patching.lm_inputs(keys=True)``), where its cache kept every position; not carried by cuts of the inputs
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
