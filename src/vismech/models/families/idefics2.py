"""Idefics2: SigLIP patches resampled by a perceiver into 64 latent tokens per image (no per-patch positions)."""

from __future__ import annotations

import transformers as tf

from vismech.scenes.core import Geometry

from ..framing import ChatFormat
from .base import Family, ImageInputs, Preset, image_processor_class, text_kwargs


# --------------------------------------------------------------------------------------------------
# Idefics2-8B: SigLIP so400m (980 px, 27 layers) + perceiver resampler (64 latents) + Mistral-7B-v0.1.
# --------------------------------------------------------------------------------------------------

_IDEFICS2_8B = Preset(
    "Idefics2-8B",
    "idefics2",
    8.4e9,
    "config: HuggingFaceM4/idefics2-8b config.json (vision 1152/4304/27 layers/16 heads, 980 px, patch 14; "
    "perceiver 3 layers, 64 latents, 16 heads x 96, 4 kv; text Mistral-7B-v0.1 with vocab 32003; "
    "image_token_id 32001) as quoted in public code and transformers' defaults; params: HF model page (8.4B)",
    "HuggingFaceM4/idefics2-8b",
    dict(
        vision_config=dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_hidden_layers=27,
            num_attention_heads=16,
            num_channels=3,
            image_size=980,
            patch_size=14,
            hidden_act="gelu_pytorch_tanh",
            layer_norm_eps=1e-6,
        ),
        perceiver_config=dict(
            hidden_act="silu",
            hidden_size=4096,  # = text hidden size
            rms_norm_eps=1e-5,  # = text rms_norm_eps
            resampler_n_latents=64,
            resampler_depth=3,
            resampler_n_heads=16,
            resampler_head_dim=96,
            num_key_value_heads=4,
        ),
        # Mistral-7B-v0.1 sizes (4096/14336/32 layers/32 heads/8 kv, rope_theta 1e4, window 4096), vocab
        # extended by Idefics2's added tokens to 32003.
        text_config=dict(
            model_type="mistral",
            vocab_size=32003,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            hidden_act="silu",
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            sliding_window=4096,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            tie_word_embeddings=False,
        ),
        image_token_id=32001,
        tie_word_embeddings=False,
    ),
)


class Idefics2(Family):
    name = "idefics2"
    class_name = "Idefics2ForConditionalGeneration"
    image_token = "<image>"
    image_open = image_close = "<fake_token_around_image>"
    placeholder = "<image>"
    # the published template: "User:<image>QUESTION<end_of_utterance>\nAssistant:"; an assistant turn whose
    # content starts with text is "Assistant: TEXT<end_of_utterance>\n"
    chat = ChatFormat("User:", "<image>", "", "<end_of_utterance>\n", "Assistant: ", "Assistant:",
                      "<end_of_utterance>\n")
    vismech_chat = ChatFormat("User:", "<fake_token_around_image><image><fake_token_around_image>", "",
                              "<end_of_utterance>\n", "Assistant:", "Assistant:", "<end_of_utterance>\n")
    plain_format = "{image}{text}"
    spatial_tokens = False
    layer_paths = ("model.text_model.layers",)
    order = 4
    config_class = "Idefics2Config"
    presets = (_IDEFICS2_8B,)
    # 378 px: 27 tokens of 14 px
    default_geometry = Geometry(14, canvas_tokens=27)
    special_tokens = ("<image>", "<fake_token_around_image>", "<end_of_utterance>")
    shared_vocab = True
    config_tokens = {"image_token_id": "<image>"}
    vision_modules = ("vision_model", "connector")

    def tiny_config(self, tok):
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=56, patch_size=4)
        perceiver = dict(resampler_n_latents=16, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=16,
                         num_key_value_heads=2)
        text = tf.MistralConfig(**text_kwargs(tok))
        cfg = tf.Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text,
                                image_token_id=tok.convert_tokens_to_ids("<image>"))
        cfg.architectures = [self.class_name]
        return cfg

    def geometry(self, config, image_processor) -> Geometry:
        v = config.vision_config
        size = getattr(image_processor, "size", None) or {}  # the processor resizes the short side to this
        px = size.get("shortest_edge") if isinstance(size, dict) else None
        return Geometry(token_px=v.patch_size, canvas_tokens=(px or v.image_size) // v.patch_size)

    def image_processor_for(self, config):
        s = config.vision_config.image_size
        return image_processor_class("Idefics2ImageProcessor")(size={"shortest_edge": s, "longest_edge": s},
                                                               do_image_splitting=False)

    def process_images(self, image_processor, images) -> ImageInputs:
        out = image_processor(images=[[im] for im in images], return_tensors="pt")
        k = out["pixel_values"].shape[1]  # 1, or 5 when the processor splits each image into 4 crops + itself
        n = self._latents * k
        return ImageInputs({"pixel_values": out["pixel_values"], "pixel_attention_mask": out["pixel_attention_mask"]},
                           [n] * len(images), [None] * len(images), [k] * len(images))

    def expand_placeholder(self, text, at, n_tokens, extra, processor=True):
        if not processor:
            return super().expand_placeholder(text, at, n_tokens, extra, processor)
        # Idefics2Processor: <fake> + latents x <image> + <fake> per (sub-)image, fake tokens shared between
        # neighbours, and a space after the closing fake token when a word follows it directly
        k = extra or 1
        run = self.image_open + (self.image_token * (n_tokens // k) + self.image_close) * k
        end = at + len(self.image_token)
        if end < len(text) and not text[end].isspace() and text[end] != "<":
            run += " "
        return text[:at] + run + text[end:], len(run) - len(self.image_token)

    _latents: int = 64

    def bind(self, config):
        self._latents = config.perceiver_config.resampler_n_latents
        return self
