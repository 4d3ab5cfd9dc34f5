"""``reuse`` (§4.4, Fig. 5): position IDs estimated on scene description steer the spatial-relation task.

ID vectors: d_desc^i = the mean output (site ``z``, the o_proj input) of each of the top-K ID-selection heads at the
last token, over scene-description contexts whose target sits at cell i (``interventions.id_vectors``). On the
spatial-relation task (``scenes.sets.spatial_relation_set``, "what is the color of the object directly {relation}
of the {ref}") the same heads at the last token get a *pure addition*, o_h + alpha * d_desc^{i*}, where i* is the
cell of the object that answers the question. Accuracy before vs after, per relation, with Wilson 95% intervals,
and the paired difference (after - before) with a percentile bootstrap interval over trials.

Control (not in the paper): the same addition with the ID vector of a *wrong* cell c' (uniform over the other
cells, drawn per trial from the run seed). It should lower accuracy or move answers toward the object at c'; the
"control-object rate" (how often the answer is the colour of the object at c') is reported for the control
intervention and, as its baseline, for the unedited run on the same trials.

Measures: ``first_token`` (the colour is the greedy answer: the arg-max over the whole vocabulary of the last-token
logits is its first token, or under the ``sequence`` rule of ``models.answers`` every token of it) and, with option ``generate``, ``generation`` (greedy decoding, parsed by ``scenes.answers``). The edit is
applied at the prompt's last position only; during generation it acts in the prefill forward, and later tokens see
it through the cached keys and values.

Choices where the paper is silent, with their options: the estimation contexts are the K x N x N scene-description
protocol on the same grid (``scenes.sets.knn_protocol``, one unique colour and shape per object), ``n_estimate``
contexts per target cell spread evenly over target identities (default 18); ``n`` is the number of spatial-relation
trials *per relation* (the set's relations are drawn at random; trials are taken in order until each relation has
``n``); ``k`` heads (default 100 as in the paper, capped at the model's head count); ``alpha`` (2, the paper's);
``grid`` (3x3; the paper does not state it). ``heads`` (a list of [layer, head]) replaces the CMA ranking, which is
otherwise ``experiments.cma.cma_scores(ctx).top_k("id_selection", k)`` (its options via ``cma_n``, ``cma_grid``).

This module also holds the last-token head machinery the other ID-selection experiments (``relabs-patch``,
``binding-errors``) share: ``select_heads`` and ``run_heads`` (capture and/or set/add per-row values of a head list
at the last token, with logits of candidate answers, arg-max and optional generation; ``interventions.EditedRuns``
scores one batch under many edit sets but does not generate, which Table 1's generation accuracy needs).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from dataclasses import dataclass

import numpy as np
import torch

from vismech import hooks, interventions
from vismech.analysis.stats import bootstrap_ci, wilson_ci
from vismech.errors import UserError
from vismech.experiments import behaviour, cma
from vismech.experiments.common import Context
from vismech.experiments.options import Opt
from vismech.scenes import answers
from vismech.scenes.core import Trial
from vismech.scenes.sets import all_cells, knn_protocol, spatial_relation_set
from vismech.scenes.vocab import COLORS, RELATIONS, SHAPES
from vismech.units import unit_type

NAME = "reuse"
DESCRIPTION = "Fig. 5: scene-description position IDs added to ID-selection heads steer the spatial-relation task"
DEFAULTS = {"n": 16, "grid": (3, 3), "k": 100, "alpha": 2.0, "n_estimate": 18, "heads": None, "generate": True,
            "cma_n": cma.DEFAULTS["n"], "cma_grid": cma.DEFAULTS["grid"]}
LIMITS = {"grid": Opt("grid", 2, len(SHAPES))}  # one shape per cell (relation_trials)

Head = tuple[int, int]


# -- last-token head machinery (shared with relabs_patch and binding_errors) -----------------------------------
def select_heads(ctx: Context, k: int, heads=None, condition: str = "id_selection") -> tuple[list[Head], str]:
    """The heads to edit and where they came from: an explicit list, else the top-k of the CMA ranking."""
    vlm = ctx.vlm
    if heads is None:
        heads = ctx.options.get("heads")
    if heads:
        out = [(int(l), int(h)) for l, h in heads]
        for l, h in out:
            if not (0 <= l < vlm.n_layers and 0 <= h < vlm.n_heads):
                raise UserError(f"head ({l}, {h}) is out of range: {vlm.name} has {vlm.n_layers} layers x "
                                f"{vlm.n_heads} heads")
        if len(set(out)) != len(out):
            raise UserError(f"a head is listed twice in {out}")
        return out, "given"
    k = min(int(k), vlm.n_layers * vlm.n_heads)
    return [tuple(map(int, h)) for h in cma.cma_scores(ctx).top_k(condition, k)], f"cma top-{k} {condition}"


def unit_key(ctx: Context, name: str, heads: list[Head]) -> str:
    """A ``ctx.unit`` key naming this experiment's passes under its options, heads and seed (for resuming)."""
    blob = json.dumps({"options": ctx.options, "heads": heads, "seed": ctx.seed}, sort_keys=True, default=str)
    return f"{name}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


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
def _edit_last(vlm, heads: list[Head], values: torch.Tensor, mode: str, length: int, position: int | None = None):
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
    for idx in behaviour.batches(trials, batch_size):
        b = vlm.encode([trials[i] for i in idx])
        v = None if values is None else torch.as_tensor(np.asarray(values)[idx], dtype=torch.float32)

        def edited(v=v, length=b.length, position=b.last):
            return _edit_last(vlm, heads, v, mode, length, position) if v is not None else contextlib.nullcontext()

        with edited(), (hooks.capture(vlm, [("z", l) for l in layers], positions=torch.full((len(idx), 1), b.last))
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


def rate(k: int, n: int) -> dict:
    """A proportion with its Wilson 95% interval (NaN when n = 0)."""
    if n == 0:
        return {"n": 0, "value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    lo, hi = wilson_ci(k, n)
    return {"n": int(n), "value": k / n, "ci_low": float(lo), "ci_high": float(hi)}


def paired_diff(after, before, seed: int = 0) -> dict:
    """Mean of after - before over the same trials, with a percentile bootstrap 95% interval."""
    d = np.asarray(after, float) - np.asarray(before, float)
    if d.size == 0:
        return {"n": 0, "value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    m, lo, hi = bootstrap_ci(d, np.mean, n_boot=1000, seed=seed)
    return {"n": int(d.size), "value": float(m), "ci_low": float(lo), "ci_high": float(hi)}


# -- the experiment ---------------------------------------------------------------------------------------------
def estimation_trials(grid: tuple[int, int], per_cell: int, seed: int) -> list[Trial]:
    """``per_cell`` scene-description contexts per target cell, spread evenly over target identities."""
    cells = all_cells(grid)
    N = len(cells)
    if N > len(SHAPES):
        raise UserError(f"a {grid[0]}x{grid[1]} grid needs {N} unique shapes; there are {len(SHAPES)}")
    conj = list(zip(list(COLORS)[:N], SHAPES[:N]))
    pool = knn_protocol(conj, cells, grid, -(-per_cell // N), seed)
    pool.sort(key=lambda t: (t.meta["trial"], t.meta["target_index"]))
    out = []
    for cell in cells:
        out += [t for t in pool if tuple(t.meta["target_cell"]) == cell][:per_cell]
    return out


def relation_trials(n_per_relation: int, grid: tuple[int, int], seed: int) -> list[Trial]:
    """Spatial-relation trials, the first ``n_per_relation`` of each relation in the set's order."""
    m = 8 * n_per_relation
    while True:
        pool = spatial_relation_set(m, seed, grid)
        out = {r: [t for t in pool if t.meta["relation"] == r][:n_per_relation] for r in RELATIONS}
        if all(len(v) == n_per_relation for v in out.values()) or m > 10_000 * max(1, n_per_relation):
            return [t for r in RELATIONS for t in out[r]]
        m *= 2


def control_cells(trials: list[Trial], seed: int) -> list[tuple[int, int]]:
    """A wrong cell per trial: uniform over the grid's cells other than the answer's."""
    rng = random.Random(seed)
    return [rng.choice([c for c in all_cells(t.scene.grid) if c != t.target.cell]) for t in trials]


def steer(vlm, trials: list[Trial], heads: list[Head], vectors: dict, cells: list, alpha: float,
          controls: list, batch_size: int = 16, gen_tokens: int = 0, progress=None) -> list[dict]:
    """Add alpha * vectors[cells[i]] at the heads for trial i; per-trial outcome rows (answer and control)."""
    values = None if alpha is None else alpha * np.stack([vectors[c] for c in cells])
    cand = [[t.answer, t.scene.at(c).color] for t, c in zip(trials, controls)]
    r = run_heads(vlm, trials, heads, values, "add", cand, gen_tokens=gen_tokens, batch_size=batch_size,
                  progress=progress)
    rows = []
    for i, (t, c) in enumerate(zip(trials, controls)):
        row = {"trial": i, "relation": t.meta["relation"], "target_cell": f"{t.target.cell[0]},{t.target.cell[1]}",
               "control_cell": f"{c[0]},{c[1]}", "answer": t.answer, "control_answer": t.scene.at(c).color,
               "first_token_correct": int(r.cand_hit[i, 0]),
               "first_token_control": int(r.cand_hit[i, 1])}
        if r.texts is not None:
            parsed = answers.parse(t, r.texts[i])
            row.update(generated=r.texts[i], parsed=parsed or "", generation_correct=int(parsed == t.answer),
                       generation_control=int(parsed == row["control_answer"]))
        rows.append(row)
    return rows


def summarize(rows: list[dict], seed: int = 0) -> list[dict]:
    """Accuracy and control-object rate per condition x relation x measure; paired differences vs baseline."""
    out = []
    measures = [m for m in ("first_token", "generation") if f"{m}_correct" in rows[0]]
    conds = list(dict.fromkeys(r["condition"] for r in rows))
    for rel in [*RELATIONS, "all"]:
        sub = [r for r in rows if rel == "all" or r["relation"] == rel]
        for m in measures:
            base = [r for r in sub if r["condition"] == "baseline"]
            for cond in conds:
                rs = [r for r in sub if r["condition"] == cond]
                for stat, col in (("accuracy", f"{m}_correct"), ("control_object_rate", f"{m}_control")):
                    vals = [r[col] for r in rs]
                    out.append({"relation": rel, "condition": cond, "measure": m, "stat": stat,
                                **rate(sum(vals), len(vals))})
                    if cond != "baseline" and len(base) == len(rs):
                        out.append({"relation": rel, "condition": f"{cond}-baseline", "measure": m, "stat": stat,
                                    **paired_diff(vals, [r[col] for r in base], seed)})
    return out


def _figure(ctx: Context, table: list[dict], alpha: float, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rels = [*RELATIONS, "all"]
    conds = [("baseline", "Before", "#999999"), ("target_id", f"After (+{alpha:g} d)", "#1f77b4"),
             ("control_id", "Control (wrong-cell d)", "#d62728")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, stat, ylabel in ((axes[0], "accuracy", "Accuracy"),
                             (axes[1], "control_object_rate", "Answer = wrong cell's object")):
        for j, (cond, label, colour) in enumerate(conds):
            got = {r["relation"]: r for r in table if r["measure"] == "first_token" and r["stat"] == stat
                   and r["condition"] == cond}
            x = np.arange(len(rels)) + (j - 1) * 0.27
            v = np.array([got[r]["value"] for r in rels])
            err = np.array([[got[r]["value"] - got[r]["ci_low"] for r in rels],
                            [got[r]["ci_high"] - got[r]["value"] for r in rels]])
            ax.bar(x, v, 0.27, yerr=err, capsize=2, color=colour, label=label)
        ax.set_xticks(np.arange(len(rels)), [r.capitalize() for r in rels])
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1)
    n = next(r["n"] for r in table if r["relation"] == "above" and r["condition"] == "baseline")
    axes[0].set_title(f"Spatial relation, top-{k} ID-selection heads (n={n} per relation)")
    axes[1].set_title("Control: ID of a wrong cell")
    axes[0].legend(fontsize=8)
    ctx.save_figure(fig, "reuse")


def run(ctx: Context, heads=None) -> dict:
    vlm, grid, alpha = ctx.vlm, tuple(ctx.opt("grid")), float(ctx.opt("alpha"))
    heads, source = select_heads(ctx, ctx.opt("k"), heads)
    est = estimation_trials(grid, int(ctx.opt("n_estimate")), ctx.seed)
    evals = relation_trials(int(ctx.opt("n")), grid, ctx.seed + 1)
    controls = control_cells(evals, ctx.seed + 2)
    gen = behaviour.GEN_TOKENS["spatial_relation"] if ctx.opt("generate") else 0

    def compute():
        with ctx.progress(len(est) + 3 * len(evals), "reuse") as update:
            vecs = interventions.id_vectors(vlm, est, [t.target.cell for t in est], "z", heads,
                                            lambda b: [[b.last]] * len(b), ctx.batch_size)
            vectors = {c: vecs.d(c).numpy() for c in vecs.labels}
            update(len(est))
            rows = []
            for cond, cells, a in (("baseline", [t.target.cell for t in evals], None),
                                   ("target_id", [t.target.cell for t in evals], alpha),
                                   ("control_id", controls, alpha)):
                for r in steer(vlm, evals, heads, vectors, cells, a, controls, ctx.batch_size, gen, update):
                    rows.append({"condition": cond, **r})
        return vectors, rows

    vectors, rows = ctx.unit(unit_key(ctx, NAME, heads), compute)
    table = summarize(rows, ctx.seed)
    for r in table:
        r.update(alpha=alpha, k=len(heads))
    ctx.save_table("reuse_trials", rows)
    ctx.save_table("reuse", table)
    _figure(ctx, table, alpha, len(heads))
    pick = {(r["condition"], r["measure"], r["stat"]): r for r in table if r["relation"] == "all"}
    summary = {"head_source": source, "alpha": alpha, "grid": list(grid), "n_per_relation": int(ctx.opt("n")),
               "n_estimate_per_cell": int(ctx.opt("n_estimate"))}
    for key in (("baseline", "first_token", "accuracy"), ("target_id", "first_token", "accuracy"),
                ("target_id-baseline", "first_token", "accuracy"), ("control_id", "first_token", "accuracy"),
                ("baseline", "first_token", "control_object_rate"),
                ("control_id", "first_token", "control_object_rate")):
        r = pick.get(key)
        summary["_".join(key)] = None if r is None else {k: r[k] for k in ("n", "value", "ci_low", "ci_high")}
    summary["by_relation"] = {r["relation"]: {"before": r["value"], "after": after["value"]}
                              for r in table for after in table
                              if r["condition"] == "baseline" and after["condition"] == "target_id"
                              and r["relation"] == after["relation"] != "all" and r["measure"] == after["measure"]
                              == "first_token" and r["stat"] == after["stat"] == "accuracy"}
    summary["heads"] = [list(h) for h in heads]
    summary["id_vector_norms"] = {f"{c[0]},{c[1]}": float(np.linalg.norm(v)) for c, v in vectors.items()}
    return summary


def _pct(r: dict | None) -> str:
    if not r or r["n"] == 0 or r["value"] != r["value"]:
        return "n/a"
    return f"{100 * r['value']:.0f}% [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}]"


def caption(summary: dict) -> str:
    d = summary["target_id-baseline_first_token_accuracy"]
    return (f"Spatial-relation first-token accuracy {_pct(summary['baseline_first_token_accuracy'])} before and "
            f"{_pct(summary['target_id_first_token_accuracy'])} after adding {summary['alpha']:g} x the "
            f"scene-description ID of the answer's cell (change {100 * d['value']:+.1f} points "
            f"[{100 * d['ci_low']:+.1f}, {100 * d['ci_high']:+.1f}], n={d['n']}). With a wrong cell's ID: accuracy "
            f"{_pct(summary['control_id_first_token_accuracy'])}, answers naming that cell's object "
            f"{_pct(summary['control_id_first_token_control_object_rate'])} (unedited: "
            f"{_pct(summary['baseline_first_token_control_object_rate'])}).")
