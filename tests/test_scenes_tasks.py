"""Prompts are the paper's templates verbatim and their character spans slice out the expected words."""

import re

import pytest

from vismech.scenes import (
    COLORS, COUNTING_PROMPT, QUESTION_TASKS, RELATIONS, SHAPES, TASK_GENERATORS, TEMPLATE_TEXTS, Obj, Scene,
    CounterfactualPair, color_retrieval, counting, is_question_task, question_tasks, scene_description,
    spatial_relation,
)

RS = Obj("red", "square", (0, 0))
BC = Obj("blue", "circle", (0, 1))
GT = Obj("green", "triangle", (1, 0))
YS = Obj("yellow", "star", (1, 1))
SCENE = Scene((RS, BC, GT, YS), (2, 2))


def sliced(trial, spans):
    return [trial.prompt[a:b] for a, b in spans]


def test_one_object_description_verbatim():
    t = scene_description(SCENE, GT, [RS])
    assert t.prompt == "In this image there is a red square and a"
    assert t.answer == "green triangle" and t.target == GT and t.task == "scene_description"
    assert t.mentioned == (RS,)
    assert sliced(t, t.mentions) == ["red square"]
    assert sliced(t, t.commas) == ["and"]
    assert t.commas == ((36, 39),)


def test_three_object_description_verbatim():
    t = scene_description(SCENE, YS, [BC, GT, RS])
    assert t.prompt == "In this image there is a blue circle, a green triangle, a red square and a"
    assert t.answer == "yellow star"
    assert t.mentioned == (BC, GT, RS)
    assert sliced(t, t.mentions) == ["blue circle", "green triangle", "red square"]
    assert sliced(t, t.commas) == [",", ",", "and"]
    # the comma / "and" token comes right after its mention
    assert [c[0] for c in t.commas] == [t.mentions[0][1], t.mentions[1][1], t.mentions[2][1] + 1]


def test_description_errors():
    with pytest.raises(ValueError, match="must not be among"):
        scene_description(SCENE, GT, [GT, RS])
    with pytest.raises(ValueError, match="not an object of the scene"):
        scene_description(SCENE, Obj("pink", "heart", (0, 0)), [RS])
    with pytest.raises(ValueError, match="at least one"):
        scene_description(SCENE, GT, [])
    with pytest.raises(ValueError, match="twice"):
        scene_description(SCENE, GT, [RS, RS])


def test_color_retrieval_verbatim():
    t = color_retrieval(SCENE, GT)
    assert t.prompt == "In this image what is the color of the triangle. Answer with the correct color only."
    assert t.answer == "green" and t.target == GT and t.mentioned == (GT,)
    assert sliced(t, t.mentions) == ["triangle"] and sliced(t, t.commas) == ["."]
    dup = Scene((RS, Obj("blue", "square", (1, 1))), (2, 2))
    with pytest.raises(ValueError, match="ambiguous"):
        color_retrieval(dup, RS)


def test_spatial_relation_verbatim_and_targets():
    t = spatial_relation(SCENE, RS, "right")
    assert t.prompt == ("In this image, what is the color of the object that is directly right of the red square. "
                        "Answer with the relevant color only.")
    assert t.answer == "blue" and t.target == BC and t.mentioned == (RS,) and t.meta["relation"] == "right"
    assert sliced(t, t.mentions) == ["red square"] and sliced(t, t.commas) == ["."]
    assert spatial_relation(SCENE, RS, "below").answer == "green"
    assert spatial_relation(SCENE, YS, "above").answer == "blue"
    assert spatial_relation(SCENE, YS, "left").answer == "green"
    with pytest.raises(ValueError, match="no object lies directly above"):
        spatial_relation(SCENE, RS, "above")
    with pytest.raises(ValueError, match="unknown relation"):
        spatial_relation(SCENE, RS, "behind")
    sparse = Scene((RS, YS), (2, 2))
    with pytest.raises(ValueError, match="no object lies directly right"):
        spatial_relation(sparse, RS, "right")


def test_counting_prompt_verbatim():
    t = counting(SCENE)
    assert t.prompt == COUNTING_PROMPT
    lines = t.prompt.split("\n")
    assert len(lines) == 9
    assert lines[0] == "You are given an image containing multiple colored objects. Your task is"
    assert lines[-1] == "crucial to adhere to this format: 'Answer: TOTAL_COUNT'."
    assert t.answer == "4" and t.target is None and t.mentions == () and t.task == "counting"
    assert counting(Scene((RS,), (2, 2))).answer == "1"


def test_question_tasks():
    assert question_tasks == QUESTION_TASKS == {"color_retrieval", "spatial_relation", "counting", "question"}
    assert not is_question_task("scene_description") and is_question_task("counting")
    assert is_question_task("question")  # a user's own question prompt (stimulus folders)
    with pytest.raises(ValueError, match="unknown task"):
        is_question_task("captioning")


def test_vocabulary_sizes():
    assert len(COLORS) >= 10 and len(SHAPES) >= 9 and len(set(SHAPES)) == len(SHAPES)
    assert {"circle", "square", "triangle", "cross", "star", "heart", "diamond"} <= set(SHAPES)
    assert set(RELATIONS) == {"above", "below", "left", "right"}


def words(text):
    return re.findall(r"\w+|[^\w\s]", text)


def test_every_prompt_word_comes_from_the_vocabulary():
    vocab = {w for t in TEMPLATE_TEXTS for w in words(t)} | set(COLORS) | set(SHAPES) | set(RELATIONS)
    vocab |= {str(i) for i in range(21)}
    seen_tasks = set()
    for name, gen in TASK_GENERATORS.items():
        for item in gen(None, 2, 1):
            trials = [item.clean, item.counterfactual] if isinstance(item, CounterfactualPair) else [item]
            for t in trials:
                seen_tasks.add(t.task)
                assert set(words(t.prompt)) <= vocab, (name, set(words(t.prompt)) - vocab)
                assert set(words(t.answer)) <= vocab
    assert seen_tasks == {"scene_description", "color_retrieval", "spatial_relation", "counting"}
