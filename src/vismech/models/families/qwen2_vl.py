"""Qwen2-VL and Qwen2.5-VL: a ViT whose 14 px patches are merged 2x2 into 28 px tokens on a free canvas, and
M-RoPE (3-D rotary positions) in the language model."""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf

from vismech.scenes.core import Geometry
from vismech.scenes.regions import View

from ..framing import ChatFormat
from .base import Family, ImageInputs, Preset, image_processor_class, text_kwargs

QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


# --------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL. Text keys are nested under ``text_config`` (transformers 5.x layout); the Hub
# config.json has them flat at top level, with ``rope_scaling={"type": "mrope", ...}`` that 5.x stores
# as ``rope_parameters`` with rope_type "default".
# --------------------------------------------------------------------------------------------------

_QWEN_TOKEN_IDS = dict(
    image_token_id=151655,
    video_token_id=151656,
    vision_start_token_id=151652,
    vision_end_token_id=151653,
)


def _qwen_text(model_type: str, *, vocab, hidden, inter, layers, heads, kv_heads, max_pos, max_window,
               sliding_window=32768) -> dict[str, Any]:
    return dict(
        model_type=model_type,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_act="silu",
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        sliding_window=sliding_window,
        max_window_layers=max_window,
        attention_dropout=0.0,
        bos_token_id=151643,
        eos_token_id=151645,
        # mrope_section sums to head_dim / 2 = 64 for every preset here (head_dim 128).
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    )


def _qwen2_5_vision(out_hidden_size: int) -> dict[str, Any]:
    # Identical ViT for 3B / 7B / 32B; only the merger's output width follows the LLM.
    return dict(
        model_type="qwen2_5_vl_vision",
        depth=32,
        hidden_size=1280,
        hidden_act="silu",
        intermediate_size=3420,
        num_heads=16,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=2,
        window_size=112,
        out_hidden_size=out_hidden_size,
        fullatt_block_indexes=[7, 15, 23, 31],
    )


def _qwen2_5_vl(name, hf_id, published, source, *, vocab, hidden, inter, layers, heads, kv_heads, tie,
                max_window) -> Preset:
    text = _qwen_text("qwen2_5_vl_text", vocab=vocab, hidden=hidden, inter=inter, layers=layers, heads=heads,
                      kv_heads=kv_heads, max_pos=128000, max_window=max_window)
    text["tie_word_embeddings"] = tie
    kwargs = dict(text_config=text, vision_config=_qwen2_5_vision(hidden), tie_word_embeddings=tie,
                  **_QWEN_TOKEN_IDS)
    return Preset(name, "qwen2_5_vl", published, source, hf_id, kwargs)


_QWEN2_VL_7B = Preset(
    "Qwen2-VL-7B",
    "qwen2_vl",
    8.29e9,
    "config: Qwen/Qwen2-VL-7B-Instruct config.json (vision depth 32, embed_dim 1280, hidden_size 3584, "
    "mlp_ratio 4, quick_gelu; text = Qwen2-7B: 3584/18944/28 layers/28 heads/4 kv, vocab 152064), as quoted "
    "in public loaders and model printouts; params: HF model page (8.29B)",
    "Qwen/Qwen2-VL-7B-Instruct",
    dict(
        text_config=_qwen_text("qwen2_vl_text", vocab=152064, hidden=3584, inter=18944, layers=28, heads=28,
                               kv_heads=4, max_pos=32768, max_window=28),
        vision_config=dict(
            model_type="qwen2_vl_vision",
            depth=32,
            embed_dim=1280,
            hidden_size=3584,  # Qwen2-VL's vision "hidden_size" is the merger output = LLM width
            hidden_act="quick_gelu",
            mlp_ratio=4,
            num_heads=16,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        tie_word_embeddings=False,
        **_QWEN_TOKEN_IDS,
    ),
)

_QWEN2_5_VL_3B = _qwen2_5_vl(
    "Qwen2.5-VL-3B", "Qwen/Qwen2.5-VL-3B-Instruct", 3.75e9,
    "config: Qwen/Qwen2.5-VL-3B-Instruct config.json (2048/11008/36 layers/16 heads/2 kv, vocab 151936, "
    "tied embeddings, vision out_hidden_size 2048), quoted verbatim in public repos; params: HF model page (3.75B)",
    vocab=151936, hidden=2048, inter=11008, layers=36, heads=16, kv_heads=2, tie=True, max_window=70,
)
_QWEN2_5_VL_7B = _qwen2_5_vl(
    "Qwen2.5-VL-7B", "Qwen/Qwen2.5-VL-7B-Instruct", 8.29e9,
    "config: Qwen/Qwen2.5-VL-7B-Instruct config.json (3584/18944/28 layers/28 heads/4 kv, vocab 152064, "
    "vision out_hidden_size 3584), quoted verbatim in public repos; params: HF model page (8.29B)",
    vocab=152064, hidden=3584, inter=18944, layers=28, heads=28, kv_heads=4, tie=False, max_window=28,
)
_QWEN2_5_VL_32B = _qwen2_5_vl(
    "Qwen2.5-VL-32B", "Qwen/Qwen2.5-VL-32B-Instruct", 33.5e9,
    # No verbatim quote of this config.json was found; the text part is Qwen2.5-32B-Instruct's published
    # config (5120 hidden, 27648 FFN, 64 layers, 40 q / 8 kv heads, vocab 152064, untied), the vision part
    # is the shared Qwen2.5-VL ViT with out_hidden_size = 5120.
    "config: derived from Qwen2.5-32B-Instruct (5120/27648/64 layers/40 heads/8 kv, vocab 152064) + the "
    "Qwen2.5-VL ViT (out_hidden_size 5120); params: HF model page (33.5B)",
    vocab=152064, hidden=5120, inter=27648, layers=64, heads=40, kv_heads=8, tie=False, max_window=64,
)


class Qwen2VL(Family):
    name = "qwen2_vl"
    class_name = "Qwen2VLForConditionalGeneration"
    image_token = "<|image_pad|>"
    image_open, image_close = "<|vision_start|>", "<|vision_end|>"
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    order = 0
    config_class = "Qwen2VLConfig"
    # 14 px patches merged 2x2 into 28 px tokens, free canvas
    default_geometry = Geometry(28)
    special_tokens = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>",
                      "<|image_pad|>", "<|video_pad|>")
    shared_vocab = True
    config_tokens = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                     "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    vision_modules = ("visual",)
    packed_vision = True  # Qwen2-VL, Qwen2.5-VL and Qwen3-VL (subclasses) alike
    presets = (_QWEN2_VL_7B,)
    chat = vismech_chat = ChatFormat(QWEN_SYSTEM + "<|im_start|>user\n", placeholder, "", "<|im_end|>\n",
                                     "<|im_start|>assistant\n", "<|im_start|>assistant\n", "<|im_end|>\n")

    def _tiny_vision(self) -> dict:
        return dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                    spatial_merge_size=2, temporal_patch_size=2, in_channels=3)

    def tiny_config(self, tok):
        ids = tok.convert_tokens_to_ids
        text = text_kwargs(tok, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                 "rope_theta": 10000.0})
        cls = getattr(tf, self.config_class)
        cfg = cls(text_config=text, vision_config=self._tiny_vision(), image_token_id=ids("<|image_pad|>"),
                  video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                  vision_end_token_id=ids("<|vision_end|>"))
        cfg.architectures = [self.class_name]
        return cfg

    def _vision(self, config):
        return config.vision_config

    def geometry(self, config, image_processor) -> Geometry:
        v = self._vision(config)
        return Geometry(token_px=v.patch_size * v.spatial_merge_size)

    def image_processor_for(self, config):
        v = self._vision(config)
        px = v.patch_size * v.spatial_merge_size
        return image_processor_class("Qwen2VLImageProcessor")(
            patch_size=v.patch_size, merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
            min_pixels=px * px, max_pixels=px * px * 4096)

    def picture_views(self, image_processor, image_size, grid, extra):
        # the processor resizes the image to exactly the token grid (its smart_resize), without cropping
        rows, cols = grid
        t = image_processor.patch_size * image_processor.merge_size
        return [View(rows, cols, t, (cols * t / image_size[0], rows * t / image_size[1]))]

    def process_images(self, image_processor, images) -> ImageInputs:
        from ..qwen_pixels import pixels  # the processor's exact output by table look-up, where it applies

        out = pixels(image_processor, images) or image_processor(images=images, return_tensors="pt")
        return self._image_inputs(image_processor, {"pixel_values": out["pixel_values"],
                                                    "image_grid_thw": out["image_grid_thw"]})

    def packed_images(self, image_processor, images, dtype) -> ImageInputs | None:
        from ..qwen_pixels import pixels

        out = pixels(image_processor, images, frame_dtype=dtype)
        return None if out is None else self._image_inputs(image_processor, out)

    def _image_inputs(self, image_processor, tensors: dict) -> ImageInputs:
        m = image_processor.merge_size
        thw = tensors["image_grid_thw"]
        grids = [(int(h) // m, int(w) // m) for _, h, w in thw.tolist()]
        n = [int(t) * r * c for (t, _, _), (r, c) in zip(thw.tolist(), grids)]
        return ImageInputs(tensors, n, grids, [None] * len(n))

    def extra_inputs(self, input_ids, image_token_id):
        # transformers 5.x builds Qwen's 3-D M-RoPE positions from this; without it, it silently uses 1-D ones
        return {"mm_token_type_ids": (input_ids == image_token_id).to(torch.int32)}


class Qwen25VL(Qwen2VL):
    name = "qwen2_5_vl"
    class_name = "Qwen2_5_VLForConditionalGeneration"
    order = 1
    config_class = "Qwen2_5_VLConfig"
    shared_vocab = True
    presets = (_QWEN2_5_VL_3B, _QWEN2_5_VL_7B, _QWEN2_5_VL_32B)

    def _tiny_vision(self) -> dict:
        return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
                    in_channels=3)
