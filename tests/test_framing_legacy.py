"""vismech's own models (tiny families, shipped organisms) see byte-identical prompts and token ids to the framing
they were built and trained with: golden hashes recorded from the code before chat templates came from checkpoints
(``fixtures/legacy_framing.json``, written by that code for every task and prompt format)."""

import hashlib
import json
from pathlib import Path

import pytest

from vismech.models.load import load_vlm
from vismech.scenes.stimuli import generate

GOLDEN = json.loads((Path(__file__).parent / "fixtures" / "legacy_framing.json").read_text())
MODELS = sorted({k.split("|")[0] for k in GOLDEN})


def _h(x):
    return hashlib.sha256(x.encode() if isinstance(x, str) else json.dumps(x).encode()).hexdigest()


@pytest.mark.parametrize("name", MODELS)
def test_vismech_models_keep_their_framing(name):
    for fmt in ("chat", "plain"):
        vlm = load_vlm(name, prompt_format=fmt, device="cpu")
        assert vlm.framing.vismech and vlm.framing.articles == "a"
        for task in ("scene_description", "color_retrieval", "spatial_relation", "counting"):
            want = GOLDEN[f"{name}|{fmt}|{task}"]
            b = vlm.encode(generate(task, None, 3, 0))
            if want["text0"] is not None:
                assert b.texts[0] == want["text0"]
            assert _h(b.texts) == want["texts"], (name, fmt, task)
            assert _h(b.inputs["input_ids"].tolist()) == want["ids"], (name, fmt, task)
            assert b.mentions == want["mentions"] and b.commas == want["commas"] and b.length == want["length"]
            assert _h([{str(k): v for k, v in o.items()} for o in b.objects]) == want["objects"]
