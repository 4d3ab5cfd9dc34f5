"""Qwen2-VL and Qwen2.5-VL: a ViT whose 14 px patches are merged 2x2 into 28 px tokens on a free canvas, and
M-RoPE (3-D rotary positions) in the language model."""

from __future__ import annotations

import torch
import transformers as tf

from vismech.scenes.core import Geometry
from vismech.scenes.regions import View

from ..framing import ChatFormat
from .base import Family, ImageInputs, image_processor_class, text_kwargs

QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


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
        out = image_processor(images=images, return_tensors="pt")
        m = image_processor.merge_size
        thw = out["image_grid_thw"]
        grids = [(int(h) // m, int(w) // m) for _, h, w in thw.tolist()]
        n = [int(t) * r * c for (t, _, _), (r, c) in zip(thw.tolist(), grids)]
        return ImageInputs({"pixel_values": out["pixel_values"], "image_grid_thw": thw}, n, grids, [None] * len(n))

    def extra_inputs(self, input_ids, image_token_id):
        # transformers 5.x builds Qwen's 3-D M-RoPE positions from this; without it, it silently uses 1-D ones
        return {"mm_token_type_ids": (input_ids == image_token_id).to(torch.int32)}


class Qwen25VL(Qwen2VL):
    name = "qwen2_5_vl"
    class_name = "Qwen2_5_VLForConditionalGeneration"
    order = 1
    config_class = "Qwen2_5_VLConfig"

    def _tiny_vision(self) -> dict:
        return dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1],
                    in_channels=3)
