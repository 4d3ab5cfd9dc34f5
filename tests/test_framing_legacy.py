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


def test_an_organism_saved_without_a_template_is_framed_as_it_was_trained(tmp_path):
    """Organisms trained before checkpoints carried vismech's template (a word-level tokenizer, no chat template)
    still get vismech's own format, so their prompts and ids stay the ones they were trained on."""
    import shutil

    from vismech.models.load import organism_dir

    old = tmp_path / "organism-old"
    shutil.copytree(organism_dir("organism"), old)
    (old / "chat_template.jinja").unlink()
    vlm = load_vlm(str(old), device="cpu")
    assert vlm.framing.vismech and vlm.framing.source == "vismech's own qwen2_5_vl format"
    assert vlm.prompt_format == "chat" and "own model" in vlm.prompt_format_choice["chosen_by"]
    b = vlm.encode(generate("color_retrieval", None, 3, 0))
    assert _h(b.inputs["input_ids"].tolist()) == GOLDEN["organism|chat|color_retrieval"]["ids"]


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava"])
def test_new_organisms_save_vismechs_template(arch, tmp_path):
    """``vismech train-organism`` saves the tokenizer ``build_organism`` made (``train._finish``); it carries the
    family's vismech template, so the saved checkpoint holds chat_template.jinja with it."""
    from vismech.models.families import FAMILIES
    from vismech.models.framing import vismech_template
    from vismech.organism.config import SMALL_SIZES, build_organism

    _, tok, _ = build_organism(arch, 0, **SMALL_SIZES[arch])
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == vismech_template(FAMILIES[arch])
    shipped = {"qwen2_5_vl": "organism", "llava": "organism-llava"}[arch]
    from vismech.models.load import organism_dir

    assert (organism_dir(shipped) / "chat_template.jinja").read_text() == vismech_template(FAMILIES[arch])
