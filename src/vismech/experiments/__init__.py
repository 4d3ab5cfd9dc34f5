"""One short module per paper figure or table; the CLI and the report only ever call these.

``EXPERIMENTS`` maps each experiment name to its module; ``get(name)`` imports it with a clear error for unknown
names. The order of ``EXPERIMENTS`` is the order ``vismech run all`` runs them in (CMA before the experiments that
use its head rankings); ``all`` leaves out ``NOT_IN_ALL``.
"""

from __future__ import annotations

import importlib

from vismech.errors import UserError

#: name -> module (relative to this package), in run order
EXPERIMENTS: dict[str, str] = {
    "behaviour": ".behaviour",
    "pca": ".pca",
    "rsa": ".rsa",
    "rsa-relative": ".rsa_relative",
    "entropy": ".entropy",
    "cma": ".cma",
    "id-intervention": ".id_intervention",
    "key-intervention": ".key_intervention",
    "reuse": ".reuse",
    "relabs-patch": ".relabs_patch",
    "binding-errors": ".binding_errors",
    "counting-ablation": ".counting_ablation",
    "coco": ".coco",
    "recovery": ".recovery",
}

#: Experiments that ``all`` leaves out: not figures of the paper, and they need something only some models have
#: (``recovery`` needs declared ground truth); run them by name.
NOT_IN_ALL: tuple[str, ...] = ("recovery",)


def get(name: str):
    if name not in EXPERIMENTS:
        raise UserError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)} or all")
    return importlib.import_module(EXPERIMENTS[name], __name__)
