"""Gemma 3: SigLIP patches average-pooled into a fixed 16x16 grid of image tokens (4x4 patches of 14 px each), a
bidirectional attention block over each image's tokens, and per-head q/k norms before rotary embedding."""

from __future__ import annotations

import math

import transformers as tf

from vismech.scenes.core import Geometry
from vismech.scenes.regions import View

from ..framing import ChatFormat
from .base import Family, ImageInputs, Preset, _get, image_processor_class, normed_qk_sites, text_kwargs


# --------------------------------------------------------------------------------------------------
# Gemma 3 (google/gemma-3-{4b,12b,27b}-it). The Hub configs list few text keys and rely on Gemma3TextConfig's
# defaults (vocab 262208, rope theta 1e6 global / 1e4 local, rms eps 1e-6, 131072 positions, tied embeddings);
# they are spelled out here. Every 6th layer is global (full) attention, the others a 1024-token sliding window.
# --------------------------------------------------------------------------------------------------

_SIGLIP_SO400M_896 = dict(  # SigLIP so400m/14 at 896 px without its pooling head; one tower for all three sizes
    model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
    num_attention_heads=16, num_channels=3, image_size=896, patch_size=14, hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6, attention_dropout=0.0, vision_use_head=False,
)

#: rotary embedding per layer type (the Hub's rope_scaling linear x8 on the global layers, 1e4 on the local ones)
_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}


def _gemma3(name, hf_id, published, source, *, hidden, inter, layers, heads, kv_heads, head_dim, query_scalar
            ) -> Preset:
    text = dict(
        model_type="gemma3_text", vocab_size=262208, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072, rms_norm_eps=1e-6,
        query_pre_attn_scalar=query_scalar, sliding_window=1024,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)],
        attention_bias=False, attention_dropout=0.0, final_logit_softcapping=None, attn_logit_softcapping=None,
        pad_token_id=0, bos_token_id=2, eos_token_id=1, tie_word_embeddings=True, rope_parameters=dict(_ROPE),
    )
    kwargs = dict(text_config=text, vision_config=dict(_SIGLIP_SO400M_896), mm_tokens_per_image=256,
                  boi_token_index=255999, eoi_token_index=256000, image_token_index=262144,
                  initializer_range=0.02, tie_word_embeddings=True)
    return Preset(name, "gemma3", published, source, hf_id, kwargs)


_SOURCE = ("config: {id} config.json (text {dims}, head_dim {hd}, query_pre_attn_scalar {qs}, sliding window 1024 "
           "with every 6th layer global, rope linear x8; SigLIP so400m/14 at 896 px, 256 image tokens) as quoted in "
           "public loaders and tests, other keys Gemma3TextConfig defaults (vocab 262208, tied); params: exact "
           "safetensors count {n} (Hub API / index total_size)")

_GEMMA3_4B = _gemma3(
    "gemma-3-4b-it", "google/gemma-3-4b-it", 4_300_079_472,
    _SOURCE.format(id="google/gemma-3-4b-it", dims="2560/10240/34 layers/8 heads/4 kv", hd=256, qs=256,
                   n="4,300,079,472"),
    hidden=2560, inter=10240, layers=34, heads=8, kv_heads=4, head_dim=256, query_scalar=256,
)
_GEMMA3_12B = _gemma3(
    "gemma-3-12b-it", "google/gemma-3-12b-it", 12_187_325_040,
    _SOURCE.format(id="google/gemma-3-12b-it", dims="3840/15360/48 layers/16 heads/8 kv", hd=256, qs=256,
                   n="12,187,325,040"),
    hidden=3840, inter=15360, layers=48, heads=16, kv_heads=8, head_dim=256, query_scalar=256,
)
_GEMMA3_27B = _gemma3(
    "gemma-3-27b-it", "google/gemma-3-27b-it", 27_432_406_640,
    _SOURCE.format(id="google/gemma-3-27b-it", dims="5376/21504/62 layers/32 heads/16 kv", hd=128, qs=168,
                   n="27,432,406,640"),
    hidden=5376, inter=21504, layers=62, heads=32, kv_heads=16, head_dim=128, query_scalar=168,
)


class Gemma3(Family):
    name = "gemma3"
    order = 6
    class_name = "Gemma3ForConditionalGeneration"
    config_class = "Gemma3Config"
    image_token = "<image_soft_token>"
    image_open, image_close = "<start_of_image>", "<end_of_image>"
    # the chat template writes the begin-of-image token for an image; Gemma3Processor expands it (image_marker)
    placeholder = "<start_of_image>"
    # the published template: "<bos><start_of_turn>user\n<start_of_image>QUESTION<end_of_turn>\n<start_of_turn>
    # model\n" (the assistant is called "model"; an assistant turn is "<start_of_turn>model\nTEXT<end_of_turn>\n")
    chat = ChatFormat("<bos><start_of_turn>user\n", "<start_of_image>", "", "<end_of_turn>\n",
                      "<start_of_turn>model\n", "<start_of_turn>model\n", "<end_of_turn>\n")
    # vismech's word vocabulary has no "model": its own Gemma 3 models call the assistant "assistant"
    vismech_chat = ChatFormat("<start_of_turn>user\n", "<start_of_image><image_soft_token><end_of_image>", "",
                              "<end_of_turn>\n", "<start_of_turn>assistant\n", "<start_of_turn>assistant\n",
                              "<end_of_turn>\n")
    # 896 px squashed, 64x64 SigLIP patches of 14 px average-pooled 4x4: 16x16 tokens of 56 px
    default_geometry = Geometry(56, canvas_tokens=16)
    special_tokens = ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>")
    config_tokens = {"image_token_id": "<image_soft_token>", "boi_token_id": "<start_of_image>",
                     "eoi_token_id": "<end_of_image>"}
    # q/k are RMS-normed per head on the [batch, heads, pos, dim] view, then rotated: the sites are the norms'
    # outputs. The head outputs (o_proj input) are per head as usual; the residual write is
    # post_attention_layernorm(o_proj(z)), which the z site does not need.
    sites = normed_qk_sites("bhtd")
    vision_modules = ("vision_tower", "multi_modal_projector")
    presets = (_GEMMA3_4B, _GEMMA3_12B, _GEMMA3_27B)

    def tiny_config(self, tok):
        ids = tok.convert_tokens_to_ids
        text = text_kwargs(tok, head_dim=16, query_pre_attn_scalar=16, hidden_activation="gelu_pytorch_tanh",
                           rms_norm_eps=1e-6, sliding_window=512, tie_word_embeddings=True,
                           # real checkpoints: 5 local layers to 1 global; here 2 to 1, with a window longer than
                           # any prompt (as at the real window of 1024)
                           layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                           rope_parameters={k: dict(v) for k, v in _ROPE.items()})
        # 80 px, 4 px patches: 20x20 patches pooled 2x2 into 10x10 tokens of 8 px (2x2 grids: objects of 2x2
        # tokens; 3x3 grids: of 1 token)
        vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, image_size=80, patch_size=4, vision_use_head=False,
                      layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
        cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=100,
                              image_token_index=ids("<image_soft_token>"), boi_token_index=ids("<start_of_image>"),
                              eoi_token_index=ids("<end_of_image>"), tie_word_embeddings=True)
        cfg.architectures = [self.class_name]
        return cfg

    _side: int = 16  # image tokens per side

    def bind(self, config):
        self._side = math.isqrt(config.mm_tokens_per_image)
        return self

    def geometry(self, config, image_processor) -> Geometry:
        side = math.isqrt(config.mm_tokens_per_image)
        return Geometry(token_px=config.vision_config.image_size // side, canvas_tokens=side)

    def image_processor_for(self, config):
        s = config.vision_config.image_size
        return image_processor_class("Gemma3ImageProcessor")(
            size={"height": s, "width": s}, resample=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
            do_pan_and_scan=False)

    def process_images(self, image_processor, images) -> ImageInputs:
        out = image_processor(images=images, return_tensors="pt")
        pv = out["pixel_values"]
        if pv.shape[0] != len(images):  # pan-and-scan crops: more token runs per image, not laid out here
            raise ValueError("vismech runs Gemma 3 with one view per image; load its image processor with "
                             "do_pan_and_scan=False")
        n = self._side * self._side
        return ImageInputs({"pixel_values": pv}, [n] * len(images), [(self._side, self._side)] * len(images),
                           [None] * len(images))

    def picture_views(self, image_processor, image_size, grid, extra):
        # the whole image is resized (squashed) to the square input; each token is a block of 4x4 patches
        W, H = image_size
        S, side = _get(image_processor.size, "height"), grid[0]
        return [View(side, side, S / side, (S / W, S / H))]

    def image_marker(self, processor: bool) -> str:
        return self.image_open if processor else self.image_token

    def expand_placeholder(self, text, at, n_tokens, extra, processor=True):
        if not processor:
            return super().expand_placeholder(text, at, n_tokens, extra, processor)
        # Gemma3Processor: "<start_of_image>" -> "\n\n<start_of_image>" + n soft tokens + "<end_of_image>\n\n"
        run = "\n\n" + self.image_text(n_tokens) + "\n\n"
        end = at + len(self.image_open)
        return text[:at] + run + text[end:], len(run) - len(self.image_open)

    def extra_inputs(self, input_ids, image_token_id):
        # 1 marks image tokens: the tokens of one image attend to each other both ways; without it transformers
        # silently runs plain causal attention over the image
        return {"token_type_ids": (input_ids == image_token_id).long()}
