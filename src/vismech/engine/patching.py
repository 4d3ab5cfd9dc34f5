"""The patching engine: run the text backbone many times on one batch with different head edits.

Causal mediation patches one head at a time; running a full forward per head (the usual way) repeats the vision
tower, recomputes every position, and leaves the GPU idle on small batches. Here:

- the vision tower runs once per batch: the language model's inputs are captured and reused;
- several patched heads are stacked as extra rows of one forward: row block j carries the edit of head j;
- positions before the first patched position p0 cannot change (causal attention), so their keys and values are
  computed once (a prefix cache) and only positions p0..T-1 are recomputed for each head. For the last-token
  conditions that is a single token per head;
- on CUDA out-of-memory the number of stacked heads is halved and the chunk retried.

``naive_head_patch`` is the plain one-full-forward-per-head reference the tests compare to. Capturing the language
model's inputs, the prefix cache, running the text backbone alone and the self-check live in ``engine.replay``.

What is read out of each patched run: the last-token logits of given token ids (``token_ids`` [B, K]), or the
scores of candidate answers (``models.answers.AnswerSet``): their first-token logits where that rule is exact, else
the teacher-forced log-probability of each answer's whole token sequence (the batch is then run on the answer set's
scoring rows, each prompt row with an answer's tokens appended on the right, so every patched position keeps its
index and the prefix cache holds).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from vismech import distributed
from vismech.engine import cascade, hooks
from vismech.engine.replay import (LMInputs, PrefixCache, check_replay, is_oom, lm_inputs, lm_logits, prefix_cache,
                                   replay_errors)
from vismech.models.answers import AnswerSet
from vismech.models.vlm import VLM, Batch


def _reader(vlm: VLM, clean: Batch, source_z, positions, token_ids):
    """(batch, source values, positions, tail, read, vocab) for patching: ``read(logits, vocab=None)`` -> [B, K]
    per patched run, from logits of the whole vocabulary or of the token ids ``vocab`` alone (sorted; None where
    reading needs every logit: a ``sequence`` answer set's log-probabilities). With an AnswerSet the batch becomes
    its scoring rows (source values and positions follow their rows)."""
    if not isinstance(token_ids, AnswerSet):
        def read(logits, vocab=None):
            ids = token_ids.to(logits.device)
            return logits.gather(1, ids if vocab is None else torch.searchsorted(vocab.to(logits.device), ids))

        return clean, source_z, positions, 1, read, torch.unique(token_ids)
    aset = token_ids
    if aset.rule == "sequence":
        src = aset.row_source
        clean = aset.expand(vlm, clean)
        source_z = {l: v[src] for l, v in source_z.items()}
        positions = [positions[b] for b in src]
    return clean, source_z, positions, aset.tail, lambda logits, vocab=None: aset.reduce(logits, vocab).scores, \
        aset.vocab()


def pad_positions(positions: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Per-row position lists made one width by repeating each row's last position, and the true lengths (a
    repeated position is read or written again with the same value, so padding changes no result)."""
    width = max(len(p) for p in positions)
    return [list(p) + [p[-1]] * (width - len(p)) for p in positions], [len(p) for p in positions]


def _row_positions(positions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.tensor([i for i, ps in enumerate(positions) for _ in ps], dtype=torch.long)
    pos = torch.tensor([p for ps in positions for p in ps], dtype=torch.long)
    return rows, pos


def default_rows_per_forward(vlm: VLM, batch: Batch, recomputed: int, budget_tokens: int = 1 << 15,
                             cache_bytes: float | None = 8e9) -> int:
    """How many heads to stack per forward: about ``budget_tokens`` recomputed tokens, and (for the engine that
    copies the prefix cache per row) a stacked prefix cache of at most ``cache_bytes``; ``cache_bytes=None``: no
    copies (the shared-prefix engine)."""
    by_tokens = budget_tokens // max(1, len(batch) * recomputed)
    if cache_bytes is None:
        return max(1, by_tokens)
    per_row = batch.length * vlm.n_layers * 2 * vlm.n_kv_heads * vlm.head_dim * vlm.dtype.itemsize
    by_cache = int(cache_bytes // max(1, per_row * len(batch)))
    return max(1, min(by_tokens, by_cache))


def rows_from_memory(free_bytes: float, per_head_bytes: float, current: int, headroom: float = 0.8) -> int:
    """Heads per forward that fit ``headroom`` of the free device memory at a measured ``per_head_bytes`` (the
    first chunk's peak over its heads); never fewer than 1, and never less than ``current`` when that ran."""
    if per_head_bytes <= 0:
        return current
    return max(1, current, int(headroom * free_bytes // per_head_bytes))


def free_bytes(device: torch.device) -> float:
    """Memory a forward can still take on a CUDA device: free on the device plus what torch holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def head_patch(vlm: VLM, clean: Batch, source_z: dict[int, torch.Tensor], positions: list[list[int]],
               token_ids: torch.Tensor | AnswerSet, heads: list[tuple[int, int]] | None = None,
               rows_per_forward: int | None = None, progress: Callable[[int], None] | None = None,
               mode: str = "set", scale: float = 1.0, use_cache: bool = True, shared_prefix: bool = True,
               _local: bool = False) -> torch.Tensor:
    """Logits of ``token_ids`` [B, K] with each head in turn patched at ``positions``.

    ``source_z[layer]`` holds the values to write, [B, P, heads, dim], aligned with ``positions`` (P positions
    per row, the same count for every row). With ``mode="add"`` the values are added, times ``scale``.
    ``use_cache=False`` recomputes every position (the "batched rows" engine without the prefix cache);
    ``shared_prefix=False`` gives every stacked row its own copy of the prefix cache and runs every layer (the
    engine before shared-prefix attention; also the fallback where that is not exact, see ``cascade.supported``).
    ``token_ids``: token ids [B, K] whose last-token logits are read, or an ``AnswerSet`` of K answers per row
    whose scores are read (see the module docstring).
    Returns [n_heads, B, K] float32, heads in the order of ``heads`` (default: every (layer, head)).
    """
    heads = heads if heads is not None else [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)]
    per_row = len(positions[0])
    if any(len(p) != per_row for p in positions):
        raise ValueError("every row must patch the same number of positions")
    if distributed.active() and not _local:  # data parallel: every process patches every world()-th head, then all gather
        local = head_patch(vlm, clean, source_z, positions, token_ids, distributed.shard(heads), rows_per_forward,
                           progress, mode, scale, use_cache, shared_prefix, _local=True)
        return distributed.unshard(local, len(heads))
    return _head_patch(vlm, clean, source_z, positions, token_ids, heads, rows_per_forward, progress, mode, scale,
                       use_cache, shared_prefix)


_SETUPS: list[dict] = []  # the open ``reused_setup`` contexts, innermost last


@contextlib.contextmanager
def reused_setup():
    """Inside, ``head_patch`` calls on the same batch, positions and answers share their set-up: the captured
    language-model inputs (one vision forward), the prefix cache, the shared-prefix keys/values and the replay
    self-check are computed by the first call only (CMA's baseline, scores and re-paired null: three calls, one
    set-up). Nothing a call computes depends on the others' edits; the set-ups are dropped on exit."""
    _SETUPS.append({})
    try:
        yield
    finally:
        _SETUPS.pop()


def _rows_forward(vlm: VLM, inp: LMInputs, prefix: PrefixCache | None, shared, starts: list[int], tail: int,
                  vocab: torch.Tensor | None = None):
    """One forward of the stacked rows: by the shared-prefix engine when ``shared`` is set, else by the engine that
    gives every row its own copy of the prefix cache (or none); logits of ``vocab``'s token ids only, if given."""
    if shared is not None:
        return cascade.run(vlm, shared, starts, tail, vocab=vocab)
    return lm_logits(vlm, inp.repeat(len(starts)), prefix, tail, vocab)


def _head_patch(vlm, clean, source_z, positions, token_ids, heads, rows_per_forward, progress, mode, scale,
                use_cache, shared_prefix=True) -> torch.Tensor:
    K = token_ids.k if isinstance(token_ids, AnswerSet) else token_ids.shape[1]
    key = (id(vlm), id(clean), id(token_ids), tuple(map(tuple, positions)), use_cache, shared_prefix)
    given = (clean, token_ids)
    clean, source_z, positions, tail, read, vocab = _reader(vlm, clean, source_z, positions, token_ids)
    per_row = len(positions[0])
    B = len(clean)
    rows, pos = _row_positions(positions)
    setup = _SETUPS[-1].get(key) if _SETUPS else None
    if setup is None:
        inp, full = lm_inputs(vlm, clean, keys=use_cache)
        p0 = inp.causal_start(int(pos.min())) if use_cache else 0
        shared = None
        with replay_errors(vlm):
            prefix = prefix_cache(vlm, inp, p0) if p0 > 0 else None
            if prefix is not None and shared_prefix and cascade.supported(vlm, inp.length, inp, p0):
                shared = cascade.shared_prefix(vlm, inp, prefix)
            # the self-check: this run's engine, unedited, against the full forward
            check_replay(vlm, full, cascade.run(vlm, shared, [0], tail) if shared
                         else lm_logits(vlm, inp, prefix, tail))
        inp.kv = None  # the prefix holds what is needed of it
        setup = (inp, prefix, shared, clean, p0, given)  # the objects of the key are kept alive with it
        if _SETUPS:
            _SETUPS[-1][key] = setup
    inp, prefix, shared, clean, p0 = setup[:5]
    T = inp.length
    # the shared-prefix engine takes heads in layer order: each row joins the batch at its head's layer
    order = sorted(range(len(heads)), key=lambda i: heads[i][0]) if shared else list(range(len(heads)))
    r = rows_per_forward or default_rows_per_forward(vlm, clean, T - p0, cache_bytes=None if shared else 8e9)
    measure = rows_per_forward is None and vlm.device.type == "cuda"
    out = torch.empty(len(heads), len(token_ids.seqs) if isinstance(token_ids, AnswerSet) else B, K)
    start = 0
    while start < len(heads):
        idx = order[start:start + r]
        chunk = [heads[i] for i in idx]
        edits = []
        for j, (layer, head) in enumerate(chunk):
            vals = source_z[layer][:, :, head].reshape(B * per_row, -1) * scale
            edits.append(hooks.Edit("z", layer, rows + j * B, pos - p0, torch.full_like(rows, head), vals, mode))
        if measure:  # the peak counters are not reset (callers read them): an earlier, higher peak only makes the
            before = torch.cuda.memory_allocated(vlm.device)  # measured cost an upper bound (smaller chunks)
        try:
            with hooks.intervene(vlm, edits):
                logits = _rows_forward(vlm, inp, prefix, shared, [layer for layer, _ in chunk], tail, vocab)
        except RuntimeError as e:
            if not is_oom(e) or r == 1:
                raise
            torch.cuda.empty_cache()
            r, measure = max(1, r // 2), False
            continue
        for j, i in enumerate(idx):  # the lm head may sit on another GPU than the inputs (device_map)
            out[i] = read(logits[j * B:(j + 1) * B], vocab).cpu()
        if measure:  # size the next chunks from the first one's measured peak and the memory free now
            per_head = (torch.cuda.max_memory_allocated(vlm.device) - before) / len(chunk)
            r, measure = rows_from_memory(free_bytes(vlm.device), per_head, r), False
        if progress:
            progress(len(chunk))
        start += len(chunk)
    return out


def naive_head_patch(vlm: VLM, clean: Batch, source_z: dict[int, torch.Tensor], positions: list[list[int]],
                     token_ids: torch.Tensor | AnswerSet, heads: list[tuple[int, int]] | None = None,
                     mode: str = "set", scale: float = 1.0) -> torch.Tensor:
    """Reference for ``head_patch``: one full model forward (vision tower included) per head."""
    heads = heads if heads is not None else [(l, h) for l in range(vlm.n_layers) for h in range(vlm.n_heads)]
    K = token_ids.k if isinstance(token_ids, AnswerSet) else token_ids.shape[1]
    n = len(token_ids.seqs) if isinstance(token_ids, AnswerSet) else len(clean)
    clean, source_z, positions, tail, read, _ = _reader(vlm, clean, source_z, positions, token_ids)
    rows, pos = _row_positions(positions)
    B, per_row = len(clean), len(positions[0])
    out = torch.empty(len(heads), n, K)
    for i, (layer, head) in enumerate(heads):
        vals = source_z[layer][:, :, head].reshape(B * per_row, -1) * scale
        with hooks.intervene(vlm, [hooks.Edit("z", layer, rows, pos, torch.full_like(rows, head), vals, mode)]):
            logits = vlm.logits(clean, tail)
        out[i] = read(logits).cpu()
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
