"""Planting: train declared heads of an organism to implement ``causal_model``'s variables, so that the organism
has known ground truth (``models.ground_truth``) against which vismech's analyses are checked.

Method (one training step; ``PlantSpec`` holds the heads and weights):

1. *Attention supervision* on clean rows: the declared heads attend where the mechanism reads. The binding head
   (``binding``) at each mention's last word attends to its first word (the colour reaches the shape word, so ID
   retrieval can look up a conjunction); ID retrieval heads (``retrieval``) at each mention's last word attend to
   the mentioned object's image tokens; gathering heads (``gathering``) at each naming position attend to the last
   words of the mentions before it (a fixed first token when there are none; with ``gathering_share``, a given
   share on each mention and the rest on the first token, a cross-entropy against that target); selection heads
   (``selection``) and feature heads (``features``) at each naming position attend to the image tokens of the
   object to name. Loss: minus the log of the attention mass on those tokens.
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
   MLPs are not resampled, except, with ``strict_late_mlps``, those of the layers after the feature heads.
5. *Invariance* (with an ``invariance`` weight; 1 in the default spec; from step ``invariance_from``): each base
   gets a source with one described object's features replaced at its cell (``causal_model.mention_feature_source``);
   the ID-retrieval heads' outputs at that mention's last word must be equal in the two (squared difference over
   squared norms), so they carry the cell and nothing of the features. With ``invariance_s`` and ``invariance_k``
   weights the same for the gathering and selection heads' outputs and the selection and feature heads' keys; with a
   ``guard`` weight, no linear read-out of the batch's ID-retrieval outputs at the mentions may explain the mentioned
   objects' colours and shapes (``invariance.guard``); with a ``balance`` weight, the ID-retrieval and selection
   heads' outputs and the selection and feature heads' keys at the image tokens must separate the rows and the
   columns alike (``position_probe.balance``).
6. A linear *position probe* on the residual stream after ``probe_layer`` at every object's image tokens predicts
   the object's row and column: the language model must write a content-free position code into the image tokens
   that retrieval, selection and feature heads can read. (The Qwen2.5-VL vision tower cannot: with 2-D rotary
   positions only, a plain background gives it no absolute position, so the code comes from the language model's
   M-RoPE.) The probe is discarded after training. Rows and columns are satisfied by a planar map of the cells (what
   both planted organisms learned: ``docs/organism-ids.md``); ``cell_code`` asks for nine distinct IDs instead (a
   cosine classifier over fixed orthonormal directions), ``ring_probe`` for each cell's ring as well, a third
   dimension of a code that keeps the grid's distances, ``balanced_probe`` rows and columns of about equal size in
   the code (``position_probe``).
7. A linear *set probe* (with a ``set_probe`` weight; 0 in the default spec) on the residual stream entering the
   selection layer at every naming position predicts, for each cell, whether a mention gathered there names it:
   the described set made linearly explicit where the selection heads' queries read it (with eight objects
   described it was not: ``docs/organism-ids.md``).

Naming positions: the last token (and the answer's first word, which names the shape) for the final object; in a
reading-order description also every "a" before a described object and its colour word. Everything the steps
need (rows, positions, masks) is built on the CPU by ``plant_batch.make_batch`` (in the data worker processes) and
consumed on the device by ``plant_loss``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass

import torch

from vismech.engine import hooks
from vismech.errors import UserError
from vismech.models.vlm import VLM
from vismech.organism import invariance, position_probe
from vismech.organism.position_probe import position_width, probe_loss
from vismech.organism.plant_flags import LOSS_TERMS


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
    grids: tuple[tuple[tuple[int, int], float], ...] = (((2, 2), 0.25), ((3, 3), 0.75))
    entropies: tuple[tuple[str, float], ...] = (("high", 0.3), ("any", 0.5), ("low", 0.2))
    weights: tuple[tuple[str, float], ...] = (("task", 1.0), ("attention", 1.0), ("probe", 1.0), ("R", 1.0),
                                              ("S", 1.0), ("F", 1.0), ("strict", 1.0), ("invariance", 1.0))
    strict_p: float = 0.5
    full_scenes: float = 0.0  # share of descriptions on a full grid with all objects but one described
    # the gathering heads share out the mentions (head j of n: mentions j, j + n, ...) instead of each averaging all
    # k of them: each described ID then weighs n/k in the selection query, not 1/k
    split_gathering: bool = False
    # > 0: each gathered mention gets this share of a gathering head's attention and the first token the rest, so
    # the heads pass on the sum of the described IDs (scaled), not their mean, whose size falls as 1/k
    gathering_share: float = 0.0
    # the position probe is a cosine classifier of the 9 cells over fixed orthonormal directions (``CosineProbe``)
    # instead of rows and columns with trained weights: an ID per cell rather than a planar map of the grid
    cell_code: bool = False
    # the row-and-column probe also reads the cell's ring (0 the centre, 1 an edge, 2 a corner of the 3x3 grid), which
    # no linear read-out of a planar map can: the code gains the third dimension that lets a dot product single out
    # any cell, the centre included, and keeps the grid's distances (``position_probe.ring_of``)
    ring_probe: bool = False
    # rows and columns read by a cosine classifier over six fixed directions normalised together: the code must give
    # the column about as much room as the row (the trained read-out let the row take 3-8 times the column's variance)
    balanced_probe: bool = False
    # the strict term also resamples the MLPs after the feature heads (``strict_p``, every position): a last-layer MLP
    # was seen to override the planted read-out, which only heads were resampled (the seventh attempt)
    strict_late_mlps: bool = False
    # those MLPs are removed instead (``drop_mlps``: zero and frozen from the first step), so that only heads run after
    # the planted read-out: resampling them did not stop the override (the eighth attempt)
    drop_late_mlps: bool = False
    # the invariance terms start at this step: the runs with one from step 0 mostly never made R and S causal
    invariance_from: int = 0
    # from ``invariance_from``, this share of the R, S and F rows patch one of their component's heads alone, its
    # change from the base scaled by the component's head count (``solo_kind``): each declared head then carries an
    # even share of its stage's write, so each moves the answer when patched alone, as CMA patches it (one gathering
    # head of the twelfth attempt scored over 5 alone in 7 of 50 CMA pairs, its partner in 47)
    solo: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.gathering_share <= 1 / 8:
            raise UserError(f"the gathering share must be in [0, 1/8] (eight mentions and the first token share one "
                            f"head's attention on a 3x3 grid), got {self.gathering_share}")
        if self.gathering_share and self.split_gathering:
            raise UserError("give either a gathering share or split gathering, not both")
        if self.cell_code and self.ring_probe:
            raise UserError("give either the cell code or the ring probe, not both: the ring is read with the "
                            "row-and-column probe, which the cell code replaces")
        if self.balanced_probe and (self.cell_code or self.ring_probe):
            raise UserError("give --plant-balanced-probe without --plant-cell-code and --plant-ring-probe: each sets "
                            "what the position probe reads")
        if not 0 <= self.solo <= 1:
            raise UserError(f"the share of solo rows must be in [0, 1], got {self.solo}")
        if self.strict_late_mlps and self.drop_late_mlps:
            raise UserError("give either --plant-strict-late-mlps or --plant-drop-late-mlps: a dropped MLP leaves "
                            "nothing to resample")

    def weight(self, name: str) -> float:
        """The weight of loss term ``name`` (0 for a term the spec does not list)."""
        return dict(self.weights).get(name, 0.0)

    @property
    def planted(self) -> Heads:
        return self.binding + self.retrieval + self.gathering + self.selection + self.features

    def check(self, n_layers: int, n_heads: int) -> None:
        if not 0 <= self.full_scenes <= 1:
            raise UserError(f"the share of full-grid descriptions must be in [0, 1], got {self.full_scenes}")
        bad = sorted(t for t, w in self.weights if t not in LOSS_TERMS or not w >= 0)
        if bad:
            raise UserError(f"planting loss weight(s) {', '.join(bad)} unknown or negative; the terms are "
                            f"{', '.join(LOSS_TERMS)}, each >= 0")
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


# -- the loss --------------------------------------------------------------------------------------------------
def _split(batch: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}


def answer_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: every labelled next token is the arg-max (teacher-forced, so equal to greedy generation)."""
    pred = logits[:, :-1].argmax(-1)
    want = labels[:, 1:]
    ok = (pred == want) | (want == -100)
    return ok.all(-1)


def share_loss(p: torch.Tensor, keys: torch.Tensor, share: float) -> torch.Tensor:
    """Cross-entropy of attention ``p`` [N, keys] against the target that gives each key of ``keys`` (bool [N,
    keys]; its first key is the first token, the others the gathered mentions) ``share`` and the first token the
    rest: the mean over rows of -sum_j t_j log p_j."""
    k = keys.to(p.dtype)
    first = keys.long().argmax(-1)
    t = k * share
    t[torch.arange(len(t), device=t.device), first] = 1 - (k.sum(-1) - 1) * share
    return -(t * (p.float() + 1e-6).log()).sum(-1).mean()


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
        # the language model's input (text embeddings and image features), in the graph: the patched rows reuse it
        lm_in = stack.enter_context(hooks.capture_lm_inputs(vlm, detach=False))
        for layer in range(vlm.n_layers):
            stack.enter_context(hooks.hooked(vlm, "z", layer, lambda x, layer=layer: z.__setitem__(layer, x)))
        stack.enter_context(hooks.hooked(vlm, "resid", spec.probe_layer, lambda x: resid.__setitem__("x", x)))
        if spec.weight("set_probe"):  # the residual stream entering the selection layer, for the set probe
            stack.enter_context(hooks.hooked(vlm, "resid", set_layer(spec), lambda x: z.__setitem__("set_resid", x)))
        for layer in invariance.key_layers(spec) if spec.weight("invariance_k") or spec.weight("balance") else ():
            stack.enter_context(hooks.hooked(vlm, "k", layer, lambda x, layer=layer: z.__setitem__(("k", layer), x)))
        for layer in late_layers(spec, vlm.n_layers) if spec.strict_late_mlps else ():  # kept [rows, positions, hidden]
            keep = (lambda x, name=f"mlp{layer}": z.__setitem__(name, x[:, :, 0]))
            stack.enter_context(hooks.hooked(vlm, "mlp", layer, keep))
        att = stack.enter_context(hooks.attention_weights(vlm, _attention_layers(spec), batch["att_qpos"]))
        with autocast():
            logits = vlm.model(**_inputs(batch, "a_"), use_cache=False).logits
    z["embeddings"] = lm_in["inputs_embeds"]
    return logits, z, att, resid["x"][:, :, 0]


def late_layers(spec: PlantSpec, n_layers: int) -> list[int]:
    """The layers after the last feature-retrieval head's: nothing planted runs there."""
    return list(range(max(layer for layer, _ in spec.features) + 1, n_layers))


def drop_mlps(vlm: VLM, spec: PlantSpec) -> None:
    """With ``spec.drop_late_mlps``: the MLPs after the feature heads zeroed and frozen (they add nothing, ever)."""
    for layer in late_layers(spec, vlm.n_layers) if spec.drop_late_mlps else ():
        for p in vlm.layers[layer].mlp.parameters():
            p.requires_grad_(False).zero_()


def patched_forward(vlm: VLM, batch: dict, z_a: dict, autocast=contextlib.nullcontext):
    """The intervened rows: row k runs its own inputs with the head outputs that ``b_patch[k]`` marks taken from
    clean row ``b_source[k]`` (same positions; with ``b_gain``, the row's own output moved ``b_gain[k]`` times the
    difference to the source's: 1 is the source's output). Row k shows the image of clean row ``b_base[k]``: its image
    features are taken from the clean forward (``z_a["embeddings"]``, the language model's input there) instead of
    running the vision tower again. With ``b_patch_mlp`` (``PlantSpec.strict_late_mlps``) the late layers' MLP
    outputs it marks are taken from the source row too."""
    patch, source, gain = batch["b_patch"], batch["b_source"], batch.get("b_gain")

    def fn(layer):
        if gain is None:
            return lambda x: torch.where(patch[:, :, layer, :, None], z_a[layer][source], x)
        g = gain[:, None, None, None]
        return lambda x: torch.where(patch[:, :, layer, :, None], x + g.to(x.dtype) * (z_a[layer][source] - x), x)

    ids_a, ids_b, base = batch["a_input_ids"], batch["b_input_ids"], batch["b_base"]
    image = vlm.image_token_id
    embeds = vlm.model.get_input_embeddings()(ids_b)
    features = z_a["embeddings"][base][ids_a[base] == image]
    embeds = embeds.masked_scatter((ids_b == image)[..., None], features.to(embeds.dtype))
    inputs = {k: v for k, v in _inputs(batch, "b_").items() if k != "input_ids"}
    with contextlib.ExitStack() as stack:
        for layer in range(vlm.n_layers):
            stack.enter_context(hooks.hooked(vlm, "z", layer, fn(layer)))
        mlps = batch.get("b_patch_mlp")  # [rows, positions, layers]: late MLP outputs taken from the source row
        for layer in [x for x in range(vlm.n_layers) if f"mlp{x}" in z_a] if mlps is not None else ():
            def swap(x, layer=layer):  # x: [rows, positions, 1, hidden]
                return torch.where(mlps[:, :, layer, None, None], z_a[f"mlp{layer}"][source, :, None].to(x.dtype), x)

            stack.enter_context(hooks.hooked(vlm, "mlp", layer, swap))
        with autocast():
            return vlm.model(inputs_embeds=embeds, **inputs, use_cache=False).logits


def _inputs(batch: dict, prefix: str) -> dict:
    return {k: v for k, v in _split(batch, prefix).items() if k not in ("labels", "patch", "source", "kind", "base")}


def plant_loss(vlm: VLM, spec: PlantSpec, probe: torch.nn.Module, batch: dict, autocast=None) -> tuple:
    """(loss, metrics) of one planting step on ``batch`` (from ``make_batch``, already on the device)."""
    autocast = autocast or contextlib.nullcontext
    labels_a, labels_b, kind = batch["a_labels"], batch["b_labels"], batch["b_kind"]
    att_layers = _attention_layers(spec)
    logits_a, z_a, att, resid = clean_forward(vlm, spec, batch, autocast)
    metrics, losses = {}, {}
    losses["task"] = _ce(logits_a, labels_a).mean()
    n_base = batch["n_base"]  # one R row per base, and the bases are the first clean rows
    metrics["base_acc"] = answer_hits(logits_a[:n_base], labels_a[:n_base]).float().mean()
    att_terms = []
    for c in COMPONENTS:
        where, keys = batch[f"att_{c}_where"], batch[f"att_{c}_keys"]
        if len(where) == 0:
            continue
        masses, shares = [], []
        for j, (layer, head) in enumerate(getattr(spec, c)):
            p = att[layer][where[:, 0], att_layers[layer].index(head), where[:, 1]]  # [N, keys]
            k = keys[:, j] if keys.dim() == 3 else keys  # [N, heads, keys]: each head its own target
            masses.append((p * k.to(p.dtype)).sum(-1))
            if c == "gathering" and spec.gathering_share:
                shares.append(share_loss(p, k, spec.gathering_share))
        mass = torch.stack(masses)
        att_terms.append(torch.stack(shares).mean() if shares else -(mass + 1e-6).log().mean())
        metrics[f"att_{c}"] = mass.detach().mean()
    losses["attention"] = torch.stack(att_terms).mean()
    feats = resid[batch["probe_where"][:, 0], batch["probe_where"][:, 1]].float()
    cells = batch["probe_cell"]
    width = position_width(spec)
    losses["probe"], metrics["probe_acc"] = probe_loss(spec, probe(feats), cells)
    if spec.weight("set_probe"):  # which cells the gathered mentions name, read linearly where selection reads
        sw, want = batch["set_where"], batch["set_cells"].float()
        set_logits = probe(z_a["set_resid"][sw[:, 0], sw[:, 1], 0].float())[:, width:]
        losses["set_probe"] = torch.nn.functional.binary_cross_entropy_with_logits(set_logits, want)
        metrics["set_probe_acc"] = ((set_logits > 0) == (want > 0.5)).all(-1).float().mean()
    losses.update(invariance.terms(spec, batch, z_a, vlm.n_heads // vlm.n_kv_heads))
    if spec.weight("balance") and "mention_cells" in batch:
        losses["balance"] = position_probe.balance_loss(spec, batch, z_a, vlm.n_heads // vlm.n_kv_heads)
    logits_b = patched_forward(vlm, batch, z_a, autocast)
    ce_b, hits_b = _ce(logits_b, labels_b), answer_hits(logits_b, labels_b)
    kinds = set(batch["b_kinds"])  # which kinds the batch holds, known on the CPU (no device sync)
    for k, name in enumerate(IIT_KINDS):
        sel = kind == k
        if k in kinds:
            losses[name] = ce_b[sel].mean()
            metrics[f"iit_{name}_acc"] = hits_b[sel].float().mean()
    if batch.get("b_solo"):  # the solo rows' accuracy (they count in their kind's loss)
        metrics["iit_solo_acc"] = hits_b[list(batch["b_solo"])].float().mean()
    total = sum(spec.weight(k) * v for k, v in losses.items())
    metrics.update({f"loss_{k}": v.detach() for k, v in losses.items()})
    return total, metrics


METHOD = ("planted by vismech.organism.plant: attention supervision of the declared heads, interchange intervention "
          "training of the R, S and F variables of vismech.organism.causal_model on their heads, and strict "
          "resampling of every other head (SIIT); a linear probe trained a position code into the image tokens")


def ground_truth(spec: PlantSpec, prior=None, freeze_through: int | None = None):
    """The ``models.ground_truth.GroundTruth`` that planting with ``spec`` declares. ``prior``: the ground truth of
    the organism the run started from (``--init-from``), whose method (how it was planted, erased...) the new one
    continues, naming the layers ``freeze_through`` kept fixed."""
    from vismech.models.ground_truth import Declared, GroundTruth

    dropped = "; the MLPs after the feature heads' layer removed (zero)"
    method = METHOD + (dropped if spec.drop_late_mlps else "")
    if prior is not None:  # its history, then this run (and the MLPs it removed, if the history does not say so)
        method = (f"{prior.method}; then trained again by vismech.organism.plant"
                  + (f" with layers 0-{freeze_through} frozen" if freeze_through is not None else "")
                  + (dropped if spec.drop_late_mlps and dropped not in prior.method else ""))

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
        method=method)


def solo_kind(kind: str) -> tuple[str, int | None]:
    """An intervened row's kind without its solo mark, and the solo head's index in its component (None: every
    head): ``"S_gathering@1"`` is an ``S_gathering`` row that patches the component's second head alone. Other kinds
    (validity's ``("resample", heads)``) are returned as they are."""
    if not isinstance(kind, str):
        return kind, None
    base, _, j = kind.partition("@")
    return base, int(j) if j else None


def set_layer(spec: PlantSpec) -> int:
    """The layer whose output residual stream the selection heads' queries read (the one before them)."""
    return min(layer for layer, _ in spec.selection) - 1
