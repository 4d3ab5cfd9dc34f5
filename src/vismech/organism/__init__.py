"""Model organisms: tiny VLMs of real HF architectures (Qwen2.5-VL, LLaVA) trained from scratch on vismech's scenes.

``config`` defines the architectures and their size budget, ``data`` the task mixture fed through the analysis
adapter, ``transfer`` how its batches reach the device, ``train`` the training loop (``train_organism``) and
``resume`` the state it resumes from, ``card`` the model card. The output is an ordinary HF
checkpoint that ``vismech.models.load.load_vlm(DIR)`` loads like any real model.
"""

import importlib

# loaded on first use, so that the torch-free parts (``plant_flags``, read by the command-line parser) stay light
_WHERE = {**dict.fromkeys(("ARCHS", "MAX_BYTES", "SMALL_SIZES", "build_organism", "count_params", "organism_bytes",
                           "organism_config"), "config"),
          **dict.fromkeys(("train_organism", "TrainResult"), "train")}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
