"""Organisms trained in stages: weights taken from a trained organism (its vision tower and projector, or every
weight); ``card.reproduce_of`` reads the commands of the stages before from its model card."""

from __future__ import annotations

import re

import torch

from vismech.errors import UserError


def is_vision(name: str, arch: str) -> bool:
    """Whether parameter ``name`` belongs to the vision tower or projector of an ``arch`` organism (the modules
    its family spec names: ``Family.vision_modules``)."""
    from vismech.models.families import FAMILIES

    return any(name.startswith(f"model.{m}.") for m in FAMILIES[arch].vision_modules)


def is_frozen_through(name: str, layer: int) -> bool:
    """Whether language-model parameter ``name`` lies at or before ``layer``: the text embeddings and layers 0 to
    ``layer`` (what a repair after an edit of that layer keeps: ``train_organism``'s ``freeze_through``)."""
    m = re.match(r"model\.language_model\.layers\.(\d+)\.", name)
    return "embed_tokens" in name or (m is not None and int(m.group(1)) <= layer)


def load_weights(model, arch: str, source: str, everything: bool = False) -> int:
    """Copy the vision tower and projector (``everything``: all weights) of the trained organism ``source`` (a name
    such as ``organism`` or a checkpoint folder) into ``model``; returns the number of tensors copied. The
    architectures must match."""
    from vismech.models.load import load_vlm

    flag = "--init-from" if everything else "--vision-from"
    keep = (lambda n: True) if everything else (lambda n: is_vision(n, arch))  # noqa: E731
    other = load_vlm(source, dtype="fp32", device="cpu").model
    theirs = {n: t for n, t in other.state_dict().items() if keep(n)}
    mine = {n: t for n, t in model.state_dict().items() if keep(n)}
    if not any(is_vision(n, arch) for n in theirs):
        raise UserError(f"{flag} {source}: no {arch} vision tower in it (an organism of another "
                        "architecture?); give a checkpoint of the same --arch")
    bad = sorted(n for n in mine if n not in theirs or theirs[n].shape != mine[n].shape)
    if bad or len(theirs) != len(mine):
        raise UserError(f"{flag} {source}: its weights differ from this organism's ({len(bad)} tensors missing or "
                        f"of another shape, e.g. {(bad or sorted(set(theirs) - set(mine)))[0]}); train with the "
                        "same --sizes as that organism")
    with torch.no_grad():
        for n, t in model.state_dict().items():
            if n in theirs:
                t.copy_(theirs[n])
    return len(theirs)
