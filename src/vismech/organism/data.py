"""Training data for the model organisms: the paper's four tasks, drawn on the fly from vismech's own scene code.

Every training trial comes from ``vismech.scenes.sets`` (one call with ``n=1`` and its own seed), so the organisms
see exactly the prompts, scenes and renderings the analyses use; there is no second generator. A trial becomes
model inputs through the same adapter as in every analysis: ``VLM.encode`` (chat prompt format) renders it on the
organism's token grid and frames it; the answer is then appended for teacher forcing, tokenized exactly as
``VLM.answer_ids`` continues the text (a space before it unless the text ends in whitespace), followed by the
architecture's end token (``config.END_TOKEN``). Labels are -100 everywhere except on the answer tokens and the end
token; the whole prompt+answer row is left-padded, as ``encode`` pads prompts. Option ``label_mentions`` (off by
default) also labels the described objects' words of scene-description prompts, for denser supervision.

The mixture (``MIXTURE``; the weights are this package's choice, the paper trains nothing), by weight:

- scene description, paper form ("In this image there is a ..., a ... and a"), 0.50 in all: 2x2 grid with 2-4
  objects (1-3 described) high/low/any entropy .10/.05/.03; 3x3 with 2-9 objects (1-8 described) .15/.08/.04;
  the 3-row, 2-column grid with 2-6 objects, high entropy .05;
- colour retrieval, 0.30: 2x2 with 1-4 objects .15, 3x3 with 1-9 objects .15, all colours and shapes distinct
  (the 1-object trials, about 1 in 6, give the untrained vision pathway an easy first signal). It has the most
  weight because it is the task scene description does not teach: the first word of a description can be found
  by elimination among the colours present, without binding a colour to a shape;
- spatial relation, 0.10: 3x3 .07, 2x2 .03, every cell filled, colours distinct;
- counting, 0.10: 3x3, 3-8 objects; the answer is the number only (no enumeration).

Off by default (weight 0; switched on with ``--weight``, for the natural-emergence recipes): ``reading_order``
descriptions (``ro_2x2``, ``ro_3x3``, ``ro_3x3_low``), the paper's form with one or more objects left and the
described objects in random order, answered by the first object in reading order not yet described
(``causal_model.select``: the rule planting uses). With several objects left, the answer depends on where the
objects are, so a model cannot answer by subtracting the prompt's features from the image's.

"high" = every colour and every shape distinct, "low" = conjunctions of m colours x m shapes (objects share
features), "any" = unique conjunctions with no constraint (``sets.scene_description_set``'s ``entropy``). Objects sit
on random cells, so the 3x3 components include the paper's PCA layout (6 objects in the outer columns of a 3x3 grid)
and relative/absolute 2x2 sub-arrangements. Colour retrieval and scene description use all 11 colours and 9 shapes
(every analysis set's vocabulary).

Determinism: the trials of training step ``s`` depend only on (seed, s) (``step_trials``), never on which process
draws them or on earlier steps, so a resumed run sees the same data as a straight one. The held-out sets
(``heldout_sets``) are fixed draws with seeds offset by ``HELDOUT_SEED``; the trial space is small (e.g. 576
distinct 2x2 high-entropy trials), so "held out" means an independent draw, not scenes never seen in training.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass

import torch

from vismech.errors import UserError
from vismech.models.vlm import VLM
from vismech.organism import transfer
from vismech.organism.transfer import pack_pixels, to_device
from vismech.scenes import sets
from vismech.scenes.core import Trial

HELDOUT_SEED = 1_000_003


@dataclass(frozen=True)
class Component:
    """One kind of training trial: a task on a grid, an entropy condition and a range of object counts."""

    name: str
    task: str
    grid: tuple[int, int]
    weight: float
    entropy: str | None = None
    objects: tuple[int, int] | None = None  # (min, max) objects; None = the set's own rule


MIXTURE: tuple[Component, ...] = (
    Component("sd_2x2_high", "scene_description", (2, 2), 0.10, "high", (2, 4)),
    Component("sd_2x2_low", "scene_description", (2, 2), 0.05, "low", (2, 4)),
    Component("sd_2x2_any", "scene_description", (2, 2), 0.03, None, (2, 4)),
    Component("sd_3x3_high", "scene_description", (3, 3), 0.15, "high", (2, 9)),
    Component("sd_3x3_low", "scene_description", (3, 3), 0.08, "low", (2, 9)),
    Component("sd_3x3_any", "scene_description", (3, 3), 0.04, None, (2, 9)),
    Component("sd_3x2_high", "scene_description", (3, 2), 0.05, "high", (2, 6)),
    Component("color_2x2", "color_retrieval", (2, 2), 0.15, None, (1, 4)),
    Component("color_3x3", "color_retrieval", (3, 3), 0.15, None, (1, 9)),
    Component("relation_3x3", "spatial_relation", (3, 3), 0.07),
    Component("relation_2x2", "spatial_relation", (2, 2), 0.03),
    Component("counting_3x3", "counting", (3, 3), 0.10, None, (3, 8)),
    Component("ro_2x2", "reading_order", (2, 2), 0.0, None, (2, 4)),
    Component("ro_3x3", "reading_order", (3, 3), 0.0, None, (2, 9)),
    Component("ro_3x3_low", "reading_order", (3, 3), 0.0, "low", (2, 9)),
)


def reweighted(weights: dict[str, float], mixture: tuple[Component, ...] = MIXTURE) -> tuple[Component, ...]:
    """``mixture`` with the named components' weights replaced (``{"color_2x2": 0.3}``); 0 drops a component.
    Weights need not sum to 1 (components are drawn in proportion)."""
    from dataclasses import replace

    names = [c.name for c in mixture]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise UserError(f"unknown mixture component(s) {', '.join(unknown)}; components are {', '.join(names)}")
    if any(w < 0 for w in weights.values()):
        raise UserError("mixture weights must be >= 0")
    out = tuple(replace(c, weight=float(weights.get(c.name, c.weight))) for c in mixture)
    out = tuple(c for c in out if c.weight > 0)
    if not out:
        raise UserError("every mixture component has weight 0")
    return out


ALL_COLORS = tuple(sets.COLORS)
ALL_SHAPES = tuple(sets.SHAPES)


def draw(c: Component, seed: int) -> Trial:
    """One trial of component ``c``, a pure function of ``seed``."""
    rng = random.Random(seed)
    n = rng.randint(*c.objects) if c.objects else None
    s = rng.getrandbits(62)
    if c.task == "scene_description":
        t = sets.scene_description_set(1, c.grid, n_objects=n, seed=s, entropy=c.entropy)[0]
    elif c.task == "color_retrieval":
        t = sets.color_retrieval_set(1, c.grid, seed=s, n_objects=n, colors=ALL_COLORS, shapes=ALL_SHAPES)[0]
    elif c.task == "spatial_relation":
        t = sets.spatial_relation_set(1, seed=s, grid=c.grid)[0]
    elif c.task == "counting":
        t = sets.counting_set(1, seed=s, grid=c.grid, min_objects=c.objects[0], max_objects=c.objects[1])[0]
    elif c.task == "reading_order":
        t = reading_order_trial(random.Random(s), c.grid, n, c.entropy or "any")
    else:
        raise ValueError(f"unknown task {c.task!r} in mixture component {c.name!r}")
    t.meta["component"] = c.name
    return t


def reading_order_trial(rng: random.Random, grid: tuple[int, int], n_objects: int, entropy: str = "any") -> Trial:
    """A scene description of ``n_objects`` with 1 to ``n_objects - 1`` of them described in random order, whose
    answer is the first undescribed object in reading order (``causal_model``'s ``describe`` kind)."""
    from .causal_model import Structure, planting_trial

    return planting_trial(rng, Structure("describe", tuple(grid), n_objects, rng.randint(1, n_objects - 1)), entropy)


def step_trials(seed: int, step: int, n: int, mixture: tuple[Component, ...] = MIXTURE) -> list[Trial]:
    """The ``n`` training trials of ``step`` of the run with ``seed``: components drawn by weight."""
    rng = random.Random(seed * 1_000_000_007 + step)
    comps = rng.choices(mixture, weights=[c.weight for c in mixture], k=n)
    return [draw(c, rng.getrandbits(62)) for c in comps]


def answer_tokens(vlm: VLM, text: str, answer: str, end_token: str,
                  prefix: list[int] | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids + end id): ``answer`` continuing ``text`` as ``VLM.answer_ids`` tokenizes it (a
    space first unless ``text`` ends in whitespace), then ``end_token``. ``prefix``: ``text``'s ids if known."""
    from vismech.models.answers import continuation

    tok = vlm.tokenizer
    prefix = tok(text)["input_ids"] if prefix is None else list(prefix)
    answer_ids = continuation(tok, text, answer, prefix)
    end = tok.convert_tokens_to_ids(end_token)
    if end is None or end == tok.unk_token_id:
        raise ValueError(f"the tokenizer has no end token {end_token!r}")
    return prefix, answer_ids + [end]


def teacher_forcing(vlm: VLM, trials: list[Trial], end_token: str, images=None,
                    label_mentions: bool = False) -> dict[str, torch.Tensor]:
    """Model inputs of prompt+answer rows, left-padded, with ``labels`` (-100 except answer and end tokens).

    Images, pixel tensors and prompt tokens come from ``vlm.encode(trials)``; only the text rows are rebuilt.
    ``label_mentions`` (off by default) also labels the described objects' words in scene-description prompts, so
    every "a" of "there is a X, a Y and a" is trained to name an object not yet mentioned (denser supervision)."""
    b = vlm.encode(trials, images)
    rows = []
    for i, (t, text) in enumerate(zip(trials, b.texts)):
        prompt = b.inputs["input_ids"][i, b.inputs["attention_mask"][i].bool()].tolist()
        rows.append(answer_tokens(vlm, text, t.answer, end_token, prefix=prompt))
    length = max(len(p) + len(a) for p, a in rows)
    pad = vlm.tokenizer.pad_token_id or 0
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, a) in enumerate(rows):
        off = length - len(p) - len(a)
        ids[i, off:] = torch.tensor(p + a)
        mask[i, off:] = 1
        labels[i, length - len(a):] = torch.tensor(a)
        if label_mentions and trials[i].task == "scene_description":
            shift = off - (b.length - len(p))
            pos = torch.tensor([x + shift for m in b.mentions[i] for x in m], dtype=torch.long)
            labels[i, pos] = ids[i, pos]
    out = dict(b.inputs)
    out.update(input_ids=ids, attention_mask=mask, labels=labels,
               **vlm.family.extra_inputs(ids, vlm.image_token_id))
    return out


# -- held-out sets --------------------------------------------------------------------------------------------------
def _subsample(trials: list[Trial], n: int, seed: int) -> list[Trial]:
    if len(trials) <= n:
        return trials
    keep = sorted(random.Random(seed).sample(range(len(trials)), n))
    return [trials[i] for i in keep]


def _entropy(grid, condition, n, seed):
    k = math.ceil(n / (grid[0] * grid[1]) ** 2)
    return _subsample(sets.entropy_set(grid, condition, k=k, seed=seed), n, seed)


def _reading_order(grid, n, seed):
    rng = random.Random(seed)
    return [reading_order_trial(rng, grid, rng.randint(2, grid[0] * grid[1])) for _ in range(n)]


HELDOUT_GROUPS = {
    "scene_description/2x2/high": lambda n, s: _entropy((2, 2), "high", n, s),
    "scene_description/2x2/low": lambda n, s: _entropy((2, 2), "low", n, s),
    "scene_description/3x3/high": lambda n, s: _entropy((3, 3), "high", n, s),
    "scene_description/3x3/low": lambda n, s: _entropy((3, 3), "low", n, s),
    "scene_description/2x2/2obj": lambda n, s: sets.scene_description_set(n, (2, 2), n_objects=2, seed=s),
    "color_retrieval/2x2": lambda n, s: sets.color_retrieval_set(n, (2, 2), seed=s),
    "spatial_relation/3x3": lambda n, s: sets.spatial_relation_set(n, seed=s, grid=(3, 3)),
    "counting/3x3": lambda n, s: sets.counting_set(n, seed=s, grid=(3, 3)),
    "reading_order/3x3": lambda n, s: _reading_order((3, 3), n, s),
}

#: The groups the 95% target is stated for (high-entropy scene description and colour retrieval).
TARGET_GROUPS = ("scene_description/2x2/high", "scene_description/3x3/high", "color_retrieval/2x2")


def heldout_sets(n: int, seed: int, groups=None) -> dict[str, list[Trial]]:
    """The fixed held-out draw: ``n`` trials per group (the paper's entropy sets, subsampled, for the scene
    description groups; the default analysis sets otherwise), seeds offset from training by ``HELDOUT_SEED``."""
    names = list(groups or HELDOUT_GROUPS)
    return {g: HELDOUT_GROUPS[g](n, HELDOUT_SEED + 7919 * seed + k) for k, g in enumerate(names)}


# -- feeding a GPU --------------------------------------------------------------------------------------------------
def adapter_without_weights(arch: str, sizes: dict | None = None) -> VLM:
    """A ``VLM`` of the ``arch`` organism on the meta device: tokenizer, processor and layout, no weights (what
    ``encode`` needs, built in a worker process in milliseconds)."""
    from vismech.models.families import family_for_config
    from vismech.models.wordtok import build_word_tokenizer

    from .config import organism_config

    tok = build_word_tokenizer(family=arch)
    cfg = organism_config(arch, tok, **(sizes or {}))
    spec = family_for_config(cfg)
    with torch.device("meta"):
        model = spec.model_class()(cfg)
    return VLM(model, tok, spec.image_processor_for(cfg), spec, f"organism:{arch}", "chat")


class _Maker:
    """Builds the batch of a step; one per worker process (or one in the training process)."""

    def __init__(self, arch, sizes, seed, batch_size, end_token, pixel_dtype, mixture, label_mentions=False,
                 early=None, plant=None):
        self.vlm = adapter_without_weights(arch, sizes)
        self.seed, self.n, self.end, self.dtype, self.mixture = seed, batch_size, end_token, pixel_dtype, mixture
        self.label_mentions, self.early, self.plant = label_mentions, early, plant

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        if self.plant is not None:
            from .plant_batch import make_batch

            batch = make_batch(self.vlm, self.plant, self.seed, step, self.n, self.end, self.dtype or torch.float32)
            for key in [k for k in batch if k.endswith(("pixel_frame", "pixel_repeat"))]:
                batch[key] = batch.pop(key)  # last, where packing the batch's pixels puts them
        else:
            mixture = self.early[1] if self.early and step < self.early[0] else self.mixture
            batch = teacher_forcing(self.vlm, step_trials(self.seed, step, self.n, mixture), self.end,
                                    label_mentions=self.label_mentions)
            batch.update(rope_positions(self.vlm.model, batch))
        proc, dtype = self.vlm.image_processor, self.dtype
        frames, patch = getattr(proc, "temporal_patch_size", None) or 1, getattr(proc, "patch_size", 0)
        # packed before the cast, each frame cast as it is taken (the cast is per value: the frame of the cast
        # pixels), then again after it, for pixels whose frames only the cast made equal: as casting, then packing
        batch = pack_pixels(batch, frames, patch, dtype)
        if dtype is not None:
            batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        return pack_pixels(batch, frames, patch)


def rope_positions(model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"position_ids": ...}`` for a model with multimodal rotary positions (Qwen2-VL family), else ``{}``.

    HF's Qwen2.5-VL computes these 3-D positions in its forward with a Python loop over the batch rows (a few
    dozen small GPU ops and host syncs per row), which dominates a training step of a model this small; the worker
    processes compute them on the CPU with the model's own ``get_rope_index`` (it reads the config only, so the
    weightless model of ``adapter_without_weights`` serves), and the forward uses them as given."""
    inner = getattr(model, "model", None)
    if not hasattr(inner, "get_rope_index") or "mm_token_type_ids" not in batch:
        return {}
    ids, types, mask, grids = (batch["input_ids"], batch["mm_token_type_ids"], batch["attention_mask"],
                               batch.get("image_grid_thw"))
    # A row's positions follow from its token types, its mask and its image's grid alone (not its token ids): where
    # every row shows one image, rows that agree on those three are computed once (planting's rows share a few
    # layouts); ``tests/test_plant_batch_speed.py`` holds this to the plain call.
    starts = (types == 1) & (torch.nn.functional.pad(types[:, :-1], (1, 0)) != 1) & mask.bool()
    if grids is not None and len(grids) == len(ids) and not (types == 2).any() and bool((starts.sum(1) == 1).all()):
        key = torch.cat([types.long(), mask.long(), grids.long()], 1)
        _, inverse = torch.unique(key, dim=0, return_inverse=True)
        first = torch.full((int(inverse.max()) + 1,), len(ids), dtype=torch.long).scatter_reduce_(
            0, inverse, torch.arange(len(ids)), "amin")
        ids, types, mask, grids = ids[first], types[first], mask[first], grids[first]
    else:
        inverse = None
    positions, _ = inner.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grids, attention_mask=mask)
    return {"position_ids": positions if inverse is None else positions[:, inverse]}


_MAKER: list[_Maker] = []  # the worker process's maker


def _init_worker(*args) -> None:
    # one core's worth of work per worker: no intra-op threads, and the tokenizer encodes on this thread instead of
    # handing each text to a pool of one thread per core (a pool in each of a dozen workers)
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _MAKER.append(_Maker(*args))


def _make(step: int, one_buffer: bool = True):
    return transfer.pack(_MAKER[-1](step)) if one_buffer else _MAKER[-1](step)


class Feeder:
    """Training batches for steps ``start, start+1, ...`` in order, built by ``workers`` processes (0: in this
    process), at most ``prefetch`` batches ahead; ``early`` = (steps, mixture): that mixture before that step;
    ``plant`` (a ``plant.PlantSpec``): planting batches (``plant_batch.make_batch``, ``batch_size`` bases) instead.
    ``pixel_dtype`` bf16 halves what crosses processes (no change under bf16 autocast, whose first vision op casts
    the pixels to bf16 anyway); ``one_buffer``: a worker's batch crosses as one buffer (``transfer``)."""

    def __init__(self, arch: str, seed: int, batch_size: int, end_token: str, start: int = 0, workers: int = 0,
                 prefetch: int | None = None, pixel_dtype: torch.dtype | None = None, sizes: dict | None = None,
                 mixture: tuple[Component, ...] = MIXTURE, label_mentions: bool = False,
                 early: tuple[int, tuple[Component, ...]] | None = None, plant=None, one_buffer: bool = True):
        self.step, self.one_buffer = start, one_buffer
        args = (arch, sizes, seed, batch_size, end_token, pixel_dtype, mixture, label_mentions, early, plant)
        self.pool = None
        if workers > 0:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=args)
            self.prefetch = prefetch or 2 * workers
            self.pending: list = []
        else:
            self.maker = _Maker(*args)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.pool is None:
            batch = self.maker(self.step)
        else:
            while len(self.pending) < self.prefetch:
                self.pending.append(self.pool.apply_async(_make, (self.step + len(self.pending), self.one_buffer)))
            batch = transfer.unpack(self.pending.pop(0).get()) if self.one_buffer else self.pending.pop(0).get()
        self.step += 1
        return batch

    def on_device(self, device, ahead: bool = True) -> transfer.Ahead:
        """These batches on ``device`` (``to_device``), moved by a helper thread when workers build them (``ahead``)."""
        return transfer.Ahead(self, lambda batch: to_device(batch, device), thread=ahead and self.pool is not None)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    __enter__ = __iter__

    def __exit__(self, *exc):
        self.close()
