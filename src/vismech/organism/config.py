"""The architectures of vismech's model organisms: tiny VLMs of two real HF families, trained from scratch.

No pretrained VLM can be downloaded here, so vismech trains its own small ones on its own scenes. Each organism is
an instance of a real transformers class, configured like ``vismech.models.tiny`` (same word-level tokenizer, same
special-token ids, ``config.architectures`` set) but wide and deep enough to learn the paper's tasks:

- ``qwen2_5_vl``: ``Qwen2_5_VLForConditionalGeneration``. Vision tower of 4 blocks of width 128 (4 heads) with 2-D
  rotary positions, window attention in blocks 0 and 2 (64 px windows, i.e. 4x4 merged tokens, as Qwen2.5-VL's
  112 px windows are 4x4 merged 28 px tokens) and full attention in blocks 1 and 3, 8 px patches merged 2x2 into
  16 px image tokens; language model with M-RoPE (``mrope_section`` [4, 6, 6], the real model's 1/4, 3/8, 3/8
  split of the rotary half-dimension). Objects are 2x2 tokens (32 px): a 2x2 grid is a 160 px canvas, 3x3 224 px.
- ``llava``: ``LlavaForConditionalGeneration``. CLIP vision tower of 4 layers of width 128 with learned absolute
  position embeddings, 112 px input, 8 px patches (a fixed 14x14 token canvas, like LLaVA-1.5's 24x24), features
  of the last layer without the CLS token (``vision_feature_layer=-1``: LLaVA-1.5 uses the penultimate layer
  because CLIP's last one is shaped by its contrastive objective, which this tower never had), the 2-layer GELU
  projector; Llama language model with 1-D RoPE. Objects are 2x2 patches (16 px) on both 2x2 and 3x3 grids.

Both language models: 8 layers x 8 heads of head_dim 32 (hidden 256), 4 key/value heads, MLP width 512, untied
input and output embeddings (as in the 7B models). ``organism_bytes`` counts what a bf16 checkpoint takes (2 bytes a
parameter plus the tokenizer and config files); ``MAX_BYTES`` (12 MB) is the budget every organism must fit.
Every size is a keyword of ``organism_config`` so an experiment can change it (``SMALL_SIZES``: a toy
version of the same geometry for tests), as are ``rope_theta`` and, for ``qwen2_5_vl``, ``mrope_section``.

M-RoPE gives each section a contiguous band of the rotary frequencies ``rope_theta ** (-2j / head_dim)``, highest
first: with the defaults (theta 1e4, head_dim 32) the height section turns 0.1-0.006 rad a row and the width section
at most 0.003 rad a column, so the language model's rotary positions barely tell image columns apart (the real
Qwen2.5-VL, theta 1e6 and head_dim 128, is alike); a smaller ``rope_theta`` spreads all three bands wider.
"""

from __future__ import annotations

import transformers as tf

from vismech.errors import UserError
from vismech.models.wordtok import build_word_tokenizer

ARCHS: tuple[str, ...] = ("qwen2_5_vl", "llava")

#: The most bytes a saved organism may take (weights in bf16 plus tokenizer, configs and card).
MAX_BYTES = 12 * 1000 * 1000
#: Bytes allowed for everything that is not a weight (tokenizer, configs, model card).
OVERHEAD_BYTES = 100 * 1000

#: The token that ends an answer in each architecture's chat format (the label after the answer's words).
END_TOKEN = {"qwen2_5_vl": "<|im_end|>", "llava": "</s>"}

TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, head_dim=32, max_position_embeddings=1024, rope_theta=10000.0)
QWEN_VISION = dict(depth=4, hidden_size=128, intermediate_size=256, num_heads=4, patch_size=8, spatial_merge_size=2,
                   temporal_patch_size=2, window_size=64, fullatt_block_indexes=[1, 3], in_channels=3)
LLAVA_VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                    image_size=112, patch_size=8, projection_dim=128)

#: A much smaller organism of the same geometry (same images, prompts and token layout), for tests and quick CPU
#: checks of the training code: ``organism_config(arch, **SMALL_SIZES[arch])``.
SMALL_SIZES = {
    "qwen2_5_vl": {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16),
                   "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                  fullatt_block_indexes=[1])},
    "llava": {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16),
              "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             projection_dim=32)},
}


def check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise UserError(f"unknown organism architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return arch


def organism_config(arch: str, tok=None, text: dict | None = None, vision: dict | None = None):
    """The HF config of the ``arch`` organism whose vocabulary and special tokens match ``tok`` (default: the
    word tokenizer). ``text`` / ``vision`` override entries of ``TEXT`` and ``QWEN_VISION`` / ``LLAVA_VISION``."""
    check_arch(arch)
    tok = tok or build_word_tokenizer()
    ids = tok.convert_tokens_to_ids
    t = {**TEXT, **(text or {})}
    theta = t.pop("rope_theta")
    section = t.pop("mrope_section", None)
    if section is not None and arch != "qwen2_5_vl":
        raise UserError(f"mrope_section is a setting of the qwen2_5_vl organism's M-RoPE; {arch} has 1-D RoPE")
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **t)
    if arch == "qwen2_5_vl":
        half = t["head_dim"] // 2
        if section is None:
            section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        elif len(section) != 3 or sum(section) != half or min(section) < 0:
            raise UserError(f"mrope_section must be 3 non-negative sizes (temporal, height, width) summing to "
                            f"head_dim / 2 = {half}, not {section!r}")
        text_cfg = dict(common, rope_parameters={"rope_type": "default", "mrope_section": section,
                                                 "rope_theta": theta})
        v = {**QWEN_VISION, **(vision or {})}
        v["out_hidden_size"] = t["hidden_size"]
        cfg = tf.Qwen2_5_VLConfig(text_config=text_cfg, vision_config=v, image_token_id=ids("<|image_pad|>"),
                                  video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                                  vision_end_token_id=ids("<|vision_end|>"))
        cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    else:
        v = tf.CLIPVisionConfig(**{**LLAVA_VISION, **(vision or {})})
        text_cfg = tf.LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": theta})
        cfg = tf.LlavaConfig(vision_config=v, text_config=text_cfg, image_token_id=ids("<image>"),
                             vision_feature_layer=-1, vision_feature_select_strategy="default",
                             projector_hidden_act="gelu")
        cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def build_organism(arch: str, seed: int = 0, **sizes):
    """(model, tokenizer, image_processor) of a freshly initialised ``arch`` organism, fp32, seeded."""
    import torch

    from vismech.models.families import FAMILIES

    tok = build_word_tokenizer(family=arch)  # its chat template is saved with it
    cfg = organism_config(arch, tok, **sizes)
    torch.manual_seed(seed)
    model = FAMILIES[arch].model_class()(cfg)
    return model, tok, FAMILIES[arch].image_processor_for(cfg)


def count_params(arch: str, **sizes) -> int:
    """Parameters of the ``arch`` organism, counted on the meta device (no memory, no time)."""
    import torch

    from vismech.models.families import FAMILIES

    cfg = organism_config(arch, **sizes)
    with torch.device("meta"):
        model = FAMILIES[arch].model_class()(cfg)
    return sum(p.numel() for p in model.parameters())


def organism_bytes(arch: str, **sizes) -> int:
    """Upper estimate of a saved bf16 organism: 2 bytes a parameter plus ``OVERHEAD_BYTES``."""
    return 2 * count_params(arch, **sizes) + OVERHEAD_BYTES
