"""LLaVA-OneVision (llava-hf): SigLIP patches of a base image, then anyres tiles with a newline token per row."""

from __future__ import annotations

import math

import transformers as tf

from vismech.scenes.core import Geometry
from vismech.scenes.regions import View

from ..framing import ChatFormat
from .base import ImageInputs, _get, image_processor_class, text_kwargs
from .llava import Llava
from .qwen2_vl import QWEN_SYSTEM


class LlavaOnevision(Llava):
    name = "llava_onevision"
    class_name = "LlavaOnevisionForConditionalGeneration"
    # the llava-hf checkpoints' template ("<|im_start|>user\n<image>\nTEXT<|im_end|>\n..."), with the Qwen system
    # prompt LLaVA-OneVision was trained with
    chat = ChatFormat(QWEN_SYSTEM + "<|im_start|>user\n", "<image>\n", "", "<|im_end|>\n",
                      "<|im_start|>assistant\n", "<|im_start|>assistant\n", "<|im_end|>\n")
    vismech_chat = ChatFormat("<|im_start|>user ", "<image>", "\n", "<|im_end|>", "<|im_start|>assistant\n",
                              "<|im_start|>assistant\n", "<|im_end|>")

    order = 3
    config_class = "LlavaOnevisionConfig"
    # 384 px SigLIP with 14 px patches (27 tokens, 378 px drawn, padded to 384)
    default_geometry = Geometry(14, canvas_tokens=27, input_px=384)
    special_tokens = ("<|im_start|>", "<|im_end|>", "<image>", "<video>")
    config_tokens = {"image_token_id": "<image>", "video_token_id": "<video>"}

    def tiny_config(self, tok):
        ids = tok.convert_tokens_to_ids
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=56, patch_size=4)
        text = tf.Qwen2Config(**text_kwargs(tok))
        cfg = tf.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=ids("<image>"),
                                      video_token_id=ids("<video>"), image_grid_pinpoints=[[56, 56]],
                                      vision_feature_layer=-1, vision_feature_select_strategy="full")
        cfg.architectures = [self.class_name]
        return cfg

    def image_processor_for(self, config):
        s = config.vision_config.image_size
        return image_processor_class("LlavaOnevisionImageProcessor")(
            size={"height": s, "width": s}, image_grid_pinpoints=config.image_grid_pinpoints)

    def process_images(self, image_processor, images) -> ImageInputs:
        odd = next((im.size for im in images if im.size[0] != im.size[1]), None)
        if odd is not None:  # anyres unpads a non-square image's tiles, which the token layout here does not follow
            raise ValueError(f"vismech runs LLaVA-OneVision on square images only; one is {odd[0]}x{odd[1]}: pad or "
                             "crop your images to squares")
        out = image_processor(images=images, return_tensors="pt")
        pv = out["pixel_values"]
        p = pv.shape[-1] // self._patch
        tiles = pv.shape[1] - 1
        scale = math.isqrt(tiles)
        if scale * scale != tiles:
            raise ValueError("vismech needs square canvases for LLaVA-OneVision (anyres tiles of a square grid)")
        hi = p * scale
        n = p * p + hi * (hi + 1)  # base grid, then the high-resolution grid with one newline token per row
        return ImageInputs({"pixel_values": pv, "image_sizes": out["image_sizes"]}, [n] * len(images),
                           [(p, p)] * len(images), [scale] * len(images))

    def picture_views(self, image_processor, image_size, grid, extra):
        # base image resized to size x size; anyres tiles of the same size, scale x scale of them for a square image
        W, H = image_size  # square: process_images refuses others
        S, p, scale = _get(image_processor.size, "height"), grid[0], extra
        base = View(p, p, self._patch, (S / W, S / H))
        hi = View(p * scale, p * scale, self._patch, (scale * S / W, scale * S / H), base=p * p,
                  row_stride=p * scale + 1, tile=(S, p))
        return [base, hi]

    def cell_offsets(self, layout, cell, n_tokens, grid, extra):
        base = super().cell_offsets(layout, cell, n_tokens, grid, extra)
        p, scale = grid[0], extra
        hi = []
        for b in base:
            r, c = divmod(b, p)
            for i in range(scale):
                for j in range(scale):
                    hr, hc = r * scale + i, c * scale + j
                    hi.append(p * p + hr * (p * scale + 1) + hc)
        return base + sorted(hi)
