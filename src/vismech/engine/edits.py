"""Last-token head edits: run trials once while setting or adding values to chosen heads' outputs (site ``z``)
at the prompt's last token, and read back the answer scores, greedy texts and the heads' unedited outputs.

The reuse (Fig. 5), relative/absolute patching (Fig. 29), binding-error (Table 1) and COCO (App. B) experiments
are built on ``run_heads``; ``head_edits`` gives the same edits as ``hooks.Edit`` objects for other positions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from vismech.engine import decode, hooks, replay
from vismech.engine.evaluate import batches
from vismech.scenes.core import Trial
from vismech.store.units import unit_type

Head = tuple[int, int]


@unit_type
@dataclass
class HeadRun:
    """One pass over trials: arg-max token [n] (first position), candidate scores [n, C] and greedy hits [n, C]
    (``models.answers``), captured head outputs [n, K, d] (float32, before any edit; None unless asked) and
    generated texts (None unless asked)."""

    top: np.ndarray
    cand_hit: np.ndarray
    cand_logits: np.ndarray
    z: np.ndarray | None
    texts: list[str] | None


def _by_layer(heads: list[Head]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for j, (l, _) in enumerate(heads):
        out.setdefault(l, []).append(j)
    return out


def head_edits(heads: list[Head], values: torch.Tensor, mode: str, position: int) -> list[hooks.Edit]:
    """One ``z`` edit per layer setting or adding ``values`` [B, K, d] to ``heads`` at ``position`` of every row."""
    B = values.shape[0]
    edits = []
    for layer, js in _by_layer(heads).items():
        rows = torch.arange(B).repeat_interleave(len(js))
        hs = torch.tensor([heads[j][1] for j in js]).repeat(B)
        vals = values[:, js].reshape(B * len(js), -1)
        edits.append(hooks.Edit("z", layer, rows, torch.full_like(rows, position), hs, vals, mode))
    return edits


@contextlib.contextmanager
def edit_last(vlm, heads: list[Head], values: torch.Tensor, mode: str, length: int, position: int | None = None):
    """Set or add ``values`` [B, K, d] to the heads at ``position`` (default ``length - 1``) of every forward of
    ``length`` tokens (the prompt's forward; generation steps with a cache see one new token and are left alone)."""
    position = length - 1 if position is None else position
    with contextlib.ExitStack() as stack:
        for edit in head_edits(heads, values, mode, position):
            stack.enter_context(hooks.hooked(vlm, "z", edit.layer,
                                             lambda x, e=edit: e.apply(x) if x.shape[1] == length else None))
        yield


def run_heads(vlm, trials: list[Trial], heads: list[Head], values=None, mode: str = "set",
              candidates: list[list[str]] | None = None, capture: bool = False, gen_tokens: int = 0,
              batch_size: int = 16, progress=None) -> HeadRun:
    """Run ``trials`` once, optionally editing ``heads`` at the last token with ``values`` [n, K, d] (``mode``
    "set" replaces, "add" adds), and return the arg-max token, the scores and greedy hits of each trial's
    ``candidates`` (answer strings, scored as ``models.answers`` says), the heads' outputs before the edit
    (``capture``) and greedy texts."""
    if capture and values is not None:
        raise ValueError("capture reads unedited outputs; run without values to capture")
    n, K = len(trials), len(heads)
    C = len(candidates[0]) if candidates else 0
    top = np.empty(n, np.int64)
    cand_hit, cand_logits = np.zeros((n, C), bool), np.empty((n, C), np.float32)
    z = np.empty((n, K, vlm.head_dim), np.float32) if capture else None
    texts: list[str] | None = [""] * n if gen_tokens else None
    layers = sorted({l for l, _ in heads})
    for idx in batches(trials, batch_size):
        b = vlm.encode([trials[i] for i in idx])
        v = None if values is None else torch.as_tensor(np.asarray(values)[idx], dtype=torch.float32)

        def edited(v=v, length=b.length, position=b.last):
            return edit_last(vlm, heads, v, mode, length, position) if v is not None else contextlib.nullcontext()

        if gen_tokens and not capture and decode.replays(vlm, b):  # one prompt forward: scores and generation
            inp = replay.lm_inputs(vlm, b, logits=False)[0]
            with edited():
                logits, ids = decode.greedy(vlm, inp, b.inputs["attention_mask"], gen_tokens)
            for i, t in zip(idx, vlm.decode(ids)):
                texts[i] = t
        else:
            with edited(), (hooks.capture(vlm, [("z", l) for l in layers],
                                          positions=torch.full((len(idx), 1), b.last))
                            if capture else contextlib.nullcontext({})) as got:
                logits = vlm.logits(b)
            if gen_tokens:
                with edited():
                    for i, t in zip(idx, vlm.generate(b, gen_tokens)):
                        texts[i] = t
        top[idx] = logits.argmax(-1).cpu().numpy()
        if C:
            aset = vlm.answers(b, [candidates[i] for i in idx])
            if aset.rule == "first_token":
                got_scores = aset.reduce(logits)
            else:  # the scoring rows: prompt + answer tokens, the edit still at the prompt's last token
                x = aset.expand(vlm, b)
                vx = None if v is None else v[aset.row_source]
                with edited(vx, x.inputs["input_ids"].shape[1]):
                    got_scores = aset.reduce(vlm.logits(x, aset.tail))
            cand_logits[idx] = got_scores.scores.numpy()
            cand_hit[idx] = got_scores.greedy.numpy()
        if capture:
            for j, (l, h) in enumerate(heads):
                z[idx, j] = got[("z", l)][:, 0, h].float().cpu().numpy()
        if progress:
            progress(len(idx))
    return HeadRun(top, cand_hit, cand_logits, z, texts)
