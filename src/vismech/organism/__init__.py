"""Model organisms: tiny VLMs of real HF architectures (Qwen2.5-VL, LLaVA) trained from scratch on vismech's scenes.

``config`` defines the architectures and their size budget, ``data`` the task mixture fed through the analysis
adapter, ``train`` the training loop (``train_organism``) and ``resume`` the state it resumes from, ``card`` the
model card. The output is an ordinary HF
checkpoint that ``vismech.models.load.load_vlm(DIR)`` loads like any real model.
"""

from .config import ARCHS, MAX_BYTES, SMALL_SIZES, build_organism, count_params, organism_bytes, organism_config
from .train import TrainResult, train_organism

__all__ = ["ARCHS", "MAX_BYTES", "SMALL_SIZES", "build_organism", "count_params", "organism_bytes",
           "organism_config", "train_organism", "TrainResult"]
