"""The supported VLM families: one spec (``base.Family``) per family, one module per family in this package.

Every module here is imported and every ``Family`` subclass in it that sets its own ``name`` is registered, so a
new family is a new module (and its tests) and nothing else. The registry:

- ``FAMILIES``: name -> spec instance, in listing order (``Family.order``, then name);
- ``MODEL_TYPES``: config ``model_type`` -> family name (``Family.model_types``, default the family's name);
- ``DEFAULT_GEOMETRY``: name -> the token geometry of the family's real checkpoints;
- ``family_for_config``: the spec for a loaded config, bound to its sizes.
"""

from __future__ import annotations

import importlib
import pkgutil

from vismech.errors import UserError
from vismech.scenes.core import Geometry

from .base import DEFAULT_SITES, Family, ImageInputs, Preset, Site, image_processor_class, text_kwargs

__all__ = ["DEFAULT_GEOMETRY", "DEFAULT_SITES", "FAMILIES", "MODEL_TYPES", "Family", "ImageInputs", "Preset", "Site",
           "family_for_config", "image_processor_class", "text_kwargs"]


def _discover() -> list[Family]:
    specs: list[type[Family]] = []
    for info in pkgutil.iter_modules(__path__):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, Family) and obj.__module__ == module.__name__
                    and "name" in vars(obj)):
                specs.append(obj)
    return [cls() for cls in sorted(specs, key=lambda c: (c.order, c.name))]


def _registry(specs: list[Family]) -> tuple[dict[str, Family], dict[str, str]]:
    families: dict[str, Family] = {}
    model_types: dict[str, str] = {}
    for spec in specs:
        if spec.name in families:
            raise RuntimeError(f"two family specs are named {spec.name!r}")
        families[spec.name] = spec
        for mt in spec.model_types or (spec.name,):
            if mt in model_types:
                raise RuntimeError(f"model_type {mt!r} is claimed by families {model_types[mt]!r} and {spec.name!r}")
            model_types[mt] = spec.name
    return families, model_types


FAMILIES, MODEL_TYPES = _registry(_discover())

#: The token geometry of the real checkpoints of each family (what ``vismech stimuli --model FAMILY`` renders for).
DEFAULT_GEOMETRY: dict[str, Geometry] = {name: spec.default_geometry for name, spec in FAMILIES.items()}


def family_for_config(config) -> Family:
    """The spec for a loaded config, bound to its sizes; a clear error for unsupported architectures."""
    fam = MODEL_TYPES.get(getattr(config, "model_type", None))
    if fam is None:
        raise UserError(
            f"model type {getattr(config, 'model_type', None)!r} is not supported; vismech supports "
            f"{', '.join(sorted(FAMILIES))} (see `vismech models`)"
        )
    return type(FAMILIES[fam])().bind(config)
