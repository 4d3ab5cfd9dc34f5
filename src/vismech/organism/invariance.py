"""The invariance terms of planting (``plant.plant_loss``): a declared head's output must be the same in a base row
and a source row that differs from it only in features its variable does not carry.

- ``invariance`` (ID retrieval): the source has one described object's colour and shape replaced at the same cell
  (``causal_model.mention_feature_source``); the retrieval heads' outputs at that mention's last word.
- ``invariance_s`` (ID selection): the gathering heads over the same sources, the selection heads over the feature
  sources of the F interchange (the target's features replaced at its cell, same prompt), both at the prompt's last
  token. Without it the gathering heads pass on the described objects' words as well as their cells, and part of
  the answer excludes the described objects by their words (``docs/organism-ids.md``, the eighth attempt).
- ``invariance_k`` (keys): the selection and feature heads' keys at the target's image tokens, over the F
  interchange's sources: the heads that fetch by position must find the target by its cell code, their values alone
  carrying its features. Without it the feature heads' own attention skipped a described object by its features in
  the image (``docs/organism-ids.md``, the eighth attempt: the base answer stayed with every head before them patched).

Each pair's term is the squared difference of the two outputs over the sum of their squared norms: 0 when equal.

- ``guard`` (ID retrieval, over the whole batch rather than pairs): the share of the mentioned objects' colour and
  shape (one-hot, centred) that a least-squares linear read-out of the retrieval heads' outputs at the mentions'
  last words explains, fitted on the batch's own mentions (``guard``). Zero when every colour and every shape has the
  same mean output, which is the condition under which no linear probe reads them (LEACE: Belrose et al. 2023). The
  pair terms above leave a small direction that moves with the features in every row; a probe still reads it
  (``docs/organism-ids.md``: 99% colour with the invariance gap at 0.3%), and erasing it after training broke the
  answers, so this asks for it during planting.
"""

from __future__ import annotations

import torch


def gap(z: dict, heads, rows_b: torch.Tensor, pos_b: torch.Tensor, rows_s: torch.Tensor,
        pos_s: torch.Tensor) -> torch.Tensor:
    """[pairs, heads]: each head of ``heads`` ((layer, head) pairs), its output z at (rows_b, pos_b) against the
    same head's at (rows_s, pos_s)."""
    terms = []
    for layer in sorted({a for a, _ in heads}):
        hs = [h for a, h in heads if a == layer]
        zb, zs = z[layer][rows_b, pos_b][:, hs].float(), z[layer][rows_s, pos_s][:, hs].float()
        terms.append(((zb - zs) ** 2).sum(-1) / (zb.pow(2).sum(-1) + zs.pow(2).sum(-1) + 1e-6))
    return torch.cat(terms, -1)


def head_outputs(z: dict, heads, where: torch.Tensor) -> torch.Tensor:
    """[n, heads * head_dim], fp32: the outputs of ``heads`` ((layer, head) pairs; concatenated layer by layer) at
    ``where`` ([n, 2]: row, position)."""
    return torch.cat([z[layer][where[:, 0], where[:, 1]][:, [h for a, h in heads if a == layer]].flatten(1).float()
                      for layer in sorted({a for a, _ in heads})], -1)


def guard(z: dict, heads, where: torch.Tensor, labels: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """The mean over the columns of ``labels`` ([n, k] class indices) of R^2: the share of the centred one-hot
    labels' variance explained by the least-squares fit from the heads' outputs (concatenated) at ``where`` ([n, 2]:
    row, position). ``ridge``, times the outputs' mean variance, keeps the fit defined where they are degenerate."""
    x = head_outputs(z, heads, where)
    x = x - x.mean(0)
    cov = x.T @ x / len(x)
    cov = cov + ridge * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(len(cov), device=x.device)
    parts = []
    for col in labels.T:
        y = torch.nn.functional.one_hot(col, int(col.max()) + 1).float()
        y = y - y.mean(0)
        cross = x.T @ y / len(x)  # [d, classes]
        parts.append((cross * torch.linalg.solve(cov, cross)).sum() / (y.pow(2).sum() / len(y)).clamp_min(1e-12))
    return torch.stack(parts).mean()


def terms(spec, batch: dict, z: dict, group: int = 1) -> dict[str, torch.Tensor]:
    """The invariance and guard losses the batch has rows for (``plant_batch``: ``inv_where``, ``f_pairs``,
    ``last_pos``, ``k_where``, ``mention_where`` and ``guard_labels``); ``z`` holds the clean rows' head outputs by
    layer and, with ``invariance_k``, their keys by ("k", layer) (``plant.clean_forward``); ``group`` query heads
    share a key head."""
    out = {}
    inv = batch.get("inv_where")
    if inv is not None and len(inv):
        out["invariance"] = gap(z, spec.retrieval, inv[:, 0], inv[:, 2], inv[:, 1], inv[:, 2]).mean()
    if spec.weight("invariance_s") and "f_pairs" in batch:
        last, parts, gathered = batch["last_pos"], [], inv[:, :2] if inv is not None else None
        for heads, pairs in ((spec.gathering, gathered), (spec.selection, batch["f_pairs"])):
            if pairs is not None and len(pairs):
                b, s = pairs[:, 0], pairs[:, 1]
                parts.append(gap(z, heads, b, last[b], s, last[s]).flatten())
        if parts:
            out["invariance_s"] = torch.cat(parts).mean()
    gw = batch.get("mention_where")
    if spec.weight("guard") and gw is not None and len(gw) > 1:
        out["guard"] = guard(z, spec.retrieval, gw, batch["guard_labels"])
    kw = batch.get("k_where")
    if spec.weight("invariance_k") and kw is not None and len(kw):
        keys = {layer: z[("k", layer)] for layer in key_layers(spec)}
        out["invariance_k"] = gap(keys, key_heads(spec, group), kw[:, 0], kw[:, 1], kw[:, 2], kw[:, 3]).mean()
    return out


def key_layers(spec) -> list[int]:
    return sorted({layer for layer, _ in spec.selection + spec.features})


def key_heads(spec, group: int) -> list[tuple[int, int]]:
    """The key heads (layer, key/value head) that the selection and feature heads read."""
    return sorted({(layer, head // group) for layer, head in spec.selection + spec.features})
