"""Shared fixtures: tiny random models of every family, built once per test session."""

import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

from vismech.models.families import FAMILIES as _SPECS  # noqa: E402

# every registered family (a new family's module is picked up by every parametrised test), and those whose image
# tokens are per-patch
FAMILIES = list(_SPECS)
SPATIAL = [name for name, spec in _SPECS.items() if spec.spatial_tokens]


@functools.lru_cache(maxsize=None)
def tiny(family: str, prompt_format: str = "chat"):
    from vismech.models.load import load_vlm

    return load_vlm(f"tiny:{family}", prompt_format=prompt_format, device="cpu")


@pytest.fixture(params=FAMILIES)
def vlm(request):
    return tiny(request.param)


@pytest.fixture(params=SPATIAL)
def spatial_vlm(request):
    return tiny(request.param)


def two_object_trials():
    from vismech.scenes import tasks
    from vismech.scenes.core import Obj, Scene

    a = Scene((Obj("red", "square", (0, 0)), Obj("blue", "circle", (1, 1))), (2, 2))
    b = Scene((Obj("green", "triangle", (0, 1)), Obj("red", "star", (1, 0)), Obj("blue", "heart", (0, 0))), (2, 2))
    return [tasks.scene_description(a, a.objects[1], a.objects[:1]),
            tasks.scene_description(b, b.objects[2], b.objects[:2])]


def projector_coded_inputs(vlm, batch) -> torch.Tensor:
    """The first decoder layer's input [rows, seq, hidden] when every projector output vector is replaced by its
    own index: channel 0 = its tile (first axis), channel 1 = its patch (second axis); where vismech's recorded
    positions should carry them after the model packs its image tokens."""
    def code(mod, args, out):
        c = torch.zeros_like(out)
        c[..., 0] = torch.arange(out.shape[0])[:, None].float()
        c[..., 1] = torch.arange(out.shape[1])[None, :].float()
        return c

    seen = {}
    h1 = vlm.model.model.multi_modal_projector.register_forward_hook(code)
    h2 = vlm.layers[0].register_forward_pre_hook(lambda m, a, k: seen.update(x=(a[0] if a else k["hidden_states"])),
                                                 with_kwargs=True)
    try:
        vlm.logits(batch)
    finally:
        h1.remove(), h2.remove()
    return seen["x"]
