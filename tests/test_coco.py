"""App. B on photographs: the numbered-list parser on tricky strings, the filter, the splits, and `vismech run coco
--images DIR` end to end on the organism (images generated here: free to redistribute)."""

import json

import numpy as np
import pytest

from vismech.store.results import read_table
from vismech.app.cli import main
from vismech.experiments import coco
from vismech.scenes.answers import parse_object_list, same_object
from vismech.scenes.stimuli import generate, write_stimuli
from vismech.models.load import geometry_for


@pytest.mark.parametrize("text, items", [
    (" dog 2. a cat 3. a bird", ["dog", "cat", "bird"]),
    (" dog\n2. a cat", ["dog", "cat"]),
    (" dog. 2. a cat.", ["dog", "cat"]),
    (" apple 2) an orange (3) the pear", ["apple", "orange", "pear"]),
    (" Cat 2. A DOG", ["cat", "dog"]),
    (" cat, 2. a dog", ["cat", "dog"]),
    (" man riding a horse 2. a horse", ["man riding a horse", "horse"]),
    (" 2.5 liter bottle 2. a cup", ["2.5 liter bottle", "cup"]),
    (" table with 10 chairs 2. a lamp", ["table with 10 chairs", "lamp"]),
    (" child's toy 2. a t-shirt", ["child's toy", "t-shirt"]),
    (" red square, a blue circle and a green triangle", ["red square", "blue circle", "green triangle"]),
    (" blue square black square red square", ["blue square", "black square", "red square"]),
    (" cat 2. a", ["cat"]),
    (" cat", ["cat"]),
    ("", []),
    (" 4 below 4 below", ["4 below 4 below"]),
])
def test_object_list_parser(text, items):
    assert parse_object_list(text) == items


def test_same_object_forgives_plurals_only():
    assert same_object("dog", "dogs") and same_object("glasses", "glass") and same_object("bus", "bus")
    assert not same_object("cat", "dog") and not same_object("cat", "cart")


def test_splits_are_disjoint_halves_and_seeded():
    s = coco.split_halves(7, 3, seed=4)
    assert len(s) == 3
    for src, tgt in s:
        assert len(src) == 4 and len(tgt) == 3 and sorted(np.concatenate([src, tgt]).tolist()) == list(range(7))
    assert [a.tolist() for a, _ in s] != [a.tolist() for a, _ in coco.split_halves(7, 3, seed=5)]
    assert [a.tolist() for a, _ in s] == [a.tolist() for a, _ in coco.split_halves(7, 3, seed=4)]
    assert len({tuple(a) for a, _ in s}) > 1
    v = np.array([[3.0, 4.0], [0.0, 2.0]])
    r = coco.random_like(v, 0)
    assert np.allclose(np.linalg.norm(r, axis=1), [5.0, 2.0]) and not np.allclose(r, v)


def test_run_coco_on_the_organism(tmp_path):
    images = tmp_path / "images"
    write_stimuli(generate("scene_description", (2, 2), 8, 3), geometry_for("organism"), images)
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    heads = [[layer, h] for layer in (3, 4) for h in range(8)]  # given heads (the CMA ranking: the test below)
    assert main(["run", "coco", "--model", "organism", "--images", str(images), "--out", str(out),
                 "--set", f"heads={heads}", "--set", "k=[4, 64]", "--set", "splits=2",
                 "--set", "max_new_tokens=6"]) == 0
    s = json.loads((out / "results" / "coco.json").read_text())
    lists = read_table(out / "results" / "coco_trials.csv")
    assert s["images"] == 8 and len(lists) == 8  # the 8 PNGs, not the text file
    assert s["k"] == [4, 16] and s["splits"] == 2 and s["heads_from"] == "given"  # K capped at the 16 heads
    kept = [r for r in lists if r["kept"] == 1]
    assert s["n_kept"] == len(kept) >= 4  # the organism lists "orange star heart ..."
    rows = read_table(out / "results" / "coco.csv")
    assert len(rows) == 2 * 2 * 3  # splits x K x (none, id, random)
    n_target = s["n_kept"] // 2
    assert all(r["n"] == n_target and r["measure"] == "repeat_rate" for r in rows)
    # no-edit repeat rate = the plain model's arg-max at "... 1. a O0 2. a", computed here independently
    from vismech.models.load import load_vlm
    from vismech.scenes.answers import parse_object_list as parse

    vlm = load_vlm("organism")
    files = coco.list_images(images)
    firsts = [(f, parse(r["generated"])[0]) for f, r in zip(files, lists) if r["kept"] == 1]
    b = vlm.encode([coco.list_trial(f, o) for f, o in firsts])
    plain = (vlm.logits(b).argmax(-1) == vlm.answer_ids(b, [o for _, o in firsts])).numpy()
    for split, (_, tgt) in enumerate(coco.split_halves(len(firsts), 2, 0)):
        none = [r for r in rows if r["split"] == split and r["direction"] == "none"]
        assert none and all(r["repeats"] == int(plain[tgt].sum()) for r in none)
    assert (out / "figures" / "coco.png").exists()


def test_coco_without_images_is_skipped_in_all_and_bad_folders_are_errors(tmp_path, capsys):
    from vismech.experiments.common import Context

    assert "skipped" in coco.run(Context(None, tmp_path, dict(coco.DEFAULTS)))
    # a random tiny model lists no two objects: the CMA ranking is computed, the run ends with a note
    images = tmp_path / "images"
    write_stimuli(generate("scene_description", (2, 2), 3, 0), geometry_for("tiny:qwen2_5_vl"), images)
    assert main(["run", "coco", "--model", "tiny:qwen2_5_vl", "--images", str(images), "--out", str(tmp_path / "t"),
                 "--set", "cma_n=2", "--set", "max_new_tokens=4"]) == 0
    s = json.loads((tmp_path / "t" / "results" / "coco.json").read_text())
    assert s["heads_from"] == "cma top-12 id_selection" and s["k"] == [12]
    assert s["n_kept"] < 2 and "nothing to split" in s["note"]
    assert main(["run", "coco", "--model", "tiny:llava", "--images", str(tmp_path / "none"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["run", "coco", "--model", "tiny:llava", "--images", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "o2")]) == 2
    assert "no JPEG or PNG" in capsys.readouterr().err


def test_coco_annotations(tmp_path):
    ann = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],
           "annotations": [{"image_id": 1, "category_id": 18}, {"image_id": 1, "category_id": 17},
                           {"image_id": 2, "category_id": 18}],
           "categories": [{"id": 17, "name": "cat"}, {"id": 18, "name": "Dog"}]}
    p = tmp_path / "instances.json"
    p.write_text(json.dumps(ann))
    assert coco.annotation_names(p) == {"a.jpg": {"cat", "dog"}, "b.jpg": {"dog"}}
    p.write_text("{}")
    with pytest.raises(ValueError, match="cannot read the COCO annotations"):
        coco.annotation_names(p)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava", "llava_onevision", "idefics2"])
def test_coco_pipeline_on_every_family(tmp_path, monkeypatch, family):
    """The whole App. B path on each family's tiny model; their random weights list nothing, so the lists are given
    (the organism test above generates them for real)."""
    from vismech.models.vlm import VLM

    images = tmp_path / "images"
    write_stimuli(generate("scene_description", (2, 2), 4, 1), geometry_for(f"tiny:{family}"), images)
    lists = iter([" red square 2. a blue circle", " dog 2. a cat 3. a bird", " green star, a green star",
                  " yellow heart\n2. a gray cross", " cat 2. a"])
    monkeypatch.setattr(VLM, "generate", lambda self, batch, n=4: [next(lists) for _ in range(len(batch))])
    out = tmp_path / "run"
    assert main(["run", "coco", "--model", f"tiny:{family}", "--images", str(images), "--out", str(out),
                 "--set", "heads=[[0, 0], [1, 1], [2, 3]]", "--set", "k=[1, 50]", "--set", "splits=2"]) == 0
    s = json.loads((out / "results" / "coco.json").read_text())
    assert s["images"] == 4 and s["n_kept"] == 3 and s["k"] == [1, 3]  # the repeated "green star" is dropped
    rows = (out / "results" / "coco.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 * 3
