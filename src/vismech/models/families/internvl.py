"""InternVL 3 and 3.5, the transformers-native class (the "-hf" checkpoints): InternViT patches of 448 px tiles
pixel-shuffled 2x2 into 256 tokens per tile, dynamic tiling with a thumbnail, a Qwen2 (3) or Qwen3 (3.5) language
model."""

from __future__ import annotations

import transformers as tf

from vismech.scenes.core import Geometry

from ..framing import ChatFormat
from .base import (DEFAULT_SITES, Family, ImageInputs, Preset, _get, image_processor_class, normed_qk_sites,
                   text_kwargs, tiled_cell_offsets, tiled_views)


# --------------------------------------------------------------------------------------------------
# Published configs: transformers' InternVL conversion (InternVL3) and OpenGVLab's (InternVL3.5) write
# InternVLConfig(text_config=<the original llm_config>, vision_config=InternViT-300M-448px-V2.5). The
# top-level tie_word_embeddings defaults to True in InternVLConfig: the checkpoints store lm_head apart
# (their safetensors sizes match only the untied count), so it is set False here.
# --------------------------------------------------------------------------------------------------

_INTERNVIT_300M = dict(
    model_type="internvl_vision", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
    intermediate_size=4096, attention_bias=True, use_qk_norm=False, hidden_act="gelu", norm_type="layer_norm",
    layer_norm_eps=1e-6, image_size=[448, 448], patch_size=[14, 14], num_channels=3, use_mask_token=False,
    use_absolute_position_embeddings=True, layer_scale_init_value=0.1, use_mean_pooling=True,
)
_TOP = dict(image_token_id=151667, image_seq_length=256, downsample_ratio=0.5, projector_hidden_act="gelu",
            vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)


def _text(model_type, *, vocab, hidden, inter, layers, heads, kv_heads, max_pos, **extra) -> dict:
    return dict(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_act="silu",
                max_position_embeddings=max_pos, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, bos_token_id=151643,
                eos_token_id=151645, tie_word_embeddings=False, **extra)


def _preset(name, published, source, text) -> Preset:
    return Preset(name, "internvl", published, source, f"OpenGVLab/{name}",
                  dict(vision_config=dict(_INTERNVIT_300M), text_config=text, **_TOP))


_INTERNVL3_2B = _preset(
    "InternVL3-2B-hf", 2.09e9,
    "config: InternViT-300M-448px-V2.5 (1024/24 layers/16 heads/4096, 448 px, patch 14) + Qwen2.5-1.5B shape "
    "(1536/8960/28 layers/12 heads/2 kv, vocab 151674 with the InternVL tokens), as quoted in public code and "
    "transformers' conversion script; params: HF model page (2.09B; model.safetensors 4.18 GB bf16)",
    _text("qwen2", vocab=151674, hidden=1536, inter=8960, layers=28, heads=12, kv_heads=2, max_pos=32768,
          use_sliding_window=False),
)
_INTERNVL3_8B = _preset(
    "InternVL3-8B-hf", 7.94e9,
    "config: InternViT-300M-448px-V2.5 + Qwen2.5-7B shape (3584/18944/28 layers/28 heads/4 kv, vocab 151674); "
    "params: HF model page (7.94B; four shards of 15.89 GB bf16)",
    _text("qwen2", vocab=151674, hidden=3584, inter=18944, layers=28, heads=28, kv_heads=4, max_pos=32768,
          use_sliding_window=False),
)
_INTERNVL3_5_8B = _preset(
    "InternVL3_5-8B-HF", 8.5e9,
    "config: InternViT-300M-448px-V2.5 + Qwen3-8B (4096/12288/36 layers/32 heads/8 kv, head_dim 128, q/k norms, "
    "vocab 151936); image_token_id 151667 per OpenGVLab's conversion script (a third-party config shows 151671: "
    "check a real checkpoint); params: model card (8.5B = vision 0.3B + language 8.2B)",
    _text("qwen3", vocab=151936, hidden=4096, inter=12288, layers=36, heads=32, kv_heads=8, max_pos=40960,
          head_dim=128),
)

#: Qwen3's queries and keys are RMS-normed per head on [batch, pos, heads, dim], before rotary embedding
_NORMED_SITES = normed_qk_sites("bthd")


class InternVL(Family):
    name = "internvl"
    order = 8
    class_name = "InternVLForConditionalGeneration"
    config_class = "InternVLConfig"
    presets = (_INTERNVL3_2B, _INTERNVL3_8B, _INTERNVL3_5_8B)
    # 448 px tiles, 14 px patches shuffled 2x2 into 28 px tokens: 16 x 16
    default_geometry = Geometry(28, canvas_tokens=16)
    image_token = placeholder = "<IMG_CONTEXT>"
    # the -hf checkpoints' template (ChatML, no system prompt): "<|im_start|>user\n<IMG_CONTEXT>\nQUESTION
    # <|im_end|>\n<|im_start|>assistant\n"; vismech's own models read the same
    chat = vismech_chat = ChatFormat("<|im_start|>user\n", "<IMG_CONTEXT>\n", "", "<|im_end|>\n",
                                     "<|im_start|>assistant\n", "<|im_start|>assistant\n", "<|im_end|>\n")
    plain_format = "{image}\n{text}"
    vision_modules = ("vision_tower", "multi_modal_projector")
    special_tokens = ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>")
    config_tokens = {"image_token_id": "<IMG_CONTEXT>"}

    _patch: int = 14
    _merge: int = 2

    def bind(self, config):
        self._patch = config.vision_config.patch_size[0]
        self._merge = round(1 / config.downsample_ratio)
        # InternVL3.5's Qwen3 norms its queries and keys (InternVL3's Qwen2 does not)
        self.sites = _NORMED_SITES if config.get_text_config().model_type.startswith("qwen3") else DEFAULT_SITES
        return self

    def tiny_config(self, tok):
        # the InternVL3.5 layout (Qwen3 with q/k norms); 56 px tiles, 4 px patches (14 x 14) shuffled to 7 x 7
        vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      attention_bias=True, use_qk_norm=False, hidden_act="gelu", norm_type="layer_norm",
                      layer_norm_eps=1e-6, image_size=[56, 56], patch_size=[4, 4],
                      use_absolute_position_embeddings=True, layer_scale_init_value=0.1, use_mean_pooling=True)
        text = tf.Qwen3Config(**text_kwargs(tok, head_dim=16))
        cfg = tf.InternVLConfig(vision_config=vision, text_config=text, **{
            **_TOP, "image_token_id": tok.convert_tokens_to_ids("<IMG_CONTEXT>"), "image_seq_length": 49})
        cfg.architectures = [self.class_name]
        return cfg

    # -- geometry and images -------------------------------------------------------------------------------
    def geometry(self, config, image_processor) -> Geometry:
        patch, merge = config.vision_config.patch_size[0], round(1 / config.downsample_ratio)
        size = getattr(image_processor, "size", None)
        tile = int((_get(size, "height") if size else None) or config.vision_config.image_size[0])
        return Geometry(patch * merge, canvas_tokens=tile // patch // merge)

    def image_processor_for(self, config):
        # one tile: the image is squashed to the tower's size (what vismech draws it at)
        s = config.vision_config.image_size[0]
        return image_processor_class("GotOcr2ImageProcessor")(
            size={"height": s, "width": s}, crop_to_patches=True, max_patches=1, image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225], resample=3)

    def process_images(self, image_processor, images) -> ImageInputs:
        # as InternVLProcessor calls it: dynamic tiling on (one tile for a square at tile size)
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        out = image_processor(images=images, crop_to_patches=True, return_tensors="pt")
        tile = out["pixel_values"].shape[-1]
        g = tile // self._patch // self._merge
        extra = []
        for im, k in zip(images, [int(k) for k in out["num_patches"]]):
            if k == 1:
                extra.append((0, 0, tile))
                continue
            lo, hi = getattr(image_processor, "min_patches", 1), getattr(image_processor, "max_patches", 12)
            cols, rows = get_optimal_tiled_canvas((im.height, im.width), (tile, tile), lo, hi)
            if rows * cols + 1 != k:
                raise ValueError(f"the image processor cut a {im.width}x{im.height} image into {k} tiles, not the "
                                 f"{rows}x{cols} + 1 vismech expects; this transformers version tiles differently")
            extra.append((rows, cols, tile))
        n = [(r * c + 1 if r else 1) * g * g for r, c, _ in extra]
        return ImageInputs({"pixel_values": out["pixel_values"]}, n, [(g, g)] * len(images), extra)

    def picture_views(self, image_processor, image_size, grid, extra):
        rows, cols, tile = extra
        return tiled_views(image_size, grid[0], self._patch * self._merge, rows, cols, tile)

    def cell_offsets(self, layout, cell, n_tokens, grid, extra):
        return tiled_cell_offsets(self, layout, cell, n_tokens, grid, extra)

    def expand_placeholder(self, text, at, n_tokens, extra, processor=True):
        # InternVLProcessor: <img> + the tiles' tokens, one run + </img> (vismech's own models read the same)
        run = "<img>" + self.image_token * n_tokens + "</img>"
        end = at + len(self.image_token)
        return text[:at] + run + text[end:], len(run) - len(self.image_token)
