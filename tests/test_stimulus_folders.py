"""Any user's stimuli: a versioned folder format (images, prompts, answers, objects by box or mask) that every
analysis reads, written by `vismech stimuli` and read by `vismech run --stimuli DIR` and `vismech eval --stimuli`."""

import json

import pytest
from PIL import Image

from conftest import FAMILIES, tiny
from vismech.app.cli import main
from vismech.scenes import answers
from vismech.scenes.core import Obj, Scene, Trial
from vismech.scenes.manifest import load_stimuli


def user_folder(root):
    """Two photographs-like images (a JPEG and a PNG) with two objects each: boxes, one mask, one question."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "imgs").mkdir()
    a = Image.new("RGB", (96, 64), (200, 200, 180))
    a.paste((20, 20, 20), (8, 16, 40, 48))   # a black cat on the left
    a.paste((250, 250, 250), (56, 8, 88, 40))  # a white dog on the right
    a.save(root / "imgs" / "one.jpg", quality=95)
    b = Image.new("RGB", (64, 64), (90, 140, 90))
    b.paste((220, 30, 30), (36, 20, 60, 44))
    b.paste((30, 60, 220), (4, 4, 28, 28))
    b.save(root / "two.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (36, 20, 60, 44))
    mask.save(root / "two-red.png")
    manifest = {"format": "vismech-stimuli", "version": 2, "trials": [
        {"image": "imgs/one.jpg", "prompt": "In this image there is a black cat and a", "answer": "white dog",
         "objects": [{"class": "dog", "color": "white", "box": [56, 8, 88, 40]},
                     {"class": "cat", "color": "black", "box": [8, 16, 40, 48]}],
         "mentioned": [1], "target": 0},
        {"image": "two.png", "task": "question", "prompt": "What is the colour of the ball on the right?",
         "answer": "red", "objects": [{"class": "ball", "color": "red", "box": [36, 20, 60, 44],
                                       "mask": "two-red.png"},
                                      {"class": "box", "color": "blue", "box": [4, 4, 28, 28]}],
         "mentioned": [0], "target": 0, "mentions": [[26, 30]]},
    ]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_a_users_folder_loads_with_defaults(tmp_path):
    items = load_stimuli(user_folder(tmp_path / "mine"))
    cat_dog, ball = items
    # IDs default to left-to-right order by box centre: the cat (left) is (0, 0), the dog (0, 1)
    cat, dog = cat_dog.mentioned[0], cat_dog.target
    assert (cat.name, cat.cell, dog.name, dog.cell) == ("black cat", (0, 0), "white dog", (0, 1))
    assert cat_dog.scene.grid == (1, 2) and cat_dog.task == "scene_description"
    # the mention is found in the prompt, and the comma token is the word after it
    assert cat_dog.prompt[slice(*cat_dog.mentions[0])] == "black cat"
    assert cat_dog.prompt[slice(*cat_dog.commas[0])] == "and"
    assert ball.prompt[slice(*ball.mentions[0])] == "ball" and ball.prompt[slice(*ball.commas[0])] == "on"
    assert ball.picture.region(ball.target.cell).mask.endswith("two-red.png")
    assert cat_dog.picture.region((0, 1)).box == (56.0, 8.0, 88.0, 40.0)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_encodes_and_evaluates_a_users_folder(tmp_path, family):
    folder = user_folder(tmp_path / "mine")
    vlm = tiny(family)
    items = load_stimuli(folder)
    square_only = family in ("llava_onevision", "llava_next")
    if square_only:  # anyres tiles of non-square images are unpadded: refused with a clear error
        with pytest.raises(ValueError, match="square images only; one is 96x64"):
            vlm.encode(items)
        items = items[1:]  # the square one
    b = vlm.encode(items)
    if vlm.family.spatial_tokens:
        for row in range(len(items)):
            assert set(b.objects[row]) == {(0, 0), (0, 1)}
            assert all(0 < c <= 1 for cs in b.coverage[row].values() for c in cs)
    else:
        assert b.objects == [{}, {}]  # resampled tokens: no object tokens, everything else works
    if square_only:
        return
    out = tmp_path / "ev"
    assert main(["eval", "--model", f"tiny:{family}", "--stimuli", str(folder), "--out", str(out)]) == 0
    lines = (out / "trials.csv").read_text().splitlines()
    assert len(lines) == 3 and {"scene_description", "question"} <= {ln.split(",")[3] for ln in lines[1:]}


def test_qwen_tokens_of_a_users_box_and_mask(tmp_path):
    vlm = tiny("qwen2_5_vl")  # 8 px tokens; 96x64 and 64x64 images keep their size
    b = vlm.encode(load_stimuli(user_folder(tmp_path / "mine")))
    start = [b.image_tokens[r][0] for r in range(2)]
    # the cat's box (8, 16, 40, 48) covers token columns 1-4 and rows 2-5 of a 12-column grid exactly
    assert [p - start[0] for p in b.objects[0][(0, 0)]] == [r * 12 + c for r in range(2, 6) for c in range(1, 5)]
    assert b.coverage[0][(0, 0)] == [1.0] * 16
    # the ball's mask (36..60, 20..44) on an 8-column grid: columns 4 (half), 5, 6, 7 (half); rows 2 (half)..5 (half)
    got = dict(zip([p - start[1] for p in b.objects[1][(0, 1)]], b.coverage[1][(0, 1)]))
    assert got[3 * 8 + 5] == 1.0 and got[2 * 8 + 5] == 0.5 and got[4 * 8 + 7] == 0.5  # corners (0.25) dropped
    assert set(got) == {r * 8 + c for r in range(2, 6) for c in range(4, 8)} - {2 * 8 + 4, 2 * 8 + 7, 5 * 8 + 4,
                                                                                 5 * 8 + 7}


def test_stimuli_output_is_valid_run_input(tmp_path):
    folder = tmp_path / "stim"
    assert main(["stimuli", "scene_description", "--grid", "1x2", "--model", "qwen2_5_vl", "--n", "8",
                 "--out", str(folder)]) == 0
    out = tmp_path / "run"
    assert main(["run", "rsa", "pca", "id-intervention", "key-intervention", "--model", "tiny:llava",
                 "--stimuli", str(folder), "--out", str(out), "--set", "n=3", "--set", "n_estimate=3",
                 "--set", "cma_n=2", "--set", "n_boot=10", "--set", "n_null=2", "--set", "alphas=[1]",
                 "--set", "top_k=2", "--set", "k_grid=[1]"]) == 0
    rsa = json.loads((out / "results" / "rsa.json").read_text())
    assert rsa["n_trials"] == 8  # the folder's trials, not a generated set
    key = json.loads((out / "results" / "key_intervention.json").read_text())
    assert key["stimuli"] == f"the stimulus folder {folder}" and key["n_heldout"] == 3
    pairs = tmp_path / "pairs"
    assert main(["stimuli", "cma-id_selection", "--model", "llava", "--n", "4", "--out", str(pairs)]) == 0
    assert main(["run", "cma", "--model", "tiny:qwen2_5_vl", "--stimuli", str(pairs), "--out", str(tmp_path / "c"),
                 "--set", "null_samples=20"]) == 0
    cma = json.loads((tmp_path / "c" / "results" / "cma.json").read_text())
    # the folder has ID pairs only: both ID conditions run on them, feature retrieval is left out
    assert set(cma["conditions"]) == {"id_retrieval", "id_selection"}
    assert cma["conditions"]["id_selection"]["n_pairs"] == 4


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["trials"][0].update(image="../../etc/passwd"), "outside the stimulus folder"),
    (lambda m: m["trials"][0].update(image="/etc/hostname"), "outside the stimulus folder"),
    (lambda m: m["trials"][0].update(image="missing.png"), "does not exist"),
    (lambda m: m.update(version=7), "manifest version 7"),
    (lambda m: m["trials"][0].update(prompt="In this image there is a cat and a"), "does not occur in the prompt"),
    (lambda m: m["trials"][0]["objects"][0].update(box=[10, 10, 5, 20]), "is empty"),
    (lambda m: m["trials"][0]["objects"][0].pop("class"), "no 'class'"),
    (lambda m: m["trials"][0]["objects"][0].update(id=[0, 3]), "every object or for none"),
    (lambda m: m.update(pairs=[{"condition": "id_selection", "clean": 0, "counterfactual": 1, "answer": "a",
                                "answer_star": "b"}]), "prompts differ"),
])
def test_bad_folders_give_one_clear_error(tmp_path, capsys, edit, message):
    folder = user_folder(tmp_path / "mine")
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    (folder / "manifest.json").write_text(json.dumps(m))
    assert main(["eval", "--model", "tiny:llava", "--stimuli", str(folder), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_mask_of_the_wrong_size_is_a_clear_error(tmp_path):
    folder = user_folder(tmp_path / "mine")
    Image.new("L", (10, 10)).save(folder / "two-red.png")
    with pytest.raises(ValueError, match="must have its image's size"):
        tiny("llava").encode(load_stimuli(folder))


def test_answers_outside_the_vocabulary_match_word_by_word():
    t = Trial("scene_description", Scene((Obj("black", "cat", (0, 0)),), (1, 1)), "p", "black cat")
    assert answers.is_correct(t, "black cat and a dog") and answers.is_correct(t, " a Black cats.")
    assert not answers.is_correct(t, "white cat") and not answers.is_correct(t, "black")
    d = Trial("scene_description", Scene((Obj("", "dog", (0, 0)),), (1, 1)), "p", "dog")
    assert d.scene.objects[0].name == "dog" and answers.parse(d, "the dog sleeps") == "dog"
    # the paper's vocabulary keeps its rule (first colour word and first shape word)
    v = Trial("scene_description", Scene((Obj("red", "square", (0, 0)),), (1, 1)), "p", "red square")
    assert answers.is_correct(v, "it is a red big square")
