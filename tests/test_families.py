"""The family registry: every spec module is found, its fields are complete, and the word vocabulary keeps the ids
the shipped organisms were trained with."""

import json
import pkgutil

import pytest
import torch
import transformers

from conftest import tiny

from vismech.engine import hooks
from vismech.models import families, wordtok
from vismech.models.families import DEFAULT_GEOMETRY, FAMILIES, MODEL_TYPES, Site, family_for_config
from vismech.models.load import ORGANISMS, organism_dir
from vismech.models.presets import PRESETS
from vismech.models.tiny import tiny_config


def test_every_module_of_the_package_is_registered():
    modules = {m.name for m in pkgutil.iter_modules(families.__path__)} - {"base"}
    assert modules == {type(spec).__module__.rsplit(".", 1)[1] for spec in FAMILIES.values()}
    assert list(FAMILIES)[:5] == ["qwen2_vl", "qwen2_5_vl", "llava", "llava_onevision", "idefics2"]
    assert set(DEFAULT_GEOMETRY) == set(FAMILIES)
    assert all(FAMILIES[MODEL_TYPES[mt]].name == MODEL_TYPES[mt] for mt in MODEL_TYPES)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_spec_fields_are_complete(name):
    spec = FAMILIES[name]
    assert isinstance(spec.config_class, str) and hasattr(transformers, spec.config_class)
    assert spec.model_class() is getattr(transformers, spec.class_name)
    assert set(spec.sites) == set(hooks.SITES) and all(isinstance(s, Site) for s in spec.sites.values())
    assert spec.vision_modules and spec.special_tokens and spec.image_token in spec.special_tokens
    cfg = tiny_config(name)
    assert type(cfg).__name__ == spec.config_class and cfg.architectures == [spec.class_name]
    assert family_for_config(cfg).name == name
    tok = wordtok.build_word_tokenizer(family=name)
    for attr, token in spec.config_tokens.items():  # what a random: preset's ids are pointed at
        assert hasattr(cfg, attr) and getattr(cfg, attr) == tok.convert_tokens_to_ids(token) != tok.unk_token_id
    for p in spec.presets:
        assert p.family == name and PRESETS[p.name] is p


@pytest.mark.parametrize("name", list(FAMILIES))
def test_site_map_and_module_names_exist_in_the_model(name):
    """Every module the spec names (hook sites, attention, vision tower and projector) is in its tiny model
    (``get_submodule`` raises on a wrong path)."""
    vlm = tiny(name)
    layer = vlm.layers[0]
    assert vlm.attention(0) is layer.get_submodule(FAMILIES[name].attention_module)
    for site, where in FAMILIES[name].sites.items():
        layer.get_submodule(where.module)
    for m in FAMILIES[name].vision_modules:
        assert isinstance(getattr(vlm.model.model, m), torch.nn.Module), m


def test_shipped_organisms_keep_their_token_ids():
    """The organisms were trained with vismech's word tokenizer: rebuilding it gives their saved vocabulary."""
    for name, arch in ORGANISMS.items():
        saved = json.loads((organism_dir(name) / "tokenizer.json").read_text())["model"]["vocab"]
        assert wordtok.build_word_tokenizer(family=arch).get_vocab() == saved, name


def test_a_new_familys_tokens_reach_only_its_own_tokenizer(monkeypatch):
    class Fresh(type(FAMILIES["idefics2"])):  # a subclass of one of the five does not inherit shared_vocab
        name, order, special_tokens = "fresh", 99, ("<image>", "<|fresh|>", "<fresh_end>")

    before = {f: wordtok.build_word_tokenizer(family=f).get_vocab() for f in (None, "qwen2_vl", "idefics2")}
    monkeypatch.setitem(FAMILIES, "fresh", Fresh())
    for fam, vocab in before.items():
        assert wordtok.build_word_tokenizer(family=fam).get_vocab() == vocab
    shared = wordtok.special_tokens()
    assert wordtok.special_tokens("fresh") == shared + ("<|fresh|>", "<fresh_end>")
    vocab = wordtok.build_word_tokenizer(family="fresh").get_vocab()
    assert vocab["<|fresh|>"] == len(shared) and vocab["<image>"] == before[None]["<image>"]
