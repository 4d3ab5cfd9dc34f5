"""LLaVA-NeXT (LLaVA-1.6, llava-hf): CLIP patches of a base image, then anyres tiles with a newline token per row,
as LLaVA-OneVision lays them out; tiles from a fixed list of resolutions, unpadded back to the image's own shape."""

from __future__ import annotations

import transformers as tf
from transformers.image_processing_utils import select_best_resolution

from vismech.scenes.core import Geometry
from vismech.scenes.regions import View

from ..framing import ChatFormat
from .base import ImageInputs, Preset, _get, image_processor_class, text_kwargs
from .llava import _CLIP_L14_336, Llava
from .llava_onevision import LlavaOnevision


# --------------------------------------------------------------------------------------------------
# LLaVA-NeXT 7B (llava-hf): CLIP ViT-L/14-336 (feature layer -2, CLS dropped) + Mistral-7B-Instruct-v0.2 or
# vicuna-7b-v1.5 (Llama-2-7B). The Hub text_config lists few keys and relies on the LM config's defaults (the
# Mistral-7B / Llama-2-7B sizes); they are spelled out here.
# --------------------------------------------------------------------------------------------------

#: the published anyres resolutions (H, W): 2x1, 1x2, 2x2, 3x1, 1x3 tiles of 336 px
_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _llava_next(name, published, source, text) -> Preset:
    kwargs = dict(vision_config=dict(_CLIP_L14_336), text_config=dict(text, vocab_size=32064, hidden_size=4096,
                                                                      num_hidden_layers=32, num_attention_heads=32,
                                                                      hidden_act="silu", rms_norm_eps=1e-5,
                                                                      tie_word_embeddings=False),
                  image_token_index=32000, projector_hidden_act="gelu", vision_feature_select_strategy="default",
                  vision_feature_layer=-2, image_seq_length=576, image_grid_pinpoints=[list(p) for p in _PINPOINTS],
                  tie_word_embeddings=False)
    return Preset(name, "llava_next", published, source, f"llava-hf/{name}", kwargs)


_LLAVA_NEXT_MISTRAL_7B = _llava_next(
    "llava-v1.6-mistral-7b-hf", 7.57e9,
    "config: llava-hf/llava-v1.6-mistral-7b-hf config.json as quoted in TensorRT-LLM's tests (anyres pinpoints, "
    "image_token_index 32000, feature layer -2, 'default'; text Mistral-7B-Instruct-v0.2: 4096/14336/32 layers/"
    "32 heads/8 kv, rope_theta 1e6, no sliding window, vocab 32064); params: HF model page (7.57B)",
    dict(model_type="mistral", intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=32768,
         sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
)
_LLAVA_NEXT_VICUNA_7B = _llava_next(
    "llava-v1.6-vicuna-7b-hf", 7.06e9,
    "config: the llava-v1.6-mistral-7b-hf layout with the text config of vicuna-7b-v1.5 as llava-hf quotes it "
    "(Llama-2-7B: 4096/11008/32x32, 4096 positions, pad 0, vocab 32064); params: HF model page (7.06B; = "
    "LLaVA-1.5-7B + the 4096-wide image_newline)",
    dict(model_type="llama", intermediate_size=11008, num_key_value_heads=32, max_position_embeddings=4096,
         pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
)

#: llava-v1.6-mistral-7b-hf's template: "[INST] <image>\nQUESTION [/INST]"; an assistant turn is " TEXT</s> "
_MISTRAL_CHAT = ChatFormat("[INST] ", "<image>\n", "", " [/INST]", " ", "", "</s> ")


class LlavaNext(LlavaOnevision):
    name = "llava_next"
    order = 9
    class_name = "LlavaNextForConditionalGeneration"
    config_class = "LlavaNextConfig"
    chat = _MISTRAL_CHAT  # the Vicuna variant's template is LLaVA-1.5's (bind picks it by the language model)
    vismech_chat = ChatFormat("[INST] ", "<image>", "\n", " [/INST]", " ", "", "</s>")
    # a 336 px square: 24x24 CLIP tokens of 14 px, then (its best resolution 336x672, unpadded) the same 24x24 grid
    # again with a newline token per row: 576 + 24 * 25 tokens
    default_geometry = Geometry(14, canvas_tokens=24)
    special_tokens = ("<image>", "[INST]", "[/INST]")
    config_tokens = {"image_token_id": "<image>"}
    vision_modules = ("vision_tower", "multi_modal_projector")
    presets = (_LLAVA_NEXT_MISTRAL_7B, _LLAVA_NEXT_VICUNA_7B)

    def tiny_config(self, tok):
        ids = tok.convert_tokens_to_ids
        # 40 px CLIP with 4 px patches: 10x10 base tokens; the published pinpoints scaled to 40 px tiles
        vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=40, patch_size=4, projection_dim=32)
        text = tf.MistralConfig(**text_kwargs(tok, sliding_window=None))
        cfg = tf.LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=ids("<image>"),
                                 image_grid_pinpoints=[[h * 40 // 336, w * 40 // 336] for h, w in _PINPOINTS],
                                 vision_feature_layer=-2, vision_feature_select_strategy="default",
                                 image_seq_length=100, projector_hidden_act="gelu")
        cfg.architectures = [self.class_name]
        return cfg

    def bind(self, config):
        super().bind(config)
        self._pinpoints = [list(p) for p in config.image_grid_pinpoints]
        if config.get_text_config().model_type != "mistral":  # vicuna-7b-v1.5: "USER: <image>\nQ ASSISTANT:"
            self.chat = Llava.chat
        return self

    _pinpoints: list = _PINPOINTS

    def image_processor_for(self, config):
        s = config.vision_config.image_size
        return image_processor_class("LlavaNextImageProcessor")(
            size={"shortest_edge": s}, crop_size={"height": s, "width": s},
            image_grid_pinpoints=config.image_grid_pinpoints)

    def _hi_side(self, side: int, tile: int, p: int) -> int:
        """Tokens per side of the high-resolution grid of a square image of ``side`` px: its best anyres resolution,
        cut into tiles of ``tile`` px (``p`` tokens per tile side), then unpadded back to the square (as
        LlavaNextModel does)."""
        h, w = select_best_resolution((side, side), self._pinpoints)
        return min(h, w) // tile * p

    def process_images(self, image_processor, images) -> ImageInputs:
        odd = next((im.size for im in images if im.size[0] != im.size[1]), None)
        if odd is not None:  # unpadding leaves a non-square image's hi-res grid a shape of its own
            raise ValueError(f"vismech runs LLaVA-NeXT on square images only; one is {odd[0]}x{odd[1]}: pad or crop "
                             "your images to squares")
        out = image_processor(images=images, return_tensors="pt")
        pv = out["pixel_values"]
        tile = pv.shape[-1]
        p = tile // self._patch
        n, extra = [], []
        for im in images:
            hi = self._hi_side(im.size[0], tile, p)
            n.append(p * p + hi * (hi + 1))  # base grid, then the hi-res grid with one newline token per row
            extra.append(hi // p)
        return ImageInputs({"pixel_values": pv, "image_sizes": out["image_sizes"]}, n, [(p, p)] * len(images), extra)

    def picture_views(self, image_processor, image_size, grid, extra):
        # base: the image squashed to the tile size; hi-res: resized to scale tiles (aspect kept for a square),
        # padded to its best resolution and unpadded again, so its grid starts at the image's own corner
        W, H = image_size  # square: process_images refuses others
        S = _get(image_processor.crop_size, "height") or _get(image_processor.size, "shortest_edge")
        p, scale = grid[0], extra
        base = View(p, p, S / p, (S / W, S / H))
        hi = View(p * scale, p * scale, S / p, (scale * S / W, scale * S / H), base=p * p, row_stride=p * scale + 1)
        return [base, hi]
