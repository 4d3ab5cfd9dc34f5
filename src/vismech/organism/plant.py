"""Planting: train declared heads of an organism to implement ``causal_model``'s variables, so that the organism
has known ground truth (``models.ground_truth``) against which vismech's analyses are checked.

Method (one training step; ``PlantSpec`` holds the heads and weights):

1. *Attention supervision* on clean rows: the declared heads attend where the mechanism reads. The binding head
   (``binding``) at each mention's last word attends to its first word (the colour reaches the shape word, so ID
   retrieval can look up a conjunction); ID retrieval heads (``retrieval``) at each mention's last word attend to
   the mentioned object's image tokens; gathering heads (``gathering``) at each naming position attend to the last
   words of the mentions before it (a fixed first token when there are none); selection heads (``selection``) and
   feature heads (``features``) at each naming position attend to the image tokens of the object to name. Loss:
   minus the log of the attention mass on those tokens.
2. *Task loss* on clean rows (bases and their sources): the answer, and in reading-order descriptions every
   described object's words.
3. *Interchange intervention training* (IIT, Geiger et al. 2022): rows that run a base with some heads' outputs
   (the o_proj input) taken from a source run at the same positions, labelled with ``causal_model``'s
   counterfactual answer: ``R`` (retrieval heads at every mention token, from a swap source), ``S`` (gathering or
   selection heads at the final naming positions, from a swap source), ``F`` (feature heads there, from a feature
   source).
4. *Strict* rows (SIIT, Gupta et al. 2024): every head outside the declared set, and every declared head outside
   its declared positions, is resampled from an independent trial of the same layout with probability
   ``strict_p``; the label is the base answer, so nothing but the declared heads may carry what the answer needs.
5. A linear *position probe* on the residual stream after ``probe_layer`` at every object's image tokens predicts
   the object's row and column: the language model must write a content-free position code into the image tokens
   that retrieval, selection and feature heads can read. (The Qwen2.5-VL vision tower cannot: with 2-D rotary
   positions only, a plain background gives it no absolute position, so the code comes from the language model's
   M-RoPE.) The probe is discarded after training.

Naming positions: the last token (and the answer's first word, which names the shape) for the final object; in a
reading-order description also every "a" before a described object and its colour word. Everything the steps
need (rows, positions, masks) is built on the CPU by ``make_batch`` (in the data worker processes) and consumed
on the device by ``plant_loss``.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import asdict, dataclass, field

import torch

from vismech import hooks
from vismech.errors import UserError
from vismech.models.vlm import VLM
from vismech.scenes.core import Trial

from . import causal_model as cm
from .data import answer_tokens, rope_positions

Heads = tuple[tuple[int, int], ...]
IIT_KINDS = ("R", "S", "F", "strict")
COMPONENTS = ("binding", "retrieval", "gathering", "selection", "features")


@dataclass(frozen=True)
class PlantSpec:
    """Which heads carry which variable, the trial mixture and the loss weights of planting."""

    binding: Heads = ((1, 0),)
    retrieval: Heads = ((2, 0), (2, 1))
    gathering: Heads = ((3, 0), (3, 1))
    selection: Heads = ((4, 0), (4, 1))
    features: Heads = ((6, 0), (6, 1))
    probe_layer: int = 1
    kinds: tuple[tuple[str, float], ...] = (("describe", 0.45), ("describe_ordered", 0.3), ("color", 0.25))
    grids: tuple[tuple[tuple[int, int], float], ...] = (((2, 2), 0.35), ((3, 3), 0.65))
    entropies: tuple[tuple[str, float], ...] = (("high", 0.3), ("any", 0.5), ("low", 0.2))
    weights: tuple[tuple[str, float], ...] = (("task", 1.0), ("attention", 1.0), ("probe", 0.5), ("R", 1.0),
                                              ("S", 1.0), ("F", 1.0), ("strict", 1.0))
    strict_p: float = 0.5

    def weight(self, name: str) -> float:
        return dict(self.weights)[name]

    @property
    def planted(self) -> Heads:
        return self.binding + self.retrieval + self.gathering + self.selection + self.features

    def check(self, n_layers: int, n_heads: int) -> None:
        heads = self.planted
        if len(set(heads)) != len(heads):
            raise UserError(f"a head is declared twice in {heads}")
        for layer, head in heads:
            if not (0 <= layer < n_layers and 0 <= head < n_heads):
                raise UserError(f"declared head ({layer}, {head}) is outside the model's {n_layers} x {n_heads}")
        order = [max(h[0] for h in g) for g in (self.retrieval, self.gathering, self.selection)]
        lows = [min(h[0] for h in g) for g in (self.gathering, self.selection, self.features)]
        if not (max(h[0] for h in self.binding) < min(h[0] for h in self.retrieval)
                and all(a < b for a, b in zip(order, lows)) and self.probe_layer < min(h[0] for h in self.retrieval)):
            raise UserError("declared stages must run in order: binding < retrieval < gathering < selection < "
                             "features, with the position probe before retrieval")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# -- rows of one step ------------------------------------------------------------------------------------------
@dataclass
class _Row:
    trial: Trial
    answer: str  # the teacher-forced continuation (the base answer, or the counterfactual one)
    mention_labels: bool
    group: int  # the base it belongs to (rows of one group share their layout)


@dataclass
class _Plan:
    a: list[_Row] = field(default_factory=list)  # clean rows: bases, then their sources
    b: list[tuple[_Row, str, int]] = field(default_factory=list)  # (row, kind, index of its source in a)


def _pick(rng: random.Random, table) -> object:
    names, weights = zip(*table)
    return rng.choices(names, weights=weights)[0]


def step_plan(spec: PlantSpec, seed: int, step: int, n: int) -> _Plan:
    """The trials of one step: ``n`` bases, their swap, feature and resample sources, and the intervened rows."""
    rng = random.Random(seed * 1_000_000_007 + step)
    plan = _Plan()
    bases, sources = [], []
    for g in range(n):
        grid, kind = _pick(rng, spec.grids), _pick(rng, spec.kinds)
        base = cm.planting_trial(rng, cm.draw_structure(rng, kind, grid), _pick(rng, spec.entropies))
        swap = _informative_swap(base, rng)
        feat = cm.feature_source(base, rng)
        resample = cm.resample_source(base, rng, _pick(rng, spec.entropies))
        bases.append(base)
        sources.append((swap, feat, resample))
    for g, base in enumerate(bases):
        plan.a.append(_Row(base, base.answer, bool(base.meta["ordered"]), g))
    for g, (swap, feat, resample) in enumerate(sources):
        for src in (swap, feat, resample):
            plan.a.append(_Row(src, src.answer, bool(src.meta["ordered"]), g))
    for g, base in enumerate(bases):
        swap_i, feat_i, res_i = n + 3 * g, n + 3 * g + 1, n + 3 * g + 2
        swap, feat = sources[g][0], sources[g][1]
        plan.b.append((_Row(base, cm.counterfactual_answer(base, swap, "R"), False, g), "R", swap_i))
        plan.b.append((_Row(base, cm.counterfactual_answer(base, swap, "S"), False, g),
                       rng.choice(("S_gathering", "S_selection")), swap_i))
        plan.b.append((_Row(base, cm.counterfactual_answer(base, feat, "F"), False, g), "F", feat_i))
        plan.b.append((_Row(base, base.answer, False, g), "strict", res_i))
    return plan


def _informative_swap(base: Trial, rng: random.Random, tries: int = 6) -> Trial:
    """A swap source whose counterfactual answer differs from the base answer, when one of a few tries finds it."""
    src = None
    for _ in range(tries):
        src, _cells = cm.swap_source(base, rng)
        if cm.counterfactual_answer(base, src, "R") != base.answer:
            break
    return src


# -- tensors ---------------------------------------------------------------------------------------------------
def _naming(row: _Row, last: int, mentions: list[list[int]], answer_len: int) -> list[tuple[int, object, int]]:
    """(position, object named there, number of mentions before it) of the row's naming positions; ``last`` is the
    position of the prompt's last token and ``mentions`` the mentions' token positions, in the row's frame."""
    t = row.trial
    out = [(last, t.target, len(mentions))]
    if t.task != "color_retrieval" and answer_len > 2:  # "colour shape" + end: the colour word names the shape
        out.append((last + 1, t.target, len(mentions)))
    if row.mention_labels and t.task != "color_retrieval":
        for j, (m, obj) in enumerate(zip(mentions, t.mentioned)):
            out += [(m[0] - 1, obj, j), (m[0], obj, j)]
    return out


def make_batch(vlm: VLM, spec: PlantSpec, seed: int, step: int, n: int, end_token: str) -> dict[str, torch.Tensor]:
    """Every tensor one planting step needs (see the module docstring); built on the CPU."""
    return batch_of(vlm, spec, step_plan(spec, seed, step, n), end_token, seed * 7919 + step)


def batch_of(vlm: VLM, spec: PlantSpec, plan: _Plan, end_token: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors of ``plan``: its clean rows, and its intervened rows, whose kind says what they patch from their
    source: ``R``, ``S_gathering``, ``S_selection``, ``F`` (the declared heads at the declared positions),
    ``strict`` (undeclared heads, each with probability ``spec.strict_p``, and declared heads outside their
    positions), or ``("resample", heads)`` (those heads at every position)."""
    a_trials = [r.trial for r in plan.a]
    images = [vlm.render(t) for t in a_trials]
    enc = vlm.encode(a_trials, images)
    L, H = vlm.n_layers, vlm.n_heads
    pad = vlm.tokenizer.pad_token_id or 0

    def prompt_of(i):  # unpadded prompt ids and the left padding of row i of ``enc``
        mask = enc.inputs["attention_mask"][i].bool()
        return enc.inputs["input_ids"][i, mask].tolist(), enc.length - int(mask.sum())

    rows_a, rows_b = [], []
    for i, r in enumerate(plan.a):
        p, off = prompt_of(i)
        rows_a.append((p, answer_tokens(vlm, enc.texts[i], r.answer, end_token, prefix=p)[1], off, i))
    for r, kind, src in plan.b:
        base_i = r.group  # bases are the first rows of a
        p, off = prompt_of(base_i)
        rows_b.append((p, answer_tokens(vlm, enc.texts[base_i], r.answer, end_token, prefix=p)[1], off, base_i))
    total = max(len(p) + len(a) for p, a, _, _ in rows_a + rows_b)

    def tensors(rows, plan_rows):
        ids = torch.full((len(rows), total), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        shift = []
        for k, ((p, a, off, src_i), pr) in enumerate(zip(rows, plan_rows)):
            start = total - len(p) - len(a)
            ids[k, start:] = torch.tensor(p + a)
            mask[k, start:] = 1
            labels[k, total - len(a):] = torch.tensor(a)
            sh = start - off  # enc position x of row src_i is position x + sh here
            shift.append(sh)
            if pr.mention_labels and pr.trial.task != "color_retrieval":
                for m in enc.mentions[src_i]:
                    for x in m:
                        labels[k, x + sh] = ids[k, x + sh]
        return ids, mask, labels, shift

    ids_a, mask_a, labels_a, shift_a = tensors(rows_a, plan.a)
    ids_b, mask_b, labels_b, shift_b = tensors(rows_b, [r for r, _, _ in plan.b])
    out: dict[str, torch.Tensor] = {}
    parts = [("a_", ids_a, mask_a, labels_a, images)]
    if plan.b:  # a plan of clean rows only has no intervened rows to encode
        parts.append(("b_", ids_b, mask_b, labels_b, [images[r.group] for r, _, _ in plan.b]))
    for prefix, ids, mask, labels, imgs in parts:
        img = vlm.family.process_images(vlm.image_processor, imgs)
        out.update({prefix + k: v for k, v in img.tensors.items()})
        out.update({prefix + "input_ids": ids, prefix + "attention_mask": mask, prefix + "labels": labels})
        out.update({prefix + k: v for k, v in vlm.family.extra_inputs(ids, vlm.image_token_id).items()})
        out.update({prefix + k: v for k, v in rope_positions(vlm.model, _split(out, prefix)).items()})

    # attention supervision on the clean rows: per component, (row, column of att_qpos) and a mask over keys
    targets = {c: ([], []) for c in COMPONENTS}
    queries: list[list[int]] = [[] for _ in plan.a]

    def add(comp, row, q, keys):
        if q not in queries[row]:
            queries[row].append(q)
        m = torch.zeros(total, dtype=torch.bool)
        m[torch.tensor(keys)] = True
        targets[comp][0].append((row, queries[row].index(q)))
        targets[comp][1].append(m)

    probe_pos, probe_cls = [], []
    for i, r in enumerate(plan.a):
        sh = shift_a[i]
        ments = [[x + sh for x in m] for m in enc.mentions[i]]
        objs = {cell: [x + sh for x in toks] for cell, toks in enc.objects[i].items()}
        first = int(mask_a[i].nonzero()[0])
        for m, obj in zip(ments, r.trial.mentioned):
            if len(m) > 1:
                add("binding", i, m[-1], [m[0]])
            add("retrieval", i, m[-1], objs[obj.cell])
        answer_len = len(rows_a[i][1])
        for pos, obj, before in _naming(r, total - answer_len - 1, ments, answer_len):
            add("gathering", i, pos, [m[-1] for m in ments[:before]] or [first])
            add("selection", i, pos, objs[obj.cell])
            add("features", i, pos, objs[obj.cell])
        for cell, toks in objs.items():
            probe_pos += [(i, x) for x in toks]
            probe_cls += [cell] * len(toks)
    # unused slots query the last token (a real token in every row: a padded query would attend to nothing)
    qpos = torch.full((len(plan.a), max(len(q) for q in queries)), total - 1, dtype=torch.long)
    for i, qs in enumerate(queries):
        qpos[i, :len(qs)] = torch.tensor(qs)
    out["att_qpos"] = qpos
    for comp, (where, masks) in targets.items():
        out[f"att_{comp}_where"] = torch.tensor(where, dtype=torch.long).reshape(-1, 2)
        out[f"att_{comp}_keys"] = torch.stack(masks) if masks else torch.zeros(0, total, dtype=torch.bool)
    out["probe_where"] = torch.tensor(probe_pos, dtype=torch.long)
    out["probe_cell"] = torch.tensor(probe_cls, dtype=torch.long)

    # intervened rows: which (position, layer, head) take the source row's value
    patch = torch.zeros(len(plan.b), total, L, H, dtype=torch.bool)
    src_rows, kinds = [], []
    gen = torch.Generator().manual_seed(seed)
    declared = _declared_positions(spec, plan, enc, shift_b, rows_b, total)
    for k, (r, kind, src) in enumerate(plan.b):
        src_rows.append(src)
        if isinstance(kind, tuple):  # ("resample", heads): those heads everywhere
            kinds.append(IIT_KINDS.index("strict"))
            for layer, head in kind[1]:
                patch[k, :, layer, head] = mask_b[k].bool()
            continue
        kinds.append(IIT_KINDS.index(kind.split("_")[0]))
        if kind == "strict":
            p = torch.rand(L, H, generator=gen) < spec.strict_p
            m = p[None].expand(total, L, H).clone()
            for pos, heads in declared[k].values():  # declared heads stay at their declared positions
                for layer, head in heads:
                    m[pos, layer, head] = False
            m[~mask_b[k].bool()] = False
            patch[k] = m
        else:
            comp = {"R": "retrieval", "S_gathering": "gathering", "S_selection": "selection", "F": "features"}[kind]
            pos, heads = declared[k][comp]
            for layer, head in heads:
                patch[k, pos, layer, head] = True
    out["b_patch"] = patch
    out["b_source"] = torch.tensor(src_rows, dtype=torch.long)
    out["b_kind"] = torch.tensor(kinds, dtype=torch.long)
    return out


def _declared_positions(spec: PlantSpec, plan: _Plan, enc, shift_b, rows_b, total) -> list[dict]:
    """For each intervened row: component -> (positions, heads) where the component's variable lives (the final
    naming positions for the last-token components; every mention token for retrieval and binding)."""
    out = []
    for k, (r, kind, src) in enumerate(plan.b):
        g = r.group
        sh = shift_b[k]
        ments = [[x + sh for x in m] for m in enc.mentions[g]]
        answer_len = len(rows_b[k][1])
        last = total - answer_len - 1
        final = [last] + ([last + 1] if r.trial.task != "color_retrieval" and answer_len > 2 else [])
        mention_tokens = [x for m in ments for x in m]
        named = list(final)
        if plan.a[g].mention_labels and r.trial.task != "color_retrieval":
            named += [x for m in ments for x in (m[0] - 1, m[0])]
        out.append({"binding": (torch.tensor(mention_tokens), spec.binding),
                    "retrieval": (torch.tensor(mention_tokens), spec.retrieval),
                    "gathering": (torch.tensor(named if kind == "strict" else final), spec.gathering),
                    "selection": (torch.tensor(named if kind == "strict" else final), spec.selection),
                    "features": (torch.tensor(named if kind == "strict" else final), spec.features)})
    return out


# -- the loss --------------------------------------------------------------------------------------------------
def _split(batch: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


def _answer_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: every labelled next token is the arg-max (teacher-forced, so equal to greedy generation)."""
    pred = logits[:, :-1].argmax(-1)
    want = labels[:, 1:]
    ok = (pred == want) | (want == -100)
    return ok.all(-1)


def _ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean cross-entropy over the labelled next tokens."""
    lg, lb = logits[:, :-1].float(), labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), reduction="none",
                                           ignore_index=-100).view(lb.shape)
    return ce.sum(-1) / (lb != -100).sum(-1).clamp(min=1)


def _attention_layers(spec: PlantSpec) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for c in COMPONENTS:
        for layer, head in getattr(spec, c):
            out.setdefault(layer, []).append(head)
    return out


def clean_forward(vlm: VLM, spec: PlantSpec, batch: dict, autocast=contextlib.nullcontext):
    """The clean rows: logits, every layer's head outputs z (graph kept, for the patched rows), the declared heads'
    attention at the supervised queries, and the residual stream after ``spec.probe_layer``."""
    z: dict[int, torch.Tensor] = {}
    resid: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        for layer in range(vlm.n_layers):
            stack.enter_context(hooks.hooked(vlm, "z", layer, lambda x, layer=layer: z.__setitem__(layer, x)))
        stack.enter_context(hooks.hooked(vlm, "resid", spec.probe_layer, lambda x: resid.__setitem__("x", x)))
        att = stack.enter_context(hooks.attention_weights(vlm, _attention_layers(spec), batch["att_qpos"]))
        with autocast():
            logits = vlm.model(**_inputs(batch, "a_"), use_cache=False).logits
    return logits, z, att, resid["x"][:, :, 0]


def patched_forward(vlm: VLM, batch: dict, z_a: dict[int, torch.Tensor], autocast=contextlib.nullcontext):
    """The intervened rows: row k runs its own inputs with the head outputs that ``b_patch[k]`` marks taken from
    clean row ``b_source[k]`` (same positions)."""
    patch, source = batch["b_patch"], batch["b_source"]

    def fn(layer):
        return lambda x: torch.where(patch[:, :, layer, :, None], z_a[layer][source], x)

    with contextlib.ExitStack() as stack:
        for layer in range(vlm.n_layers):
            stack.enter_context(hooks.hooked(vlm, "z", layer, fn(layer)))
        with autocast():
            return vlm.model(**_inputs(batch, "b_"), use_cache=False).logits


def _inputs(batch: dict, prefix: str) -> dict:
    return {k: v for k, v in _split(batch, prefix).items() if k not in ("labels", "patch", "source", "kind")}


def plant_loss(vlm: VLM, spec: PlantSpec, probe: torch.nn.Module, batch: dict, autocast=None) -> tuple:
    """(loss, metrics) of one planting step on ``batch`` (from ``make_batch``, already on the device)."""
    autocast = autocast or contextlib.nullcontext
    labels_a, labels_b, kind = batch["a_labels"], batch["b_labels"], batch["b_kind"]
    att_layers = _attention_layers(spec)
    logits_a, z_a, att, resid = clean_forward(vlm, spec, batch, autocast)
    metrics, losses = {}, {}
    losses["task"] = _ce(logits_a, labels_a).mean()
    n_base = int((kind == 0).sum())  # one R row per base, and the bases are the first clean rows
    metrics["base_acc"] = float(_answer_hits(logits_a[:n_base], labels_a[:n_base]).float().mean())
    att_terms = []
    for c in COMPONENTS:
        where, keys = batch[f"att_{c}_where"], batch[f"att_{c}_keys"]
        if len(where) == 0:
            continue
        masses = []
        for layer, head in getattr(spec, c):
            p = att[layer][where[:, 0], att_layers[layer].index(head), where[:, 1]]  # [N, keys]
            masses.append((p * keys.to(p.dtype)).sum(-1))
        mass = torch.stack(masses)
        att_terms.append(-(mass + 1e-6).log().mean())
        metrics[f"att_{c}"] = float(mass.detach().mean())
    losses["attention"] = torch.stack(att_terms).mean()
    feats = resid[batch["probe_where"][:, 0], batch["probe_where"][:, 1]].float()
    cells = batch["probe_cell"]
    row_logits, col_logits = probe(feats).split(3, -1)
    losses["probe"] = (torch.nn.functional.cross_entropy(row_logits, cells[:, 0])
                       + torch.nn.functional.cross_entropy(col_logits, cells[:, 1]))
    metrics["probe_acc"] = float(((row_logits.argmax(-1) == cells[:, 0]) & (col_logits.argmax(-1) == cells[:, 1]))
                                 .float().mean())
    logits_b = patched_forward(vlm, batch, z_a, autocast)
    ce_b, hits_b = _ce(logits_b, labels_b), _answer_hits(logits_b, labels_b)
    for k, name in enumerate(IIT_KINDS):
        sel = kind == k
        if sel.any():
            losses[name] = ce_b[sel].mean()
            metrics[f"iit_{name}_acc"] = float(hits_b[sel].float().mean())
    total = sum(spec.weight(k) * v for k, v in losses.items())
    metrics.update({f"loss_{k}": float(v.detach()) for k, v in losses.items()})
    return total, metrics


METHOD = ("planted by vismech.organism.plant: attention supervision of the declared heads, interchange intervention "
          "training of the R, S and F variables of vismech.organism.causal_model on their heads, and strict "
          "resampling of every other head (SIIT); a linear probe trained a position code into the image tokens")


def ground_truth(spec: PlantSpec):
    """The ``models.ground_truth.GroundTruth`` that planting with ``spec`` declares."""
    from vismech.models.ground_truth import Declared, GroundTruth

    return GroundTruth(
        stages={
            "id_retrieval": Declared(spec.retrieval, "mentions", "R: the cell of the mentioned object (read at the "
                                     "mention's last word)"),
            "id_selection": Declared(spec.gathering + spec.selection, "last",
                                     "S: the cell of the object to name next (first occupied cell in reading order "
                                     "not yet described; in the colour question, the named shape's cell)",
                                     {"gathering": spec.gathering, "selection": spec.selection}),
            "feature_retrieval": Declared(spec.features, "last", "F: colour and shape of the object at cell S")},
        helpers={"binding": Declared(spec.binding, "mentions", "the mention's colour word, moved to its shape word "
                                     "(text only: no CMA condition changes it)")},
        method=METHOD)


def make_probe(vlm: VLM) -> torch.nn.Module:
    """The auxiliary position probe (row and column of a 3x3 grid from the residual stream), fp32."""
    return torch.nn.Linear(vlm.text_config.hidden_size, 6)
