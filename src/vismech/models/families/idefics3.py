"""Idefics3 and SmolVLM (v1): SigLIP patches pixel-shuffled, each s x s block of patches into one token, on a
square sub-image; published processors also cut the image into tiles and append a squashed copy of the whole."""

from __future__ import annotations

import transformers as tf

from vismech.scenes.core import Geometry

from ..framing import ChatFormat
from .base import (Family, ImageInputs, Preset, _get, image_processor_class, text_kwargs, tiled_cell_offsets,
                   tiled_views)


# --------------------------------------------------------------------------------------------------
# Published configs (all three are Idefics3ForConditionalGeneration, model_type idefics3): a Llama
# language model, a SigLIP vision tower and a parameter-free pixel shuffle + one linear projection.
# --------------------------------------------------------------------------------------------------

def _llama(*, hidden, inter, layers, heads, kv_heads, vocab, rope, max_pos, **extra) -> dict:
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_act="silu",
                max_position_embeddings=max_pos, rms_norm_eps=1e-5, rope_parameters=rope, tie_word_embeddings=False,
                **extra)


def _siglip(*, hidden, inter, layers, heads, image_size, patch) -> dict:
    return dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                num_channels=3, image_size=image_size, patch_size=patch, hidden_act="gelu_pytorch_tanh",
                layer_norm_eps=1e-6)


def _preset(name, hf_id, published, source, text, vision, scale, image_token_id) -> Preset:
    # untied: the checkpoints store lm_head apart from the embeddings (SmolLM2-135M itself ties them; the 256M
    # count matches the published one exactly only untied)
    return Preset(name, "idefics3", published, source, hf_id,
                  dict(text_config=text, vision_config=vision, scale_factor=scale, image_token_id=image_token_id,
                       tie_word_embeddings=False))


_SMOLVLM_256M = _preset(
    "SmolVLM-256M-Instruct", "HuggingFaceTB/SmolVLM-256M-Instruct", 2.56e8,
    "config: HuggingFaceTB/SmolVLM-256M-Instruct config.json as quoted in public code (SmolLM2-135M: 576/1536/30 "
    "layers/9 heads/3 kv, vocab 49280, rope_theta 1e5; SigLIP base 768/3072/12 layers, 512 px, patch 16; "
    "scale_factor 4; image_token_id 49190; untied); params: HF model page (256M; 256,484,928 quoted for the "
    "loaded model)",
    _llama(hidden=576, inter=1536, layers=30, heads=9, kv_heads=3, vocab=49280, max_pos=8192,
           rope={"rope_type": "default", "rope_theta": 100000.0}),
    _siglip(hidden=768, inter=3072, layers=12, heads=12, image_size=512, patch=16), 4, 49190,
)
_SMOLVLM_2B = _preset(
    "SmolVLM-Instruct", "HuggingFaceTB/SmolVLM-Instruct", 2.25e9,
    "config: HuggingFaceTB/SmolVLM-Instruct config.json as quoted in public code (SmolLM2-1.7B: 2048/8192/24 "
    "layers/32 heads/32 kv, vocab 49155, rope_theta 273768; SigLIP so400m 1152/4304/27 layers, 384 px, patch 14; "
    "scale_factor 3; image_token_id 49153; untied); params: HF model page (2.25B; model.safetensors 4.49 GB bf16)",
    _llama(hidden=2048, inter=8192, layers=24, heads=32, kv_heads=32, vocab=49155, max_pos=16384,
           rope={"rope_type": "default", "rope_theta": 273768.0}),
    _siglip(hidden=1152, inter=4304, layers=27, heads=16, image_size=384, patch=14), 3, 49153,
)
_IDEFICS3_8B = _preset(
    "Idefics3-8B-Llama3", "HuggingFaceM4/Idefics3-8B-Llama3", 8.46e9,
    "config: HuggingFaceM4/Idefics3-8B-Llama3 (Llama-3.1-8B-Instruct 4096/14336/32 layers/32 heads/8 kv with "
    "vocab 128259, llama3 rope; SigLIP so400m 1152/4304/27 layers, 364 px, patch 14; scale_factor 2, "
    "image_token_id 128257: the Idefics3Config defaults) as quoted in public code; params: HF model page (8.46B)",
    _llama(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8, vocab=128259, max_pos=131072,
           rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
           bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    _siglip(hidden=1152, inter=4304, layers=27, heads=16, image_size=364, patch=14), 2, 128257,
)

_FAKE, _GLOBAL = "<fake_token_around_image>", "<global-img>"
#: the markers Idefics3Processor writes before each tile (up to 6 x 6 tiles)
_TILE_MARKERS = tuple(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))


class Idefics3(Family):
    name = "idefics3"
    order = 7
    class_name = "Idefics3ForConditionalGeneration"
    config_class = "Idefics3Config"
    presets = (_SMOLVLM_256M, _SMOLVLM_2B, _IDEFICS3_8B)
    # Idefics3-8B (the class's defaults): 364 px SigLIP, 14 px patches shuffled 2x2 into 28 px tokens (13 x 13);
    # SmolVLM-256M sees 8 x 8 tokens of 64 px, SmolVLM-Instruct 9 x 9 tokens of 42 px (378 px of its 384 px input)
    default_geometry = Geometry(28, canvas_tokens=13)
    image_token = placeholder = "<image>"
    # the published template (SmolVLM; Idefics3-8B writes <|begin_of_text|> first): "<|im_start|>User:<image>
    # QUESTION<end_of_utterance>\nAssistant:"; an assistant turn whose content starts with text is
    # "Assistant: TEXT<end_of_utterance>\n". vismech's own models read the same text (their word tokenizer splits
    # it the same way with or without the spaces) and expand the image as the processor does.
    chat = vismech_chat = ChatFormat("<|im_start|>User:", "<image>", "", "<end_of_utterance>\n", "Assistant: ",
                                     "Assistant:", "<end_of_utterance>\n")
    plain_format = "{image}{text}"
    layer_paths = ("model.text_model.layers",)
    vision_modules = ("vision_model", "connector")
    special_tokens = ("<|im_start|>", "<image>", _FAKE, _GLOBAL, "<end_of_utterance>") + _TILE_MARKERS
    config_tokens = {"image_token_id": "<image>"}

    _patch: int = 14
    _scale: int = 2

    def bind(self, config):
        self._patch, self._scale = config.vision_config.patch_size, config.scale_factor
        return self

    def tiny_config(self, tok):
        # 56 px, 4 px patches (14 x 14) shuffled 2x2: 7 x 7 tokens of 8 px
        vision = _siglip(hidden=32, inter=64, layers=2, heads=2, image_size=56, patch=4)
        text = tf.LlamaConfig(**text_kwargs(tok))
        cfg = tf.Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                                image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
        cfg.architectures = [self.class_name]
        return cfg

    # -- geometry and images -------------------------------------------------------------------------------
    @staticmethod
    def _tile_px(config, image_processor) -> int:
        """Side of the square sub-image the vision tower sees (the processor's ``max_image_size``)."""
        size = getattr(image_processor, "max_image_size", None)
        return int((_get(size, "longest_edge") if size else None) or config.vision_config.image_size)

    def geometry(self, config, image_processor) -> Geometry:
        v = config.vision_config
        token_px, tile = v.patch_size * config.scale_factor, self._tile_px(config, image_processor)
        g = tile // v.patch_size // config.scale_factor
        return Geometry(token_px, canvas_tokens=g, input_px=tile if tile != g * token_px else None)

    def image_processor_for(self, config):
        # one sub-image, no tiles: the image is squashed to the tower's size (what vismech draws it at)
        s = config.vision_config.image_size
        return image_processor_class("Idefics3ImageProcessor")(
            do_image_splitting=False, size={"longest_edge": s}, max_image_size={"longest_edge": s},
            image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=1)

    def process_images(self, image_processor, images) -> ImageInputs:
        out = image_processor(images=[[im] for im in images], return_tensors="pt", return_row_col_info=True)
        tile = out["pixel_values"].shape[-1]
        g = tile // self._patch // self._scale
        extra = [(int(r[0]), int(c[0]), tile) for r, c in zip(out["rows"], out["cols"])]
        n = [(r * c + 1 if r else 1) * g * g for r, c, _ in extra]
        tensors = {k: out[k] for k in ("pixel_values", "pixel_attention_mask") if k in out}
        return ImageInputs(tensors, n, [(g, g)] * len(images), extra)

    def picture_views(self, image_processor, image_size, grid, extra):
        rows, cols, tile = extra
        return tiled_views(image_size, grid[0], self._patch * self._scale, rows, cols, tile)

    def cell_offsets(self, layout, cell, n_tokens, grid, extra):
        return tiled_cell_offsets(self, layout, cell, n_tokens, grid, extra)

    def expand_placeholder(self, text, at, n_tokens, extra, processor=True):
        # what Idefics3Processor writes, for the checkpoints and vismech's own models alike: each tile opened by
        # the fake token and its row/col marker, a newline after each row of tiles, then the global image
        # between fake tokens
        rows, cols, _ = extra
        per = n_tokens // (rows * cols + 1 if rows else 1)
        run = "".join("".join(f"{_FAKE}<row_{r + 1}_col_{c + 1}>" + self.image_token * per for c in range(cols))
                      + "\n" for r in range(rows))
        run += ("\n" if rows else "") + _FAKE + _GLOBAL + self.image_token * per + _FAKE
        end = at + len(self.image_token)
        return text[:at] + run + text[end:], len(run) - len(self.image_token)
