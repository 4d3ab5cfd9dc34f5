"""Qwen3-VL: a ViT whose 16 px patches are merged 2x2 into 32 px tokens on a free canvas, interleaved M-RoPE, per-head
q/k norms, and DeepStack visual features added to the language model's residual stream.

Image tokens. One image is ``<|vision_start|>`` + (H/32)(W/32) ``<|image_pad|>`` + ``<|vision_end|>``, tokens
row-major over the merged grid (as in Qwen2-VL). The published processor normalises with mean = std = 0.5 and keeps
an image whose sides are multiples of 32 and whose area lies in [256^2, 4096^2] px; vismech's scenes of 2x2 cells and
more (320 px and up) are kept as they are. ``mm_token_type_ids`` (1 at image tokens) is required by the model whenever
an image is given (transformers raises without it); ``extra_inputs`` adds it.

q/k sites. Each attention normalises queries and keys per head (``q_norm``/``k_norm``, RMSNorm over head_dim) on the
[batch, pos, heads, head_dim] view, after ``q_proj``/``k_proj`` and before rotary embedding, so the ``q`` and ``k``
sites are the outputs of the norms (layout ``bthd``): an edit there is what the rotary embedding and attention read
(an edit of ``k_proj``'s output would be renormalised: a scale change would vanish).

DeepStack. The vision tower also returns, for vision blocks ``deepstack_visual_indexes`` (real sizes: three, e.g.
5/11/17 for 2B, 8/16/24 for 8B and 32B), merged features of every image token. The language model receives them as
``deepstack_visual_embeds`` (a list of [n_image_tokens, hidden] tensors, rows in batch-row then position order) with
``visual_pos_masks`` ([batch, pos], True at the ``<|image_pad|>`` tokens), and after decoder layer j runs, for j < the
number of those tensors (layers 0, 1 and 2 for every released size; 0 and 1 in the tiny model), it adds tensor j to
the residual stream at the image-token positions, and nowhere else. What the analyses do about it:

- ``resid`` at layer l is the decoder layer's output BEFORE that layer's DeepStack addition (the layer's forward
  hook fires first); it holds the additions of layers < l. The next layer's input is ``resid`` plus DeepStack term l
  at the image tokens, so from layer len(deepstack) on ``resid`` holds them all (tested). Text positions never get
  a DeepStack term directly. A residual-stream capture at an image token of layers 0-2 is therefore one DeepStack
  term short of what the next layer reads;
- ``z``, ``q``, ``k`` and ``v`` sit inside a layer, so no DeepStack addition lies between them and the model's use;
  a patch or edit at any site is followed by the DeepStack additions of the run's own image (they are inputs from
  the vision tower, not activations of the language model), as in the model's own forward;
- the fast engine replays them: ``packed_inputs`` declares ``deepstack_visual_embeds`` as packed over
  ``visual_pos_masks``, so the engine cuts the rows of a batch slice, repeats them for stacked patched heads, and
  keeps only the rows of suffix positions after a cached prefix; the shared-prefix engine runs only where the
  recomputed suffix holds no image token (the CMA conditions: mentions and last token, after the image), and the
  engine that copies the prefix per row otherwise (key interventions at image tokens). Its run-time self-check
  compares the replayed clean logits with the full forward's, and fails where the DeepStack inputs are dropped
  (tested).
"""

from __future__ import annotations

from typing import Any

from vismech.scenes.core import Geometry

from ..framing import ChatFormat
from .base import Preset, image_processor_class, normed_qk_sites, text_kwargs
from .qwen2_vl import Qwen2VL

# --------------------------------------------------------------------------------------------------
# Published configs (transformers 5.x layout: the Hub's rope_scaling is stored as rope_parameters, the vision
# model_type "qwen3_vl" as "qwen3_vl_vision"). Token ids are the same for every size.
# --------------------------------------------------------------------------------------------------

_QWEN3_VL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                     vision_end_token_id=151653)


def _text(*, hidden, inter, layers, heads, kv_heads, tie) -> dict[str, Any]:
    # head_dim is 128 for every size: Qwen3-VL-32B has 64 x 128 = 8192 query features on a 5120-wide stream
    return dict(model_type="qwen3_vl_text", vocab_size=151936, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=128,
                hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6, attention_bias=False,
                attention_dropout=0.0, bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=tie,
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [24, 20, 20],
                                 "mrope_interleaved": True})


def _vision(*, depth, hidden, inter, out, deepstack) -> dict[str, Any]:
    return dict(model_type="qwen3_vl_vision", depth=depth, hidden_size=hidden, intermediate_size=inter,
                num_heads=16, in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                out_hidden_size=out, num_position_embeddings=2304, deepstack_visual_indexes=deepstack,
                hidden_act="gelu_pytorch_tanh", initializer_range=0.02)


def _preset(size: str, published: int, source: str, *, text: dict, vision: dict) -> Preset:
    # the top-level tie_word_embeddings decides tying in transformers 5.x (the text config's flag is ignored)
    kwargs = dict(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                  **_QWEN3_VL_IDS)
    return Preset(f"Qwen3-VL-{size}-Instruct", "qwen3_vl", published, source, f"Qwen/Qwen3-VL-{size}-Instruct", kwargs)


_QWEN3_VL_2B = _preset(
    "2B", 2_127_532_032,
    "config: Qwen/Qwen3-VL-2B-Instruct config.json (text = Qwen3-1.7B shape 2048/6144/28 layers/16 heads/8 kv/"
    "head_dim 128, vocab 151936, tied; vision 24 blocks of 1024/4096, DeepStack from blocks 5, 11, 17), quoted in "
    "public loaders pinning the checkpoint; params: 2,127,532,032 safetensors elements (hub 2.13B)",
    text=_text(hidden=2048, inter=6144, layers=28, heads=16, kv_heads=8, tie=True),
    vision=_vision(depth=24, hidden=1024, inter=4096, out=2048, deepstack=[5, 11, 17]),
)
_QWEN3_VL_8B = _preset(
    "8B", 8_767_123_696,
    "config: Qwen3-VL-8B-Instruct (text = Qwen3-8B shape 4096/12288/36 layers/32 heads/8 kv/head_dim 128, untied; "
    "vision 27 blocks of 1152/4304, DeepStack from blocks 8, 16, 24), quoted in public Qwen3VLConfig literals; "
    "params: model.safetensors.index.json total_size 17534247392 bytes bf16 = 8,767,123,696 (hub 8.77B)",
    text=_text(hidden=4096, inter=12288, layers=36, heads=32, kv_heads=8, tie=False),
    vision=_vision(depth=27, hidden=1152, inter=4304, out=4096, deepstack=[8, 16, 24]),
)
_QWEN3_VL_32B = _preset(
    "32B", 33_357_390_064,
    "config: Qwen3-VL-32B-Instruct (text = Qwen3-32B shape 5120/25600/64 layers/64 heads/8 kv/head_dim 128, vocab "
    "151936, untied; vision as 8B with out_hidden_size 5120), from public config contracts of its text and vision "
    "parts; params: 66714780128 bytes bf16 of the loaded model = 33,357,390,064 (hub 33.4B)",
    text=_text(hidden=5120, inter=25600, layers=64, heads=64, kv_heads=8, tie=False),
    vision=_vision(depth=27, hidden=1152, inter=4304, out=5120, deepstack=[8, 16, 24]),
)


class Qwen3VL(Qwen2VL):
    name = "qwen3_vl"
    class_name = "Qwen3VLForConditionalGeneration"
    config_class = "Qwen3VLConfig"
    order = 5
    # 16 px patches merged 2x2 into 32 px tokens, free canvas
    default_geometry = Geometry(32)
    shared_vocab = False  # its special tokens are Qwen2-VL's, already in the shared word vocabulary
    presets = (_QWEN3_VL_2B, _QWEN3_VL_8B, _QWEN3_VL_32B)
    # the Instruct template: ChatML with no default system prompt (Qwen2/2.5-VL's adds one)
    chat = vismech_chat = ChatFormat("<|im_start|>user\n", Qwen2VL.placeholder, "", "<|im_end|>\n",
                                     "<|im_start|>assistant\n", "<|im_start|>assistant\n", "<|im_end|>\n")
    # queries and keys after their per-head norms ([batch, pos, heads, head_dim]), before rotary embedding
    sites = normed_qk_sites("bthd")
    # DeepStack features: one row per image token of the batch, added after the first decoder layers (docstring)
    packed_inputs = {"deepstack_visual_embeds": "visual_pos_masks"}

    def tiny_config(self, tok):
        import transformers as tf

        ids = tok.convert_tokens_to_ids
        # head_dim must be set (the config defaults to 128); mrope_section sums to head_dim / 2, interleaved
        text = text_kwargs(tok, head_dim=16, rms_norm_eps=1e-6,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                            "mrope_interleaved": True})
        # DeepStack from both vision blocks (indexes must be < depth, or DeepStack silently never runs): added
        # after language layers 0 and 1 of 3
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text["hidden_size"],
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1], hidden_act="gelu_pytorch_tanh")
        cfg = tf.Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                               image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                               vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
        cfg.architectures = [self.class_name]
        return cfg

    def image_processor_for(self, config):
        # the published normalisation (mean = std = 0.5); any image of whole tokens is kept as it is
        v = self._vision(config)
        px = v.patch_size * v.spatial_merge_size
        return image_processor_class("Qwen2VLImageProcessor")(
            patch_size=v.patch_size, merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
            size={"shortest_edge": px * px, "longest_edge": px * px * 4096}, image_mean=[0.5] * 3,
            image_std=[0.5] * 3)
