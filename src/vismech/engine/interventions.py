"""Position-ID vectors and the edits built from them (paper §4.2-4.4, App. C): model-running helpers shared by the
intervention experiments (id-intervention, key-intervention, reuse, relabs-patch, binding-errors, counting).

- ``id_vectors``: d_i = E[activation | the relevant object has ID i], the mean of one site's per-head activation
  (``z`` head outputs, ``q`` queries, ``k`` keys before RoPE) over an estimation set, per ID label. Where a row
  has several positions (e.g. the tokens of a mention) the row's activation is their mean.
- ``key_id_vectors``: the same for keys over the image patches of objects: d_i = the mean key over the patches of
  objects with ID i (every object of every trial contributes, labelled by its own ID).
- ``additive_edits``: ``hooks.Edit(..., mode="add")`` lists adding alpha * (d_target - d_original) per row, at that
  row's positions, on chosen heads; ``direction="random"`` gives the control: for every (head, original, target)
  one random Gaussian direction, scaled to the norm of the real difference.
- ``key_swap_edits``: swap two objects' IDs in the keys of their patches: K^{o0} += alpha (d1 - d0) and
  K^{o1} += alpha (d0 - d1) (§4.3).
- ``kv_heads_for``: query heads -> the (layer, kv head) pairs whose keys they read (GQA, ``hooks.kv_head_of``).
- ``EditedRuns``: logits, or answer scores (``models.answers``), of one batch under many edit sets; the vision
  tower runs once, the prefix before the earliest edited position once (``replay.prefix_cache``), and each run
  starts at its first edited layer from the clean residual stream there (``engine.cascade``, where supported).
  With alpha = 0 the logits are bit-equal to no edit.
- ``zero_heads``: zero-ablate head outputs at every position (also during generation).
- ``ablated_heads``: the same ablation as a weight edit (the heads' input columns of the attention output
  projection set to 0, restored afterwards): it removes the heads' output on every path, also in the engines that
  run parts of a forward themselves (``patching``, ``cascade``).

Assumes labels are hashable (cells as tuples); vectors are float32 on the CPU, cast to the model's dtype when an
edit is applied.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Callable, Hashable, Iterator, Sequence

import torch

from vismech.engine import cascade, hooks, patching, replay
from vismech.engine.evaluate import batches
from vismech.errors import UserError
from vismech.models.answers import AnswerSet
from vismech.models.vlm import VLM, Batch
from vismech.scenes.core import Trial


@dataclass
class IDVectors:
    """Mean activations per ID label: ``vectors[label_index, head_index]`` is d_label for ``heads[head_index]``."""

    site: str
    heads: list[tuple[int, int]]  # (layer, head), head indexed as at ``site`` (kv heads for k and v)
    labels: list[Hashable]
    vectors: torch.Tensor  # [n_labels, n_heads, dim] float32
    counts: dict[Hashable, int]

    def d(self, label: Hashable) -> torch.Tensor:
        if label not in self.labels:
            raise UserError(f"no ID vector for {label!r}: the trials the ID vectors were estimated on never had it "
                            f"(only {', '.join(map(repr, self.labels))}); raise n_estimate (--set n_estimate=N) so "
                            f"that every cell occurs")
        return self.vectors[self.labels.index(label)]

    def diff(self, target: Hashable, original: Hashable) -> torch.Tensor:
        """d_target - d_original, [n_heads, dim]."""
        return self.d(target) - self.d(original)

    def subset(self, heads: Sequence[tuple[int, int]]) -> "IDVectors":
        idx = [self.heads.index(tuple(h)) for h in heads]
        return replace(self, heads=[self.heads[i] for i in idx], vectors=self.vectors[:, idx])


def _mean_activations(vlm: VLM, trials: list[Trial], site: str, heads: list[tuple[int, int]],
                      items: Callable[[Batch, range], list[tuple[int, Hashable, list[int]]]],
                      batch_size: int) -> IDVectors:
    """Average ``site`` activations of ``heads`` over the (row, label, positions) items ``items(batch, idx)`` gives
    for every batch (``idx``: the batch's trial indices), per label."""
    if not trials:
        raise ValueError("no trials to estimate ID vectors from")
    heads = [tuple(h) for h in heads]
    layers = sorted({l for l, _ in heads})
    sums: dict[Hashable, torch.Tensor] = {}
    counts: dict[Hashable, int] = defaultdict(int)
    for idx in batches(trials, batch_size):
        batch = vlm.encode([trials[i] for i in idx])
        its = items(batch, idx)
        row_pos: list[list[int]] = [[] for _ in range(len(batch))]
        spans = []  # per item: (row, start, length) inside its row's captured positions
        for r, _, p in its:
            spans.append((r, len(row_pos[r]), len(p)))
            row_pos[r] += list(p)
        pos = torch.tensor(patching.pad_positions([p or [batch.last] for p in row_pos])[0])
        with hooks.capture(vlm, [(site, l) for l in layers], positions=pos) as got:
            vlm.logits(batch)
        acts = {l: got[(site, l)].float().cpu() for l in layers}  # [B, width, heads, dim]
        for (r, start, n), (_, label, _) in zip(spans, its):
            x = torch.stack([acts[l][r, start:start + n, h].mean(0) for l, h in heads])
            sums[label] = sums[label] + x if label in sums else x.clone()
            counts[label] += 1
    labels = sorted(sums, key=repr)
    return IDVectors(site, heads, labels, torch.stack([sums[lb] / counts[lb] for lb in labels]), dict(counts))


def id_vectors(vlm: VLM, trials: list[Trial], labels: Sequence[Hashable], site: str,
               layers_heads: Sequence[tuple[int, int]], positions_fn: Callable[[Batch], list[list[int]]],
               batch_size: int = 16) -> IDVectors:
    """d_i per ID label: the mean ``site`` activation of ``layers_heads`` at ``positions_fn(batch)`` (mean over a
    row's positions), over the trials labelled i. ``labels`` has one label per trial."""
    if len(labels) != len(trials):
        raise ValueError(f"{len(labels)} labels for {len(trials)} trials: give one ID label per trial")
    labels = [tuple(x) if isinstance(x, list) else x for x in labels]

    def items(batch, idx):
        pos = positions_fn(batch)
        return [(r, labels[i], list(pos[r])) for r, i in enumerate(idx)]

    return _mean_activations(vlm, list(trials), site, list(layers_heads), items, batch_size)


def key_id_vectors(vlm: VLM, trials: list[Trial], layers_kv: Sequence[tuple[int, int]],
                   batch_size: int = 16) -> IDVectors:
    """d_i for keys (site ``k``, before RoPE): the mean key over the image patches of every object at cell i."""
    def items(batch, idx):
        return [(r, tuple(cell), list(batch.objects[r][cell])) for r in range(len(batch))
                for cell in sorted(batch.objects[r])]

    return _mean_activations(vlm, list(trials), "k", list(layers_kv), items, batch_size)


def kv_heads_for(vlm: VLM, heads: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The distinct (layer, kv head) pairs read by the query heads ``heads``, in order of first use."""
    out: list[tuple[int, int]] = []
    for l, h in heads:
        kv = (int(l), hooks.kv_head_of(vlm, int(h)))
        if kv not in out:
            out.append(kv)
    return out


def _random_like(delta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    r = torch.randn(delta.shape, generator=gen)
    return r / r.norm(dim=-1, keepdim=True) * delta.norm(dim=-1, keepdim=True)


def _edits_from(site: str, vecs: IDVectors, entries: list[tuple[int, list[int], torch.Tensor]]) -> list[hooks.Edit]:
    """Edits adding ``delta[j]`` (one row per head of ``vecs``) at (row, positions) for every entry: per layer, the
    entries in order, each as its heads (in ``vecs.heads`` order) x its positions, built as tensors."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for j, (l, _) in enumerate(vecs.heads):
        by_layer[int(l)].append(j)
    edits = []
    for l, js in sorted(by_layer.items()):
        sel = torch.tensor(js)
        hs = torch.tensor([int(vecs.heads[j][1]) for j in js])
        rows, pos, heads, vals = [], [], [], []
        for row, positions, delta in entries:
            P = len(positions)
            rows.append(torch.full((len(js) * P,), int(row)))
            pos.append(torch.tensor(positions, dtype=torch.long).repeat(len(js)))
            heads.append(hs.repeat_interleave(P))
            vals.append(delta[sel].repeat_interleave(P, 0))
        if sum(len(r) for r in rows):
            edits.append(hooks.Edit(site, l, torch.cat(rows), torch.cat(pos), torch.cat(heads), torch.cat(vals),
                                    mode="add"))
    return edits


def additive_edits(vecs: IDVectors, original: Sequence[Hashable], target: Sequence[Hashable],
                   positions: list[list[int]], alpha: float, heads: Sequence[tuple[int, int]] | None = None,
                   direction: str = "id", seed: int = 0, rows: Sequence[int] | None = None) -> list[hooks.Edit]:
    """Edits adding alpha * (d_target[i] - d_original[i]) at ``positions[i]`` of batch row ``rows[i]`` (default:
    row i) on ``heads`` (default: all heads of ``vecs``), at ``vecs.site``. ``direction="random"``: the control,
    random directions of equal norm (one direction per head and (original, target) pair)."""
    if direction not in ("id", "random"):
        raise ValueError(f"direction must be 'id' or 'random', not {direction!r}")
    if not len(original) == len(target) == len(positions):
        raise ValueError("original, target and positions need one entry per row")
    vecs = vecs.subset(heads) if heads is not None else vecs
    gen = torch.Generator().manual_seed(seed)
    cache: dict[tuple, torch.Tensor] = {}
    entries = []
    for i, (o, t) in enumerate(zip(original, target)):
        key = (tuple(o) if isinstance(o, list) else o, tuple(t) if isinstance(t, list) else t)
        if key not in cache:
            delta = vecs.diff(key[1], key[0])
            cache[key] = _random_like(delta, gen) if direction == "random" else delta
        entries.append((i if rows is None else int(rows[i]), sorted(set(positions[i])), alpha * cache[key]))
    return _edits_from(vecs.site, vecs, entries)


def key_swap_edits(vecs: IDVectors, batch: Batch, objects: Sequence[tuple[tuple, tuple]], alpha: float,
                   direction: str = "id", seed: int = 0) -> list[hooks.Edit]:
    """Swap the IDs of two objects per row in the keys of their image patches (before RoPE):
    K^{o0} += alpha (d_{id1} - d_{id0}) and K^{o1} += alpha (d_{id0} - d_{id1}). ``objects[i]`` = (cell0, cell1),
    the cells of row i's two objects, which are also their ID labels. ``vecs`` from ``key_id_vectors``."""
    if vecs.site != "k":
        raise ValueError(f"key edits need key ID vectors (site 'k'), got site {vecs.site!r}")
    original, target, positions, rows = [], [], [], []
    for i, (c0, c1) in enumerate(objects):
        c0, c1 = tuple(c0), tuple(c1)
        for a, b in ((c0, c1), (c1, c0)):
            if a not in batch.objects[i]:
                raise ValueError(f"row {i} has no object at cell {a}")
            original.append(a)
            target.append(b)
            positions.append(batch.objects[i][a])
            rows.append(i)
    return additive_edits(vecs, original, target, positions, alpha, direction=direction, seed=seed, rows=rows)


class EditedRuns:
    """Last-token logits, or answer scores, of one batch under many edit sets, running the vision tower once.

    ``first_position``: the earliest position any edit will touch; positions before it are computed once and
    cached (None: no cache). Edits are given with absolute positions and batch rows. ``answers`` (an
    ``AnswerSet`` of the batch): what ``scores`` reads; under its ``sequence`` rule the runs are of its scoring
    rows, and every edit of a batch row is applied to each of that row's scoring rows.
    """

    def __init__(self, vlm: VLM, batch: Batch, first_position: int | None = None, answers: AnswerSet | None = None):
        self.vlm, self.batch, self.answers = vlm, batch, answers
        self._source = answers.row_source if answers is not None and answers.rule == "sequence" else None
        run = answers.expand(vlm, batch) if self._source is not None else batch
        self._run = run
        self.inp, full = replay.lm_inputs(vlm, run, keys=bool(first_position))
        self.p0 = self.inp.causal_start(int(first_position)) if first_position else 0
        with replay.replay_errors(vlm):
            self.prefix = replay.prefix_cache(vlm, self.inp, self.p0) if self.p0 > 0 else None
            self.inp.kv = None  # the prefix holds what is needed of it
            # shared-prefix attention: a run starts at its first edited layer from the clean suffix there
            self.shared = (cascade.shared_prefix(vlm, self.inp, self.prefix)
                           if self.prefix is not None and cascade.supported(vlm, self.inp.length, self.inp, self.p0)
                           else None)
            replay.check_replay(vlm, full, self._forward_many([[]], 1, 1)[0])  # the self-check, as in patching

    def _prepared(self, edits) -> list[hooks.Edit]:
        """``edits`` with positions relative to the cached prefix's end, on the rows that are run."""
        shifted = []
        for e in edits:
            pos = torch.as_tensor(e.positions) - self.p0
            if (pos < 0).any():
                raise ValueError(f"an edit touches position {int(pos.min()) + self.p0}, before the cached prefix "
                                 f"ends at {self.p0}; pass a smaller first_position")
            shifted.append(replace(e, positions=pos))
        if self._source is not None:
            shifted = [_to_rows(e, self._source) for e in shifted]
        return shifted

    def _forward_many(self, edit_sets, tail: int, blocks: int | None = None) -> list[torch.Tensor]:
        """The run under each edit set, stacked: edit set j's rows form block j of one forward (``blocks`` sets a
        forward; default: from the recomputed tokens, halved on out-of-memory). With shared-prefix attention each
        block joins at its first edited layer, so blocks are run in that order."""
        sets = [self._prepared(es) for es in edit_sets]
        n = len(self._run)
        starts = [min((e.layer for e in es), default=0) for es in sets]
        order = sorted(range(len(sets)), key=starts.__getitem__) if self.shared is not None else list(range(len(sets)))
        r = blocks or patching.default_rows_per_forward(self.vlm, self._run, self.inp.length - self.p0,
                                                        cache_bytes=None if self.shared is not None else 8e9)
        out: list[torch.Tensor | None] = [None] * len(sets)
        i = 0
        while i < len(order):
            idx = order[i:i + r]
            stacked = [replace(e, rows=torch.as_tensor(e.rows) + j * n) for j, g in enumerate(idx) for e in sets[g]]
            try:
                with hooks.intervene(self.vlm, stacked):
                    if self.shared is not None:
                        logits = cascade.run(self.vlm, self.shared, [starts[g] for g in idx], tail)
                    else:
                        logits = replay.lm_logits(self.vlm, self.inp.repeat(len(idx)), self.prefix, tail)
            except RuntimeError as e:
                if not replay.is_oom(e) or r == 1:
                    raise
                torch.cuda.empty_cache()
                r = max(1, r // 2)
                continue
            logits = logits.cpu()
            for j, g in enumerate(idx):
                out[g] = logits[j * n:(j + 1) * n]
            i += len(idx)
        return out

    def logits(self, edits: list[hooks.Edit] = ()) -> torch.Tensor:
        """[B, vocab] float32 on the CPU (the batch's own rows; not with a ``sequence`` answer set)."""
        return self.logits_many([list(edits)])[0]

    def scores(self, edits: list[hooks.Edit] = ()):
        """``AnswerScores`` (scores and greedy hits [B, K]) of the answer set under ``edits``."""
        return self.scores_many([list(edits)])[0]

    def logits_many(self, edit_sets, blocks: int | None = None) -> list[torch.Tensor]:
        """``logits(edits)`` for every edit set in ``edit_sets``, from stacked forwards (``blocks`` sets a forward)."""
        if self._source is not None:
            raise ValueError("these runs are of the answers' scoring rows; read them with scores_many()")
        return self._forward_many(edit_sets, 1, blocks)

    def scores_many(self, edit_sets, blocks: int | None = None) -> list:
        """``scores(edits)`` for every edit set in ``edit_sets``, from stacked forwards (``blocks`` sets a forward):
        the many settings of an intervention experiment (head sets, alphas, directions) in few forwards."""
        if self.answers is None:
            raise ValueError("pass answers= to EditedRuns to read answer scores")
        return [self.answers.reduce(x) for x in self._forward_many(edit_sets, self.answers.tail, blocks)]


def _to_rows(edit: hooks.Edit, source: list[int]) -> hooks.Edit:
    """``edit`` (batch rows) applied to every scoring row whose batch row it edits."""
    rows = torch.as_tensor(edit.rows).reshape(-1)
    n = len(rows)

    def full(t):  # broadcast an edit field to one entry per edited (row, position, head)
        t = torch.as_tensor(t)
        return t.reshape(1, *t.shape[1:]).expand(n, *t.shape[1:]) if t.dim() == 0 or t.shape[0] == 1 else t

    take, new = [], []
    for r, b in enumerate(source):
        hit = (rows == b).nonzero().flatten().tolist()
        take += hit
        new += [r] * len(hit)
    idx = torch.tensor(take, dtype=torch.long)
    values = edit.values if edit.values.dim() > 1 else edit.values[None]
    return replace(edit, rows=torch.tensor(new, dtype=torch.long), positions=full(edit.positions)[idx],
                   heads=full(edit.heads)[idx], values=full(values)[idx])


@contextlib.contextmanager
def zero_heads_per_block(vlm: VLM, head_sets: Sequence[Sequence[tuple[int, int]]], block: int) -> Iterator[None]:
    """Zero, in rows ``g*block .. (g+1)*block - 1``, the outputs (site ``z``) of ``head_sets[g]``, at every position
    of every forward inside the context (generated tokens included): many ablation settings as row blocks of one
    batch. Each row is multiplied by 0 or 1 per head, which leaves kept heads exactly unchanged."""
    keep: dict[int, torch.Tensor] = {}
    for g, heads in enumerate(head_sets):
        for l, h in heads:
            keep.setdefault(int(l), torch.ones(len(head_sets) * block, vlm.n_heads))[g * block:(g + 1) * block, h] = 0
    with contextlib.ExitStack() as stack:
        for l, k in keep.items():
            stack.enter_context(hooks.hooked(vlm, "z", l, lambda x, k=hooks.on_device(k): x * k(x)[:, None, :, None]))
        yield


@contextlib.contextmanager
def zero_heads(vlm: VLM, heads: Sequence[tuple[int, int]]) -> Iterator[None]:
    """Zero the outputs (site ``z``) of ``heads`` at every position of every forward inside the context."""
    by_layer: dict[int, list[int]] = defaultdict(list)
    for l, h in heads:
        by_layer[int(l)].append(int(h))
    with contextlib.ExitStack() as stack:
        for l, hs in by_layer.items():
            idx = hooks.on_device(torch.tensor(sorted(set(hs))), cast=False)

            def fn(x, idx=idx):
                x = x.clone()
                x[..., idx(x), :] = 0
                return x

            stack.enter_context(hooks.hooked(vlm, "z", l, fn))
        yield


@contextlib.contextmanager
def ablated_heads(vlm: VLM, heads: Sequence[tuple[int, int]]) -> Iterator[None]:
    """Zero-ablate ``heads`` for everything run inside the context by zeroing their input columns of the attention
    output projection (the weights that read site ``z``): each head's output then adds exactly nothing to the
    residual stream, as with ``zero_heads``, on every path through the model. The weights are restored bit for bit
    when the context exits, also on an exception."""
    saved = []
    try:
        with torch.no_grad():
            for l, h in sorted({(int(l), int(h)) for l, h in heads}):
                if not 0 <= h < vlm.n_heads:
                    raise ValueError(f"head {h} is out of range: {vlm.name} has heads 0..{vlm.n_heads - 1}")
                mod, where = hooks.site_module(vlm, "z", l)
                w = getattr(mod, "weight", None)
                if where.kind != "input" or where.layout != "flat" or not isinstance(w, torch.Tensor) \
                        or w.dim() != 2 or w.shape[1] != vlm.n_heads * vlm.head_dim:
                    raise ValueError(f"cannot ablate head ({l}, {h}) of {vlm.name} by its weights: site z is not "
                                     "the flat input of a linear projection")
                cols = slice(h * vlm.head_dim, (h + 1) * vlm.head_dim)
                saved.append((w, cols, w[:, cols].clone()))
                w[:, cols] = 0
        yield
    finally:
        with torch.no_grad():
            for w, cols, old in reversed(saved):
                w[:, cols] = old
