"""Real-size architectures with random weights: ``random:PRESET``.

Each preset holds the published ``config.json`` values of one Hugging Face checkpoint, so that
``random_weights.build_random(name)`` gives the exact module tree and parameter shapes of that model with freshly
initialised (random) weights and no download. On ``device="meta"`` nothing is allocated, which makes
parameter counting and module-path discovery of a 32B model take about a second. Each family's presets live in
its spec module (``Family.presets``, a ``Preset`` each); ``PRESETS`` lists them all, families in registry order.

Values were taken from the checkpoints' ``config.json`` as quoted in public code (third-party loaders,
conversion scripts, tests) found with the project's search tools; where no quote was found the value is
derived from the base language / vision model's own published config, and the comment next to it says
so. Only architecture-relevant keys are kept (sizes, vocab, norms, rope, special token ids); generation
settings are left out.

Parameter counts: ``sum(p.numel() for p in model.parameters())``. ``nn.Module.parameters()`` yields a
shared (tied) tensor once, and the Hub's "Model size" figure is computed from the safetensors files, which
store a tied tensor once as well, so tied embeddings are counted once on both sides (only Qwen2.5-VL-3B
ties its input and output embeddings among these presets).
"""

from __future__ import annotations

from vismech.errors import UserError

from .families import FAMILIES, Preset

__all__ = ["PRESETS", "Preset", "get_preset", "preset_names"]


def _collect() -> dict[str, Preset]:
    """The presets every family spec declares itself (``presets`` in its own class body; a subclass does not
    inherit its parent's), families in registry order."""
    out: dict[str, Preset] = {}
    for spec in FAMILIES.values():
        for p in vars(type(spec)).get("presets", ()):
            if p.name in out:
                raise RuntimeError(f"two presets are named {p.name!r}")
            if p.family != spec.name:
                raise RuntimeError(f"preset {p.name!r} of family {spec.name!r} says its family is {p.family!r}")
            out[p.name] = p
    return out


PRESETS: dict[str, Preset] = _collect()


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """Look a preset up by name; ``random:`` prefix allowed. Unknown names raise ``ValueError``."""
    key = name[len("random:"):] if name.startswith("random:") else name
    try:
        return PRESETS[key]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
