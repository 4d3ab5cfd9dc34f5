"""Real-size ``random:PRESET`` architectures, checked on the meta device (no memory, about a second each).

Parameter counts are ``sum(p.numel() for p in model.parameters())``: a tied tensor is yielded once, which is
also how the Hub's "Model size" (from the safetensors files, where a tied tensor is stored once) counts it.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from vismech.models.presets import PRESETS, Preset, preset_names
from vismech.models.random_weights import build_random

EXPECTED_NAMES = [
    "Qwen2-VL-7B",
    "Qwen2.5-VL-3B",
    "Qwen2.5-VL-7B",
    "Qwen2.5-VL-32B",
    "LLaVA-1.5-7B",
    "LLaVA-1.5-13B",
    "LLaVA-OneVision-7B",
    "Idefics2-8B",
    "Qwen3-VL-2B-Instruct",
    "Qwen3-VL-8B-Instruct",
    "Qwen3-VL-32B-Instruct",
    "gemma-3-4b-it",
    "gemma-3-12b-it",
    "gemma-3-27b-it",
    "SmolVLM-256M-Instruct",
    "SmolVLM-Instruct",
    "Idefics3-8B-Llama3",
    "InternVL3-2B-hf",
    "InternVL3-8B-hf",
    "InternVL3_5-8B-HF",
    "llava-v1.6-mistral-7b-hf",
    "llava-v1.6-vicuna-7b-hf",
]

# name -> (family, LM layers, LM query heads, LM kv heads, LM hidden, vocab, decoder ModuleList path,
#          vision ModuleList path, vision depth, tied input/output embeddings)
EXPECTED = {
    "Qwen2-VL-7B": ("qwen2_vl", 28, 28, 4, 3584, 152064,
                    "model.language_model.layers", "model.visual.blocks", 32, False),
    "Qwen2.5-VL-3B": ("qwen2_5_vl", 36, 16, 2, 2048, 151936,
                      "model.language_model.layers", "model.visual.blocks", 32, True),
    "Qwen2.5-VL-7B": ("qwen2_5_vl", 28, 28, 4, 3584, 152064,
                      "model.language_model.layers", "model.visual.blocks", 32, False),
    "Qwen2.5-VL-32B": ("qwen2_5_vl", 64, 40, 8, 5120, 152064,
                       "model.language_model.layers", "model.visual.blocks", 32, False),
    "LLaVA-1.5-7B": ("llava", 32, 32, 32, 4096, 32064,
                     "model.language_model.layers", "model.vision_tower.encoder.layers", 24, False),
    "LLaVA-1.5-13B": ("llava", 40, 40, 40, 5120, 32064,
                      "model.language_model.layers", "model.vision_tower.encoder.layers", 24, False),
    "LLaVA-OneVision-7B": ("llava_onevision", 28, 28, 4, 3584, 152128,
                           "model.language_model.layers", "model.vision_tower.encoder.layers", 26, False),
    "Idefics2-8B": ("idefics2", 32, 32, 8, 4096, 32003,
                    "model.text_model.layers", "model.vision_model.encoder.layers", 27, False),
    "Qwen3-VL-2B-Instruct": ("qwen3_vl", 28, 16, 8, 2048, 151936,
                             "model.language_model.layers", "model.visual.blocks", 24, True),
    "Qwen3-VL-8B-Instruct": ("qwen3_vl", 36, 32, 8, 4096, 151936,
                             "model.language_model.layers", "model.visual.blocks", 27, False),
    "Qwen3-VL-32B-Instruct": ("qwen3_vl", 64, 64, 8, 5120, 151936,
                              "model.language_model.layers", "model.visual.blocks", 27, False),
    "gemma-3-4b-it": ("gemma3", 34, 8, 4, 2560, 262208,
                      "model.language_model.layers", "model.vision_tower.encoder.layers", 27, True),
    "gemma-3-12b-it": ("gemma3", 48, 16, 8, 3840, 262208,
                       "model.language_model.layers", "model.vision_tower.encoder.layers", 27, True),
    "gemma-3-27b-it": ("gemma3", 62, 32, 16, 5376, 262208,
                       "model.language_model.layers", "model.vision_tower.encoder.layers", 27, True),
    "SmolVLM-256M-Instruct": ("idefics3", 30, 9, 3, 576, 49280,
                              "model.text_model.layers", "model.vision_model.encoder.layers", 12, False),
    "SmolVLM-Instruct": ("idefics3", 24, 32, 32, 2048, 49155,
                         "model.text_model.layers", "model.vision_model.encoder.layers", 27, False),
    "Idefics3-8B-Llama3": ("idefics3", 32, 32, 8, 4096, 128259,
                           "model.text_model.layers", "model.vision_model.encoder.layers", 27, False),
    "InternVL3-2B-hf": ("internvl", 28, 12, 2, 1536, 151674,
                        "model.language_model.layers", "model.vision_tower.encoder.layer", 24, False),
    "InternVL3-8B-hf": ("internvl", 28, 28, 4, 3584, 151674,
                        "model.language_model.layers", "model.vision_tower.encoder.layer", 24, False),
    "InternVL3_5-8B-HF": ("internvl", 36, 32, 8, 4096, 151936,
                          "model.language_model.layers", "model.vision_tower.encoder.layer", 24, False),
    "llava-v1.6-mistral-7b-hf": ("llava_next", 32, 32, 8, 4096, 32064,
                                 "model.language_model.layers", "model.vision_tower.encoder.layers", 24, False),
    "llava-v1.6-vicuna-7b-hf": ("llava_next", 32, 32, 32, 4096, 32064,
                                "model.language_model.layers", "model.vision_tower.encoder.layers", 24, False),
}

#: head widths that are not hidden // heads (Qwen3-VL-32B: 64 query heads of 128 on a 5120-wide stream)
HEAD_DIM = {"Qwen3-VL-32B-Instruct": 128, "gemma-3-4b-it": 256, "gemma-3-12b-it": 256, "gemma-3-27b-it": 128}

FAMILY_CLASSES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration"),
    "llava_onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration"),
    "idefics2": ("Idefics2Config", "Idefics2ForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration"),
    "idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration"),
    "internvl": ("InternVLConfig", "InternVLForConditionalGeneration"),
    "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
}

_BUILT: dict[str, torch.nn.Module] = {}


def meta_model(name: str) -> torch.nn.Module:
    """One meta-device build per preset for the whole module (they are cheap, but not free)."""
    if name not in _BUILT:
        _BUILT[name] = build_random(name, device="meta")
    return _BUILT[name]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors are yielded once


def test_names():
    assert list(PRESETS) == EXPECTED_NAMES
    assert preset_names() == EXPECTED_NAMES
    assert set(EXPECTED) == set(EXPECTED_NAMES)
    for name, preset in PRESETS.items():
        assert isinstance(preset, Preset)
        assert preset.name == name
        assert preset.family in FAMILY_CLASSES
        assert preset.published_params > 1e8  # the smallest, SmolVLM-256M
        assert preset.source.strip()


def test_unknown_name_is_a_one_line_value_error():
    with pytest.raises(ValueError) as info:
        build_random("Qwen9-VL-1B", device="meta")
    msg = str(info.value)
    assert "\n" not in msg
    assert "Qwen9-VL-1B" in msg
    for name in EXPECTED_NAMES:
        assert name in msg


def test_random_prefix_is_accepted():
    model = build_random("random:Qwen2.5-VL-3B", device="meta")
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"


def test_preset_is_frozen():
    with pytest.raises(AttributeError):
        PRESETS["LLaVA-1.5-7B"].name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_config(name):
    preset = PRESETS[name]
    family, layers, heads, kv_heads, hidden, vocab = EXPECTED[name][:6]
    cfg_cls, model_cls = FAMILY_CLASSES[family]
    assert preset.family == family

    cfg = preset.config()
    assert type(cfg) is getattr(transformers, cfg_cls)
    assert cfg.architectures == [model_cls]
    text = cfg.get_text_config()
    assert (text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (layers, heads, kv_heads)
    assert (text.hidden_size, text.vocab_size) == (hidden, vocab)

    # every call gives an independent object
    cfg2 = preset.config()
    assert cfg2 is not cfg
    cfg2.get_text_config().num_hidden_layers = 1
    assert preset.config().get_text_config().num_hidden_layers == layers


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_meta_build_matches_published_size(name):
    preset = PRESETS[name]
    model = meta_model(name)
    assert type(model).__name__ == FAMILY_CLASSES[preset.family][1]
    assert model.config.architectures == [type(model).__name__]

    # nothing allocated: every parameter and buffer lives on the meta device
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "meta" for b in model.buffers())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    count = n_params(model)
    ratio = count / preset.published_params
    assert abs(ratio - 1) < 0.01, f"{name}: built {count / 1e9:.3f}B vs published {preset.published_params / 1e9}B"


@pytest.mark.parametrize("name", EXPECTED_NAMES)
def test_meta_build_structure(name):
    (_, layers, heads, kv_heads, hidden, vocab, decoder_path, vision_path, vision_depth,
     tied) = EXPECTED[name]
    model = meta_model(name)

    decoder = model.get_submodule(decoder_path)
    assert isinstance(decoder, torch.nn.ModuleList) and len(decoder) == layers
    assert len(model.get_submodule(vision_path)) == vision_depth

    attn = decoder[0].self_attn
    head_dim = attn.head_dim
    assert attn.o_proj.in_features == heads * head_dim  # the o_proj input holds the query heads
    assert attn.o_proj.out_features == hidden
    assert attn.k_proj.out_features == kv_heads * head_dim
    assert head_dim == HEAD_DIM.get(name, hidden // heads)

    emb = model.get_input_embeddings()
    assert tuple(emb.weight.shape) == (vocab, hidden)
    assert tuple(model.get_output_embeddings().weight.shape) == (vocab, hidden)
    assert (model.get_output_embeddings().weight is emb.weight) is tied


def test_tied_embeddings_count_once():
    """Qwen2.5-VL-3B ties lm_head to embed_tokens; the count includes that matrix once, as the Hub does."""
    model = meta_model("Qwen2.5-VL-3B")
    distinct = {id(p): p.numel() for m in model.modules() for p in m.parameters(recurse=False)}
    assert n_params(model) == sum(distinct.values())
    with_duplicate = n_params(model) + model.get_output_embeddings().weight.numel()
    assert abs(with_duplicate / PRESETS["Qwen2.5-VL-3B"].published_params - 1) > 0.05


def test_dtype_argument():
    model = build_random("LLaVA-1.5-7B", dtype=torch.float16, device=torch.device("meta"))
    assert {p.dtype for p in model.parameters()} == {torch.float16}
