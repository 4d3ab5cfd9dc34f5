"""The patching engine: run the text backbone many times on one batch with different head edits.

Causal mediation patches one head at a time; running a full forward per head (the usual way) repeats the vision
tower and leaves the GPU idle on small batches. Here the vision tower runs once per batch (the language model's
inputs are captured and reused), and several patched heads are stacked as extra rows of one forward: row block j
carries the edit of head j. ``naive_head_patch`` is the plain one-forward-per-head reference the tests compare to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import hooks
from .models.vlm import VLM, Batch


@dataclass
class LMInputs:
    """What the language model receives for a batch: embeddings (image features merged), mask, positions."""

    tensors: dict[str, torch.Tensor]
    rows: int

    def repeat(self, r: int) -> "LMInputs":
        out = {}
        for k, v in self.tensors.items():
            if k == "position_ids" and v.dim() == 3:  # Qwen M-RoPE: [axes, batch, pos]
                out[k] = v.repeat(1, r, 1)
            else:
                out[k] = v.repeat(r, *([1] * (v.dim() - 1)))
        return LMInputs(out, self.rows * r)


def lm_inputs(vlm: VLM, batch: Batch) -> tuple[LMInputs, torch.Tensor]:
    """Run ``batch`` once; return the language model's inputs and the clean last-token logits."""
    with hooks.capture_lm_inputs(vlm) as got:
        logits = vlm.logits(batch)
    return LMInputs(dict(got), len(batch)), logits


@torch.no_grad()
def lm_logits(vlm: VLM, inp: LMInputs) -> torch.Tensor:
    """Last-token logits [rows, vocab] (float32) from the text backbone alone."""
    lm = hooks.language_model(vlm)
    out = lm(**inp.tensors, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return vlm.model.get_output_embeddings()(hidden[:, -1]).float()


def _row_positions(positions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.tensor([i for i, ps in enumerate(positions) for _ in ps], dtype=torch.long)
    pos = torch.tensor([p for ps in positions for p in ps], dtype=torch.long)
    return rows, pos


def default_rows_per_forward(vlm: VLM, batch: Batch, budget_tokens: int = 1 << 15) -> int:
    """How many heads to stack per forward so a forward holds about ``budget_tokens`` tokens."""
    return max(1, budget_tokens // max(1, len(batch) * batch.length))


def head_patch(vlm: VLM, clean: Batch, source_z: dict[int, torch.Tensor], positions: list[list[int]],
               token_ids: torch.Tensor, heads: list[tuple[int, int]] | None = None,
               rows_per_forward: int | None = None, progress: Callable[[int], None] | None = None,
               mode: str = "set", scale: float = 1.0) -> torch.Tensor:
    """Logits of ``token_ids`` [B, K] with each head in turn patched at ``positions``.

    ``source_z[layer]`` holds the values to write, [B, P, heads, dim], aligned with ``positions`` (P positions
    per row, the same count for every row). With ``mode="add"`` the values are added, times ``scale``.
    Returns [n_heads, B, K] float32, heads in the order of ``heads`` (default: every (layer, head)).
    """
    heads = heads if heads is not None else [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)]
    inp, _ = lm_inputs(vlm, clean)
    B = len(clean)
    r = rows_per_forward or default_rows_per_forward(vlm, clean)
    rows, pos = _row_positions(positions)
    per_row = len(positions[0])
    if any(len(p) != per_row for p in positions):
        raise ValueError("every row must patch the same number of positions")
    tid = token_ids.to(vlm.input_device)
    out = torch.empty(len(heads), B, token_ids.shape[1])
    for start in range(0, len(heads), r):
        chunk = heads[start:start + r]
        rep = inp.repeat(len(chunk))
        edits = []
        for j, (layer, head) in enumerate(chunk):
            vals = source_z[layer][:, :, head].reshape(B * per_row, -1) * scale
            edits.append(hooks.Edit("z", layer, rows + j * B, pos, torch.full_like(rows, head), vals, mode))
        with hooks.intervene(vlm, edits):
            logits = lm_logits(vlm, rep)
        g = logits.view(len(chunk), B, -1).gather(2, tid[None].expand(len(chunk), -1, -1))
        out[start:start + len(chunk)] = g.cpu()
        if progress:
            progress(len(chunk))
    return out


def naive_head_patch(vlm: VLM, clean: Batch, source_z: dict[int, torch.Tensor], positions: list[list[int]],
                     token_ids: torch.Tensor, heads: list[tuple[int, int]] | None = None, mode: str = "set",
                     scale: float = 1.0) -> torch.Tensor:
    """Reference for ``head_patch``: one full model forward (vision tower included) per head."""
    heads = heads if heads is not None else [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)]
    rows, pos = _row_positions(positions)
    B, per_row = len(clean), len(positions[0])
    out = torch.empty(len(heads), B, token_ids.shape[1])
    for i, (layer, head) in enumerate(heads):
        vals = source_z[layer][:, :, head].reshape(B * per_row, -1) * scale
        with hooks.intervene(vlm, [hooks.Edit("z", layer, rows, pos, torch.full_like(rows, head), vals, mode)]):
            logits = vlm.logits(clean)
        out[i] = logits.gather(1, token_ids.to(logits.device)).cpu()
    return out


def capture_z(vlm: VLM, batch: Batch, positions: list[list[int]], layers: list[int] | None = None
              ) -> dict[int, torch.Tensor]:
    """Per-head outputs at ``positions`` (P per row) of every layer: {layer: [B, P, heads, dim]}."""
    layers = layers if layers is not None else list(range(vlm.n_layers))
    pos = torch.tensor(positions, dtype=torch.long)
    with hooks.capture(vlm, [("z", l) for l in layers], positions=pos) as got:
        vlm.logits(batch)
    return {l: got[("z", l)] for l in layers}


def check_same_layout(a: Batch, b: Batch) -> None:
    """Patching position by position needs identical token layouts; a clear error otherwise."""
    if a.length != b.length or len(a) != len(b):
        raise ValueError(f"clean and counterfactual batches differ in shape ({len(a)}x{a.length} vs "
                         f"{len(b)}x{b.length}); counterfactual pairs need the same prompt and canvas")
    ia, ib = a.inputs["input_ids"], b.inputs["input_ids"]
    if not torch.equal(ia, ib):
        row = int((ia != ib).any(1).nonzero()[0])
        raise ValueError(f"pair {row}: clean and counterfactual prompts tokenize differently; counterfactual pairs "
                         "need the same prompt text and canvas size")
