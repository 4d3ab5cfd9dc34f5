"""The rows, positions and masks of one planting step (``plant``), built on the CPU by the data workers.

A step's *plan* (``step_plan``) holds its clean rows (base trials, then each base's swap, feature and resample
sources from ``causal_model``) and its intervened rows (each a base run with some heads' outputs taken from one of
those sources, labelled with the counterfactual answer). ``batch_of`` turns a plan into tensors: token ids with the
answers appended for teacher forcing, labels, pixel inputs, M-RoPE positions, the attention-supervision targets of
the declared heads (``att_*``), the position-probe targets, and for every intervened row the (position, layer,
head) mask of what it takes from its source. ``make_batch`` is the plan and tensors of training step ``step``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from vismech.models.vlm import VLM
from vismech.scenes.core import Trial

from . import causal_model as cm
from .data import answer_tokens, rope_positions
from .plant import COMPONENTS, IIT_KINDS, PlantSpec, _split, late_layers, solo_kind

# the component whose declared heads an interchange row of each kind patches
COMPONENT_OF = {"R": "retrieval", "S_gathering": "gathering", "S_selection": "selection", "F": "features"}


# -- rows of one step ------------------------------------------------------------------------------------------
@dataclass
class Row:
    trial: Trial
    answer: str  # the teacher-forced continuation (the base answer, or the counterfactual one)
    mention_labels: bool
    group: int  # the base it belongs to (rows of one group share their layout)


@dataclass
class Plan:
    a: list[Row] = field(default_factory=list)  # clean rows: bases, then their sources
    b: list[tuple[Row, str, int]] = field(default_factory=list)  # (row, kind, index of its source in a)
    inv: list[tuple[int, int, int]] = field(default_factory=list)  # (base row, source row, mention) in a
    invariant: bool = True  # whether the invariance terms run at this step (``PlantSpec.invariance_from``)


def _pick(rng: random.Random, table) -> object:
    names, weights = zip(*table)
    return rng.choices(names, weights=weights)[0]


def step_plan(spec: PlantSpec, seed: int, step: int, n: int) -> Plan:
    """The trials of one step: ``n`` bases, their swap, feature and resample sources, and the intervened rows."""
    rng = random.Random(seed * 1_000_000_007 + step)
    plan = Plan()
    bases, sources = [], []
    for g in range(n):
        grid, kind = _pick(rng, spec.grids), _pick(rng, spec.kinds)
        base = cm.planting_trial(rng, cm.draw_structure(rng, kind, grid, spec.full_scenes), _pick(rng, spec.entropies))
        swap = informative_swap(base, rng)
        feat = cm.feature_source(base, rng)
        resample = cm.resample_source(base, rng, _pick(rng, spec.entropies))
        bases.append(base)
        sources.append((swap, feat, resample))
    for g, base in enumerate(bases):
        plan.a.append(Row(base, base.answer, bool(base.meta["ordered"]), g))
    for g, (swap, feat, resample) in enumerate(sources):
        for src in (swap, feat, resample):
            plan.a.append(Row(src, src.answer, bool(src.meta["ordered"]), g))
    for g, base in enumerate(bases):
        swap_i, feat_i, res_i = n + 3 * g, n + 3 * g + 1, n + 3 * g + 2
        swap, feat = sources[g][0], sources[g][1]
        plan.b.append((Row(base, cm.counterfactual_answer(base, swap, "R"), False, g), "R", swap_i))
        plan.b.append((Row(base, cm.counterfactual_answer(base, swap, "S"), False, g),
                       rng.choice(("S_gathering", "S_selection")), swap_i))
        plan.b.append((Row(base, cm.counterfactual_answer(base, feat, "F"), False, g), "F", feat_i))
        plan.b.append((Row(base, base.answer, False, g), "strict", res_i))
    # the invariance rows are drawn last, so that the other rows are those of the spec without them
    plan.invariant = step >= spec.invariance_from
    if spec.solo and plan.invariant:  # its own generator: every row's draw stays that of the spec without it
        solo_rng = random.Random(seed * 1_000_000_007 + step + 1)
        for k, (row, kind, src) in enumerate(plan.b):
            n_heads = len(getattr(spec, COMPONENT_OF[kind])) if kind in COMPONENT_OF else 0
            if n_heads > 1 and solo_rng.random() < spec.solo:
                plan.b[k] = (row, f"{kind}@{solo_rng.randrange(n_heads)}", src)
    if (spec.weight("invariance") or spec.weight("invariance_s")) and plan.invariant:
        for g, base in enumerate(bases):
            drawn = cm.mention_feature_source(base, rng)
            if drawn is None:  # nothing described (the colour question): no mention to hold invariant
                continue
            src, j = drawn
            plan.inv.append((g, len(plan.a), j))
            plan.a.append(Row(src, src.answer, bool(src.meta["ordered"]), g))
    return plan


def informative_swap(base: Trial, rng: random.Random, tries: int = 6) -> Trial:
    """A swap source whose counterfactual answer differs from the base answer, when one of a few tries finds it."""
    src = None
    for _ in range(tries):
        src, _cells = cm.swap_source(base, rng)
        if cm.counterfactual_answer(base, src, "R") != base.answer:
            break
    return src


# -- tensors ---------------------------------------------------------------------------------------------------
_PIXELS = ("pixel_values", "pixel_frame", "pixel_repeat")  # the pixels, as processed or packed


def _naming(row: Row, last: int, mentions: list[list[int]], answer_len: int) -> list[tuple[int, object, int]]:
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


def make_batch(vlm: VLM, spec: PlantSpec, seed: int, step: int, n: int, end_token: str,
               packed: torch.dtype | None = None) -> dict:
    """Every tensor one planting step needs (see the module docstring); built on the CPU. ``packed``: the pixels
    packed in this dtype (``batch_of``)."""
    return batch_of(vlm, spec, step_plan(spec, seed, step, n), end_token, seed * 7919 + step, packed)


def batch_of(vlm: VLM, spec: PlantSpec, plan: Plan, end_token: str, seed: int = 0,
             packed: torch.dtype | None = None) -> dict:
    """The tensors of ``plan``: its clean rows, and its intervened rows, whose kind says what they patch from their
    source: ``R``, ``S_gathering``, ``S_selection``, ``F`` (the declared heads at the declared positions),
    ``strict`` (undeclared heads, each with probability ``spec.strict_p``, and declared heads outside their
    positions), or ``("resample", heads)`` (those heads at every position). ``packed``: the pixels as
    ``transfer.pack_pixels`` packs them, in this dtype, where the family builds them so (``Family.packed_images``)."""
    a_trials = [r.trial for r in plan.a]
    images = [vlm.render(t) for t in a_trials]
    img = None if packed is None else vlm.family.packed_images(vlm.image_processor, images, packed)
    enc = vlm.encode(a_trials, images, img)
    L, H = vlm.n_layers, vlm.n_heads
    pad = vlm.tokenizer.pad_token_id or 0

    lengths = enc.inputs["attention_mask"].sum(1).tolist()
    prompts = [ids[enc.length - n:] for ids, n in zip(enc.inputs["input_ids"].tolist(), lengths)]
    answers: dict[tuple[str, str], list[int]] = {}  # (text, answer) -> answer ids: rows that share both share them

    def row(i, answer):  # unpadded prompt ids, answer ids (+ end) and left padding, from row i of ``enc``
        key = enc.texts[i], answer
        if key not in answers:
            answers[key] = answer_tokens(vlm, enc.texts[i], answer, end_token, prefix=prompts[i])[1]
        return prompts[i], answers[key], enc.length - lengths[i], i

    rows_a = [row(i, r.answer) for i, r in enumerate(plan.a)]
    rows_b = [row(r.group, r.answer) for r, _, _ in plan.b]  # bases are the first rows of a
    total = max(len(p) + len(a) for p, a, _, _ in rows_a + rows_b)

    def tensors(rows, plan_rows):  # each row left-padded to ``total``: ids, mask, labels, and its shift from enc's
        starts = [total - len(p) - len(a) for p, a, _, _ in rows]
        ids = torch.tensor([[pad] * s + p + a for s, (p, a, _, _) in zip(starts, rows)], dtype=torch.long)
        ids = ids.reshape(len(rows), total)
        mask = (torch.arange(total) >= torch.tensor(starts, dtype=torch.long)[:, None]).long()
        labels = torch.full_like(ids, -100)
        shift = [s - off for s, (_, _, off, _) in zip(starts, rows)]  # enc position x of a row: x + shift here
        where = [(k, x) for k, (_, a, _, _) in enumerate(rows) for x in range(total - len(a), total)]  # answers
        where += [(k, x + sh) for k, ((_, _, _, src_i), pr, sh) in enumerate(zip(rows, plan_rows, shift))
                  if pr.mention_labels and pr.trial.task != "color_retrieval" for m in enc.mentions[src_i] for x in m]
        if where:  # and the mentions' words of reading-order descriptions
            k, x = torch.tensor(where, dtype=torch.long).T
            labels[k, x] = ids[k, x]
        return ids, mask, labels, shift

    ids_a, mask_a, labels_a, shift_a = tensors(rows_a, plan.a)
    ids_b, mask_b, labels_b, shift_b = tensors(rows_b, [r for r, _, _ in plan.b])
    out: dict[str, torch.Tensor] = {}
    parts = [("a_", ids_a, mask_a, labels_a)]
    if plan.b:  # a plan of clean rows only has no intervened rows to encode
        parts.append(("b_", ids_b, mask_b, labels_b))
    text_keys = {"input_ids", "attention_mask", *vlm.family.extra_inputs(ids_a[:1], vlm.image_token_id)}
    per_image = {k: v for k, v in enc.inputs.items() if k not in text_keys}  # encode's pixels, not made twice
    out.update({"a_" + k: v for k, v in per_image.items()})
    if plan.b:  # an intervened row shows its base's image: no pixels, the forward reuses the clean image features
        out["b_base"] = torch.tensor([r.group for r, _, _ in plan.b], dtype=torch.long)  # bases: first rows of a
    for prefix, ids, mask, labels in parts:
        out.update({prefix + "input_ids": ids, prefix + "attention_mask": mask, prefix + "labels": labels})
        out.update({prefix + k: v for k, v in vlm.family.extra_inputs(ids, vlm.image_token_id).items()})
        rows = _split(out, prefix)
        if prefix == "b_":  # the base images' grids place the rotary positions; the forward needs no more of them
            grids = {k: v for k, v in per_image.items() if k not in _PIXELS}
            assert all(len(v) == len(images) for v in grids.values()), per_image.keys()
            rows.update({k: v[out["b_base"]] for k, v in grids.items()})
        out.update({prefix + k: v for k, v in rope_positions(vlm.model, rows).items()})

    # attention supervision on the clean rows: per component, (row, column of att_qpos) and the keys (a mask)
    targets = {c: ([], []) for c in COMPONENTS}
    queries: list[list[int]] = [[] for _ in plan.a]

    def add(comp, row, q, keys):
        """``keys``: the target tokens, or a list of them per head of ``comp`` (a [heads, total] mask)."""
        if q not in queries[row]:
            queries[row].append(q)
        targets[comp][0].append((row, queries[row].index(q)))
        targets[comp][1].append(keys)

    probe_pos, probe_cls, set_pos, set_cells, target, last, guarded, named = [], [], [], [], [], [], [], []
    for i, r in enumerate(plan.a):
        sh = shift_a[i]
        ments = [[x + sh for x in m] for m in enc.mentions[i]]
        objs = {cell: [x + sh for x in toks] for cell, toks in enc.objects[i].items()}
        target.append(objs[r.trial.target.cell])
        first = int(mask_a[i].nonzero()[0])
        for m, obj in zip(ments, r.trial.mentioned):
            if len(m) > 1:
                add("binding", i, m[-1], [m[0]])
            add("retrieval", i, m[-1], objs[obj.cell])
            guarded.append((i, m[-1], obj.color, obj.shape, obj.cell))
        answer_len = len(rows_a[i][1])
        last.append(total - answer_len - 1)  # the prompt's last token
        for pos, obj, before in _naming(r, last[i], ments, answer_len):
            gathered = [m[-1] for m in ments[:before]]
            if spec.split_gathering:  # head j of n: mentions j, j + n, ... (none left: the first token)
                n = len(spec.gathering)
                add("gathering", i, pos, [gathered[j::n] or [first] for j in range(n)])
            elif spec.gathering_share:  # the first token always: it takes what the mentions leave
                add("gathering", i, pos, [first] + gathered)
            else:
                add("gathering", i, pos, gathered or [first])
            add("selection", i, pos, objs[obj.cell])
            add("features", i, pos, objs[obj.cell])
            set_pos.append((i, pos))  # the set probe's target there: the cells of the mentions gathered
            named.append(obj.cell)
            cells = {tuple(o.cell) for o in r.trial.mentioned[:before]}
            set_cells.append([(c // 3, c % 3) in cells for c in range(9)])
        for cell, toks in objs.items():
            probe_pos += [(i, x) for x in toks]
            probe_cls += [cell] * len(toks)
    # unused slots query the last token (a real token in every row: a padded query would attend to nothing)
    qpos = torch.full((len(plan.a), max(len(q) for q in queries)), total - 1, dtype=torch.long)
    for i, qs in enumerate(queries):
        qpos[i, :len(qs)] = torch.tensor(qs)
    out["att_qpos"] = qpos
    for comp, (where, keys) in targets.items():
        out[f"att_{comp}_where"] = torch.tensor(where, dtype=torch.long).reshape(-1, 2)
        out[f"att_{comp}_keys"] = _key_masks(keys, total)
    out["inv_where"] = torch.tensor([(g, i, enc.mentions[g][j][-1] + shift_a[g]) for g, i, j in plan.inv],
                                    dtype=torch.long).reshape(-1, 3)
    f_pairs = [(r.group, src) for r, kind, src in plan.b if solo_kind(kind)[0] == "F"]  # each base, its F source
    if spec.weight("invariance_s") and plan.invariant:
        out["f_pairs"] = torch.tensor(f_pairs, dtype=torch.long).reshape(-1, 2)
        out["last_pos"] = torch.tensor(last)
    if spec.weight("invariance_k") and plan.invariant:  # the target's image tokens in each (same count: same cell)
        out["k_where"] = torch.tensor([(g, x, f, y) for g, f in f_pairs for x, y in zip(target[g], target[f])],
                                      dtype=torch.long).reshape(-1, 4)
    if (spec.weight("guard") or spec.weight("balance")) and plan.invariant:  # the mentions' last words
        out["mention_where"] = torch.tensor([g[:2] for g in guarded], dtype=torch.long).reshape(-1, 2)
    if spec.weight("guard") and plan.invariant:  # the mentioned objects' colour and shape as classes of this batch
        names = [sorted({g[k] for g in guarded}) for k in (2, 3)]
        out["guard_labels"] = torch.tensor([[names[0].index(g[2]), names[1].index(g[3])] for g in guarded],
                                           dtype=torch.long).reshape(-1, 2)
    if spec.weight("balance") and plan.invariant:  # their cells, and the cell named at each naming position
        out["mention_cells"] = torch.tensor([g[4] for g in guarded], dtype=torch.long).reshape(-1, 2)
        out["naming_cells"] = torch.tensor(named, dtype=torch.long).reshape(-1, 2)
    out["probe_where"] = torch.tensor(probe_pos, dtype=torch.long)
    out["probe_cell"] = torch.tensor(probe_cls, dtype=torch.long)
    out["set_where"] = torch.tensor(set_pos, dtype=torch.long).reshape(-1, 2)
    out["set_cells"] = torch.tensor(set_cells, dtype=torch.bool).reshape(-1, 9)

    # intervened rows: which (position, layer, head) take the source row's value
    patch = torch.zeros(len(plan.b), total, L, H, dtype=torch.bool)
    src_rows, kinds, solo_rows = [], [], []
    gain = torch.ones(len(plan.b))
    gen = torch.Generator().manual_seed(seed)
    declared = _declared_positions(spec, plan, enc, shift_b, rows_b, total)
    for k, (r, kind, src) in enumerate(plan.b):
        src_rows.append(src)
        if isinstance(kind, tuple):  # ("resample", heads): those heads everywhere
            kinds.append(IIT_KINDS.index("strict"))
            for layer, head in kind[1]:
                patch[k, :, layer, head] = mask_b[k].bool()
            continue
        kind, solo = solo_kind(kind)
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
            pos, heads = declared[k][COMPONENT_OF[kind]]
            if solo is not None:  # one head alone, its change scaled by the component's head count
                gain[k], heads = len(heads), heads[solo:solo + 1]
                solo_rows.append(k)
            for layer, head in heads:
                patch[k, pos, layer, head] = True
    out["b_patch"] = patch
    if solo_rows:
        out["b_gain"], out["b_solo"] = gain, tuple(solo_rows)
    if spec.strict_late_mlps:  # strict rows also take the late layers' MLP outputs from their source
        mlp = torch.zeros(len(plan.b), total, L, dtype=torch.bool)
        late = late_layers(spec, L)
        for k, (_, kind, _) in enumerate(plan.b):
            if kind == "strict":
                for layer in late:
                    if torch.rand((), generator=gen) < spec.strict_p:
                        mlp[k, :, layer] = mask_b[k].bool()
        out["b_patch_mlp"] = mlp
    out["b_source"] = torch.tensor(src_rows, dtype=torch.long)
    out["b_kind"] = torch.tensor(kinds, dtype=torch.long)
    # known on the CPU, so the loss needs no device sync to find them: the kinds present and the number of bases
    out["b_kinds"] = tuple(sorted(set(kinds)))
    out["n_base"] = len({r.group for r in plan.a})
    return out


def _key_masks(keys: list, total: int) -> torch.Tensor:
    """[targets, total] bool, True at each target's key tokens; [targets, heads, total] where each target lists its
    keys per head."""
    if not keys:
        return torch.zeros(0, total, dtype=torch.bool)
    per_head = isinstance(keys[0][0], list)
    heads = keys if per_head else [[ks] for ks in keys]
    target, head, token = [], [], []
    for k, per in enumerate(heads):
        for j, ks in enumerate(per):
            target += [k] * len(ks)
            head += [j] * len(ks)
            token += ks
    m = torch.zeros(len(keys), len(heads[0]), total, dtype=torch.bool)
    m[torch.tensor(target), torch.tensor(head), torch.tensor(token)] = True
    return m if per_head else m[:, 0]


def _declared_positions(spec: PlantSpec, plan: Plan, enc, shift_b, rows_b, total) -> list[dict]:
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
        mention_tokens = torch.tensor([x for m in ments for x in m])
        named = list(final)
        if plan.a[g].mention_labels and r.trial.task != "color_retrieval":
            named += [x for m in ments for x in (m[0] - 1, m[0])]
        naming = torch.tensor(named if kind == "strict" else final)
        out.append({"binding": (mention_tokens, spec.binding), "retrieval": (mention_tokens, spec.retrieval),
                    "gathering": (naming, spec.gathering), "selection": (naming, spec.selection),
                    "features": (naming, spec.features)})
    return out
