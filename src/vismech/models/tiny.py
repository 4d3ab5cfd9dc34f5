"""Tiny random instances of the real HF VLM classes, built from config objects in milliseconds.

``tiny:FAMILY`` models are for tests: the real architecture (vision tower, projector, language model, rotary
scheme) at toy width, with vismech's offline word-level tokenizer and the family's own image processor. Their
numbers mean nothing; their shapes, token layouts and code paths are the real ones. Each family's spec holds its
tiny config (``Family.tiny_config``).
"""

from __future__ import annotations

import torch
import transformers as tf

from .families import FAMILIES
from .wordtok import build_word_tokenizer


def _spec(family: str):
    if family not in FAMILIES:
        raise ValueError(f"no tiny config for family {family!r}")
    return FAMILIES[family]


def tiny_config(family: str, tok=None) -> tf.PretrainedConfig:
    """The tiny config of ``family`` whose vocabulary matches ``tok`` (the family's word tokenizer by default)."""
    spec = _spec(family)
    return spec.tiny_config(tok or build_word_tokenizer(family=family))


def build_tiny(family: str, seed: int = 0):
    """(model, tokenizer) of a tiny random ``family`` model, fp32, eval mode, seeded."""
    spec = _spec(family)
    tok = build_word_tokenizer(family=family)
    cfg = spec.tiny_config(tok)
    torch.manual_seed(seed)
    model = spec.model_class()(cfg).eval()
    # a weight matrix the class initialises to zero (Gemma 3's image projection, zero until trained) would make the
    # tiny model ignore what it feeds: it is drawn like the others
    std = getattr(cfg, "initializer_range", None) or getattr(cfg.get_text_config(), "initializer_range", 0.02)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, std)
    return model, tok
