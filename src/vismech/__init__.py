"""vismech: find, measure and edit the position-ID binding mechanisms of vision-language models.

The main names, for scripts and notebooks::

    import vismech
    vlm = vismech.load("organism")                      # HF id, local dir, organism, tiny:FAMILY, random:PRESET
    res = vismech.run(["rsa", "cma"], vlm=vlm, out="runs/x", n=8)
    res["cma"], res.table("rsa")

Layers, each importing only the ones before it (``tests/test_layers.py`` checks it): ``errors``/``distributed``/
``store`` -> ``scenes`` (stimuli, no torch) -> ``analysis`` (numbers from arrays) -> ``models`` (adapters) ->
``engine`` (hooks, activations, patching, interventions, edits) -> ``experiments`` (one module per figure or
table) -> ``organism`` (the trainer) -> ``app`` (runner, report, CLI). Importing ``vismech`` loads none of them
(and no plotting backend) until a name is used.
"""

from vismech.version import __version__

#: name -> (module, attribute or None for the module itself), imported on first use
_LAZY = {
    "run": ("vismech.api", "run"),
    "load": ("vismech.api", "load"),
    "Results": ("vismech.api", "Results"),
    "load_vlm": ("vismech.models.load", "load_vlm"),
    "VLM": ("vismech.models.vlm", "VLM"),
    "UserError": ("vismech.errors", "UserError"),
    "EXPERIMENTS": ("vismech.experiments", "EXPERIMENTS"),
    "Context": ("vismech.experiments.common", "Context"),
    "hooks": ("vismech.engine.hooks", None),
    "patching": ("vismech.engine.patching", None),
    "activations": ("vismech.engine.activations", None),
    "interventions": ("vismech.engine.interventions", None),
    "scenes": ("vismech.scenes", None),
    "analysis": ("vismech.analysis", None),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vismech' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
