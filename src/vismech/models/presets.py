"""Real-size architectures with random weights: ``random:PRESET``.

Each preset holds the published ``config.json`` values of one Hugging Face checkpoint, so that
``random_weights.build_random(name)`` gives the exact module tree and parameter shapes of that model with freshly
initialised (random) weights and no download. On ``device="meta"`` nothing is allocated, which makes
parameter counting and module-path discovery of a 32B model take about a second.

Values were taken from the checkpoints' ``config.json`` as quoted in public code (third-party loaders,
conversion scripts, tests) found with the project's search tools; where no quote was found the value is
derived from the base language / vision model's own published config, and the comment next to it says
so. Only architecture-relevant keys are kept (sizes, vocab, norms, rope, special token ids); generation
settings are left out.

Parameter counts: ``sum(p.numel() for p in model.parameters())``. ``nn.Module.parameters()`` yields a
shared (tied) tensor once, and the Hub's "Model size" figure is computed from the safetensors files, which
store a tied tensor once as well, so tied embeddings are counted once on both sides (only Qwen2.5-VL-3B
ties its input and output embeddings among these presets).
"""

from __future__ import annotations

from typing import Any

from vismech.errors import UserError

from .families import FAMILIES, Preset

__all__ = ["PRESETS", "Preset", "get_preset", "preset_names"]

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


_TABLE = (
    _QWEN2_VL_7B,
    _QWEN2_5_VL_3B,
    _QWEN2_5_VL_7B,
    _QWEN2_5_VL_32B,
    _LLAVA_7B,
    _LLAVA_13B,
    _LLAVA_OV_7B,
    _IDEFICS2_8B,
)


def _collect() -> dict[str, Preset]:
    """The table above, then every family spec's own ``presets`` (families in registry order)."""
    out: dict[str, Preset] = {}
    for p in _TABLE + tuple(p for spec in FAMILIES.values() for p in spec.presets):
        if p.name in out:
            raise RuntimeError(f"two presets are named {p.name!r}")
        if p.family not in FAMILIES:
            raise RuntimeError(f"preset {p.name!r} names an unknown family {p.family!r}")
        out[p.name] = p
    return out


PRESETS: dict[str, Preset] = _collect()


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """Look a preset up by name; ``random:`` prefix allowed. Unknown names raise ``ValueError``."""
    key = name[len("random:"):] if name.startswith("random:") else name
    try:
        return PRESETS[key]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}") from None
