"""LLaVA-1.5 (llava-hf): a CLIP ViT whose patches are the image tokens, on a fixed square input."""

from __future__ import annotations

import transformers as tf

from vismech.scenes.core import Geometry
from vismech.scenes.regions import View

from ..framing import ChatFormat
from .base import Family, ImageInputs, Preset, _get, image_processor_class, text_kwargs


# --------------------------------------------------------------------------------------------------
# LLaVA-1.5 (llava-hf): CLIP ViT-L/14-336 + Vicuna-v1.5 (Llama-2). The Hub text_config lists only
# vocab_size 32064 / max_position_embeddings 4096 / rms_norm_eps 1e-5 and relies on LlamaConfig defaults
# (= Llama-2-7B) for the sizes; they are spelled out here so older/newer defaults cannot change them.
# --------------------------------------------------------------------------------------------------

_CLIP_L14_336 = dict(
    model_type="clip_vision_model",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


def _llava(name, hf_id, published, source, *, hidden, inter, layers, heads) -> Preset:
    text = dict(
        model_type="llama",
        vocab_size=32064,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        pad_token_id=32001,
        tie_word_embeddings=False,
    )
    kwargs = dict(
        vision_config=dict(_CLIP_L14_336),
        text_config=text,
        image_token_index=32000,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
    )
    return Preset(name, "llava", published, source, hf_id, kwargs)


_LLAVA_7B = _llava(
    "LLaVA-1.5-7B", "llava-hf/llava-1.5-7b-hf", 7.06e9,
    "config: llava-hf/llava-1.5-7b-hf config.json (CLIP ViT-L/14-336, vocab 32064, image_token_index 32000, "
    "feature layer -2), quoted verbatim in public repos; LLM sizes = Llama-2-7B (4096/11008/32x32); "
    "params: HF model page (7.06B)",
    hidden=4096, inter=11008, layers=32, heads=32,
)
_LLAVA_13B = _llava(
    "LLaVA-1.5-13B", "llava-hf/llava-1.5-13b-hf", 13.4e9,
    # LLM sizes derived from Llama-2-13B / vicuna-13b-v1.5 (5120 hidden, 13824 FFN, 40 layers, 40 heads);
    # the rest mirrors the 7B llava-hf config (same vision tower, vocab 32064, token ids).
    "config: llava-1.5-7b-hf layout with LLM sizes derived from Llama-2-13B / vicuna-13b-v1.5 "
    "(5120/13824/40x40); params: HF model page (13.4B)",
    hidden=5120, inter=13824, layers=40, heads=40,
)


class Llava(Family):
    name = "llava"
    class_name = "LlavaForConditionalGeneration"
    image_token = "<image>"
    placeholder = "<image>"
    # llava-hf's template: "USER: <image>\nQUESTION ASSISTANT:"; an assistant turn is "ASSISTANT: TEXT "
    chat = ChatFormat("USER: ", "<image>\n", "", " ", "ASSISTANT: ", "ASSISTANT:", " ")
    vismech_chat = ChatFormat("USER: ", "<image>", "\n", " ", "ASSISTANT:", "ASSISTANT:", "</s>")
    plain_format = "{image}\n{text}"
    order = 2
    config_class = "LlavaConfig"
    # LLaVA-1.5: 336 px CLIP with 14 px patches
    default_geometry = Geometry(14, canvas_tokens=24)
    special_tokens = ("<image>",)
    shared_vocab = True
    config_tokens = {"image_token_id": "<image>"}
    vision_modules = ("vision_tower", "multi_modal_projector")
    presets = (_LLAVA_7B, _LLAVA_13B)

    def tiny_config(self, tok):
        vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, image_size=56, patch_size=4, projection_dim=32)
        text = tf.LlamaConfig(**text_kwargs(tok))
        cfg = tf.LlavaConfig(vision_config=vision, text_config=text,
                             image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                             vision_feature_select_strategy="default")
        cfg.architectures = [self.class_name]
        return cfg

    def geometry(self, config, image_processor) -> Geometry:
        v = config.vision_config
        return Geometry(token_px=v.patch_size, canvas_tokens=v.image_size // v.patch_size, input_px=v.image_size)

    def image_processor_for(self, config):
        s = config.vision_config.image_size
        return image_processor_class("CLIPImageProcessor")(size={"shortest_edge": s},
                                                           crop_size={"height": s, "width": s})

    def process_images(self, image_processor, images) -> ImageInputs:
        out = image_processor(images=images, return_tensors="pt")
        pv = out["pixel_values"]
        g = pv.shape[-1] // self._patch
        return ImageInputs({"pixel_values": pv}, [g * g] * len(images), [(g, g)] * len(images), [None] * len(images))

    _patch: int = 14

    def bind(self, config):
        self._patch = config.vision_config.patch_size
        return self

    def picture_views(self, image_processor, image_size, grid, extra):
        # CLIP-style processing: (LlavaImageProcessor's do_pad: pad to a centred square,) resize (shortest edge or
        # a fixed size), centre crop; the crop is cut into patch-size tokens
        W, H = image_size
        ox = oy = 0.0
        if getattr(image_processor, "do_pad", False):
            side = max(W, H)
            ox, oy, W, H = (side - W) // 2, (side - H) // 2, side, side
        size = image_processor.size
        if not getattr(image_processor, "do_resize", True):
            h2, w2 = H, W
        elif _get(size, "height") and _get(size, "width"):
            h2, w2 = _get(size, "height"), _get(size, "width")
        elif _get(size, "shortest_edge") and not _get(size, "longest_edge"):
            s = _get(size, "shortest_edge")
            short, long = min(W, H), max(W, H)
            h2, w2 = (int(s * long / short), s) if W <= H else (s, int(s * long / short))
        else:
            raise ValueError(f"vismech cannot map boxes through an image processor with size {size}; use one with "
                             "a shortest_edge or height/width size")
        sx, sy = w2 / W, h2 / H
        left = top = 0
        if getattr(image_processor, "do_center_crop", False):
            crop = image_processor.crop_size
            top, left = (h2 - _get(crop, "height")) // 2, (w2 - _get(crop, "width")) // 2
        g = grid[0]
        return [View(g, g, self._patch, (sx, sy), (ox * sx - left, oy * sy - top))]
