"""LLaVA-OneVision (llava-hf): SigLIP patches of a base image, then anyres tiles with a newline token per row."""

from __future__ import annotations

import math

import transformers as tf

from vismech.scenes.core import Geometry
from vismech.scenes.regions import View

from ..framing import ChatFormat
from .base import ImageInputs, Preset, _get, image_processor_class, text_kwargs
from .llava import Llava
from .qwen2_vl import QWEN_SYSTEM


# --------------------------------------------------------------------------------------------------
# LLaVA-OneVision-7B (llava-hf): SigLIP so400m/14-384 with the last layer dropped (26 layers, no head)
# + Qwen2-7B-Instruct. transformers' convert_llava_onevision_weights_to_hf.py builds exactly this and
# resizes the embeddings to vocab+2 padded to a multiple of 64: 152064 -> 152128.
# --------------------------------------------------------------------------------------------------

_LLAVA_OV_7B = Preset(
    "LLaVA-OneVision-7B",
    "llava_onevision",
    8.03e9,
    "config: transformers convert_llava_onevision_weights_to_hf.py (SigLIP 1152/4304/26 layers/16 heads, "
    "384 px, no head; text = Qwen2-7B-Instruct 3584/18944/28x28/4 kv, vocab resized to 152128); "
    "params: HF model page (8.03B)",
    "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    dict(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=26,
            num_attention_heads=16,
            image_size=384,
            patch_size=14,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=152128,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            hidden_act="silu",
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
            use_sliding_window=False,
            sliding_window=131072,
            max_window_layers=28,
            bos_token_id=151643,
            eos_token_id=151645,
            tie_word_embeddings=False,
        ),
        image_token_index=151646,
        video_token_index=151647,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    ),
)


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
    presets = (_LLAVA_OV_7B,)
    # 384 px SigLIP with 14 px patches (27 tokens, 378 px drawn, padded to 384)
    default_geometry = Geometry(14, canvas_tokens=27, input_px=384)
    special_tokens = ("<|im_start|>", "<|im_end|>", "<image>", "<video>")
    shared_vocab = True
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
