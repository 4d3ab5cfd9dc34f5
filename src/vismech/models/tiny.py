"""Tiny random instances of the real HF VLM classes, built from config objects in milliseconds.

``tiny:FAMILY`` models are for tests: the real architecture (vision tower, projector, language model, rotary
scheme) at toy width, with vismech's offline word-level tokenizer and the family's own image processor. Their
numbers mean nothing; their shapes, token layouts and code paths are the real ones.
"""

from __future__ import annotations

import torch
import transformers as tf

from .wordtok import build_word_tokenizer


def _text_kwargs(tok, **over):
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              tie_word_embeddings=False)
    kw.update(over)
    return kw


def tiny_config(family: str, tok=None) -> tf.PretrainedConfig:
    """The tiny config of ``family`` whose vocabulary matches ``tok`` (the word tokenizer by default)."""
    tok = tok or build_word_tokenizer()
    ids = tok.convert_tokens_to_ids
    if family in ("qwen2_vl", "qwen2_5_vl"):
        text = _text_kwargs(tok, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                  "rope_theta": 10000.0})
        if family == "qwen2_5_vl":
            vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                          fullatt_block_indexes=[1], in_channels=3)
            cls = tf.Qwen2_5_VLConfig
        else:
            vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                          spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
            cls = tf.Qwen2VLConfig
        cfg = cls(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                  video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                  vision_end_token_id=ids("<|vision_end|>"))
        cfg.architectures = [cls.__name__.replace("Config", "ForConditionalGeneration")]
    elif family == "llava":
        vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=56, patch_size=4, projection_dim=32)
        text = tf.LlamaConfig(**_text_kwargs(tok))
        cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=ids("<image>"),
                             vision_feature_layer=-1, vision_feature_select_strategy="default")
        cfg.architectures = ["LlavaForConditionalGeneration"]
    elif family == "llava_onevision":
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=56, patch_size=4)
        text = tf.Qwen2Config(**_text_kwargs(tok))
        cfg = tf.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=ids("<image>"),
                                      video_token_id=ids("<video>"), image_grid_pinpoints=[[56, 56]],
                                      vision_feature_layer=-1, vision_feature_select_strategy="full")
        cfg.architectures = ["LlavaOnevisionForConditionalGeneration"]
    elif family == "idefics2":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=56, patch_size=4)
        perceiver = dict(resampler_n_latents=16, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=16,
                         num_key_value_heads=2)
        text = tf.MistralConfig(**_text_kwargs(tok))
        cfg = tf.Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text,
                                image_token_id=ids("<image>"))
        cfg.architectures = ["Idefics2ForConditionalGeneration"]
    else:
        raise ValueError(f"no tiny config for family {family!r}")
    return cfg


def build_tiny(family: str, seed: int = 0):
    """(model, tokenizer) of a tiny random ``family`` model, fp32, eval mode, seeded."""
    from .families import FAMILIES

    tok = build_word_tokenizer(family=family)
    cfg = tiny_config(family, tok)
    torch.manual_seed(seed)
    model = FAMILIES[family].model_class()(cfg).eval()
    return model, tok
