"""Random weights placed by a device map: the same weights as on one device, and the patching engine gives the same
CMA scores through accelerate's dispatch hooks (every module on the CPU here; the GPU runs are in
benchmarks/multi_gpu.py)."""

import pytest
import torch

from vismech.engine import mediation
from vismech.models.families import family_for_config
from vismech.models.random_weights import random_model
from vismech.models.tiny import tiny_config
from vismech.models.vlm import VLM
from vismech.models.wordtok import build_word_tokenizer
from vismech.scenes.counterfactual import cma_pairs

pytest.importorskip("accelerate")


def _vlm(model, name):
    spec = family_for_config(model.config)
    return VLM(model, build_word_tokenizer(), spec.image_processor_for(model.config), spec, name)


def _per_layer_map(model) -> dict:
    """Every top-level block and every decoder layer as its own entry (all on the CPU), so dispatch puts an
    input-moving hook on each, as it does across GPUs."""
    lm = model.model.language_model
    placement = {f"model.language_model.layers.{i}": "cpu" for i in range(len(lm.layers))}
    for name, _ in model.named_children():
        if name != "model":
            placement[name] = "cpu"
    for name, _ in model.model.named_children():
        if name != "language_model":
            placement[f"model.{name}"] = "cpu"
    for name, _ in lm.named_children():
        if name != "layers":
            placement[f"model.language_model.{name}"] = "cpu"
    return placement


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_dispatched_random_model_has_the_same_weights_and_cma_scores(family):
    cfg = tiny_config(family)
    plain = random_model(cfg, torch.float32, "cpu", seed=3)
    meta = random_model(cfg, torch.float32, "meta")
    mapped = random_model(cfg, torch.float32, device_map=_per_layer_map(meta), seed=3)
    assert hasattr(mapped.model.language_model.layers[0], "_hf_hook")  # accelerate's dispatch hooks are on
    a, b = plain.state_dict(), mapped.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = random_model(cfg, torch.float32, "cpu", seed=4)
    assert not torch.equal(other.lm_head.weight, plain.lm_head.weight)
    pairs = cma_pairs("id_selection", 3, 0, (2, 2))
    s1, n1 = mediation.condition_scores(_vlm(plain, "plain"), pairs, "id_selection", seed=0)
    s2, n2 = mediation.condition_scores(_vlm(mapped, "mapped"), pairs, "id_selection", seed=0)
    assert s1.shape == (cfg.text_config.num_hidden_layers, cfg.text_config.num_attention_heads, 3)
    assert abs(s1).max() > 0
    assert torch.allclose(torch.as_tensor(s1), torch.as_tensor(s2), atol=1e-6)
    assert torch.allclose(torch.as_tensor(n1), torch.as_tensor(n2), atol=1e-6)


def test_auto_map_without_gpus_is_the_cpu_and_bad_maps_are_clear():
    cfg = tiny_config("llava")
    if not torch.cuda.is_available():
        m = random_model(cfg, torch.float32, device_map="auto")
        assert {p.device.type for p in m.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="device_map must be"):
        random_model(cfg, torch.float32, device_map="everywhere")


def test_each_torchrun_process_gets_its_own_share_of_the_gpus(monkeypatch):
    from vismech import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert distributed.process_gpus() == [0, 1, 2, 3]  # one process: every GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for rank, share in ((0, [0, 1]), (1, [2, 3])):
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        assert distributed.process_gpus() == share
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.process_gpus() == [3]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="only 4 GPUs"):
        distributed.process_gpus()


def test_a_parameter_goes_where_its_longest_mapped_prefix_says():
    from vismech.models.random_weights import _device_of

    placement = {"model.language_model.layers.1": 1, "model.language_model.layers.10": "cpu", "model": 0}
    assert _device_of("model.language_model.layers.1.mlp.up_proj.weight", placement) == "cuda:1"
    assert _device_of("model.language_model.layers.10.mlp.up_proj.weight", placement) == "cpu"
    assert _device_of("model.visual.patch_embed.proj.weight", placement) == "cuda:0"
    with pytest.raises(ValueError, match="lm_head.weight"):
        _device_of("lm_head.weight", placement)
