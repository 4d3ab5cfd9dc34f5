"""The paper's four tasks: build one ``Trial`` (prompt, answer, exact character spans) from a scene.

Prompts are the paper's templates verbatim (texts in ``vocab``). Spans are character offsets into the prompt:
``mentions`` cover each described object's "{color} {shape}" phrase (for colour retrieval only the shape word), and
``commas`` cover the token right after each mention: "," after all but the last described object and "and" after
the last one (for the question tasks, the "." that closes the mention). A model adapter maps these spans to token
positions with its tokenizer's offset mapping. Assumes ``Scene`` already guarantees one object per cell.

Articles: the paper writes "a" before every described object ("a orange square" included), and so do these
trials: vismech's own models were trained on exactly these prompts. Real checkpoints read grammar, so the model
adapter gives them ``with_articles(trial)``: "an" before a described object whose colour begins with a vowel
("there is an orange square, a red circle and a"). The final "and a" before the answer stays as the paper has it
(the model's answer is what follows it). Which form a model reads is the model's framing's ``articles``
(``models.framing``), recorded in every run's manifest.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

from .core import Obj, Scene, Trial
from .vocab import (
    COLOR_QUESTION_CLOSE, COLOR_QUESTION_OPEN, COUNTING_PROMPT, DESCRIPTION_CLOSE, DESCRIPTION_OPEN,
    DESCRIPTION_SEP, RELATION_QUESTION_CLOSE, RELATION_QUESTION_OPEN, RELATION_QUESTION_REF, RELATIONS,
    check_color, check_shape,
)

SCENE_DESCRIPTION = "scene_description"
COLOR_RETRIEVAL = "color_retrieval"
SPATIAL_RELATION = "spatial_relation"
COUNTING = "counting"
TASKS: tuple[str, ...] = (SCENE_DESCRIPTION, COLOR_RETRIEVAL, SPATIAL_RELATION, COUNTING)
#: the task name of a user's own question prompt (stimulus folders); any other unknown task name is a completion
QUESTION = "question"

# Tasks whose prompt is a question (a chat model answers it) vs the completion task (the model continues the text).
QUESTION_TASKS: frozenset[str] = frozenset({COLOR_RETRIEVAL, SPATIAL_RELATION, COUNTING, QUESTION})
COMPLETION_TASKS: frozenset[str] = frozenset({SCENE_DESCRIPTION})
question_tasks = QUESTION_TASKS


def is_question_task(task: str) -> bool:
    """True if ``task``'s prompt is a question, False if it is a sentence to complete."""
    if task not in TASKS and task != QUESTION:
        raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}, {QUESTION}")
    return task in QUESTION_TASKS


class _Prompt:
    """Appends text pieces and remembers the span of the ones that matter."""

    def __init__(self) -> None:
        self.text = ""

    def add(self, piece: str) -> tuple[int, int]:
        start = len(self.text)
        self.text += piece
        return start, len(self.text)


def with_articles(trial: Trial) -> Trial:
    """``trial`` with "an" instead of "a" before each described object whose name begins with a vowel, every span
    shifted to match (only scene-description prompts name objects after an article)."""
    if trial.task != SCENE_DESCRIPTION:
        return trial
    prompt = trial.prompt
    inserts = []
    for a, _ in trial.mentions:
        if a >= 3 and prompt[a:a + 1].lower() in tuple("aeiou") and prompt[a - 3:a] == " a ":
            inserts.append(a - 1)  # the "n" goes right after the article's "a"
    if not inserts:
        return trial
    for at in reversed(inserts):
        prompt = prompt[:at] + "n" + prompt[at:]

    def moved(span: tuple[int, int]) -> tuple[int, int]:
        k = sum(at < span[0] for at in inserts)
        return span[0] + k, span[1] + k

    return replace(trial, prompt=prompt, mentions=tuple(moved(s) for s in trial.mentions),
                   commas=tuple(moved(s) for s in trial.commas))


def _check_in_scene(scene: Scene, obj: Obj, role: str) -> None:
    if obj not in scene.objects:
        raise ValueError(f"the {role} {obj} is not an object of the scene {scene.objects}")
    check_color(obj.color)
    check_shape(obj.shape)


def scene_description(scene: Scene, target: Obj, described_order: Sequence[Obj]) -> Trial:
    """The completion task: the prompt names ``described_order`` and the model must name ``target``.

    One described object: ``In this image there is a {color} {shape} and a``; several:
    ``In this image there is a {c0} {s0}, a {c1} {s1}, a {c2} {s2} and a``. The answer is ``target.name``.
    """
    described = tuple(described_order)
    if not described:
        raise ValueError("describe at least one object")
    _check_in_scene(scene, target, "target")
    for o in described:
        _check_in_scene(scene, o, "described object")
    if target in described:
        raise ValueError(f"the target {target} must not be among the described objects")
    if len(set(described)) != len(described):
        raise ValueError(f"an object is described twice in {described}")
    text, mentions, commas = description_prompt([o.name for o in described])
    return Trial(task=SCENE_DESCRIPTION, scene=scene, prompt=text, answer=target.name, target=target,
                 mentioned=described, mentions=mentions, commas=commas)


def description_prompt(names: Sequence[str]) -> tuple[str, tuple, tuple]:
    """The scene-description prompt naming ``names`` in order, with the spans of the names and of the token after
    each ("," or the final "and")."""
    p = _Prompt()
    p.add(DESCRIPTION_OPEN)
    mentions, commas = [], []
    for i, name in enumerate(names):
        if i:
            p.add(DESCRIPTION_SEP[1:])  # the ", a " separator minus the comma, which was recorded already
        mentions.append(p.add(name))
        if i < len(names) - 1:
            commas.append(p.add(DESCRIPTION_SEP[0]))
        else:
            p.add(DESCRIPTION_CLOSE[0])  # the space before "and"
            commas.append(p.add("and"))
            p.add(DESCRIPTION_CLOSE[4:])
    assert p.text.endswith(DESCRIPTION_CLOSE)
    return p.text, tuple(mentions), tuple(commas)


def color_retrieval(scene: Scene, target: Obj) -> Trial:
    """``In this image what is the color of the {SHAPE}. Answer with the correct color only.`` -> target colour.

    The target's shape must be unique in the scene, otherwise the question has no single answer.
    """
    _check_in_scene(scene, target, "target")
    same = [o for o in scene.objects if o.shape == target.shape]
    if len(same) > 1:
        raise ValueError(f"the shape {target.shape!r} appears {len(same)} times in the scene, so the colour "
                         f"question is ambiguous; use a scene where the target's shape is unique")
    p = _Prompt()
    p.add(COLOR_QUESTION_OPEN)
    mention = p.add(target.shape)
    comma = p.add(COLOR_QUESTION_CLOSE[0])
    p.add(COLOR_QUESTION_CLOSE[1:])
    return Trial(task=COLOR_RETRIEVAL, scene=scene, prompt=p.text, answer=target.color, target=target,
                 mentioned=(target,), mentions=(mention,), commas=(comma,))


def relation_target(scene: Scene, ref: Obj, relation: str) -> Obj | None:
    """The object in the cell directly ``relation`` of ``ref`` (None if that cell is empty or off the grid)."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; relations are {', '.join(RELATIONS)}")
    dr, dc = RELATIONS[relation]
    return scene.at((ref.cell[0] + dr, ref.cell[1] + dc))


def spatial_relation(scene: Scene, ref: Obj, relation: str) -> Trial:
    """``In this image, what is the color of the object that is directly {RELATION} of the {color} {shape}.
    Answer with the relevant color only.`` -> the colour of the object in the adjacent cell."""
    _check_in_scene(scene, ref, "reference object")
    target = relation_target(scene, ref, relation)
    if target is None:
        raise ValueError(f"no object lies directly {relation} of the {ref.name} at cell {ref.cell}")
    if sum(o.name == ref.name for o in scene.objects) > 1:
        raise ValueError(f"the reference {ref.name!r} names several objects in the scene")
    p = _Prompt()
    p.add(RELATION_QUESTION_OPEN + relation + RELATION_QUESTION_REF)
    mention = p.add(ref.name)
    comma = p.add(RELATION_QUESTION_CLOSE[0])
    p.add(RELATION_QUESTION_CLOSE[1:])
    return Trial(task=SPATIAL_RELATION, scene=scene, prompt=p.text, answer=target.color, target=target,
                 mentioned=(ref,), mentions=(mention,), commas=(comma,), meta={"relation": relation})


def counting(scene: Scene) -> Trial:
    """The App. C counting prompt; the answer is the number of objects as a decimal string."""
    for o in scene.objects:
        _check_in_scene(scene, o, "object")
    return Trial(task=COUNTING, scene=scene, prompt=COUNTING_PROMPT, answer=str(len(scene.objects)))
