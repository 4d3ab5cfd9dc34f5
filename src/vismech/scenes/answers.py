"""Parse a model's free-text answer into what the tasks score: a colour, a shape, or a count.

The rule, documented because the paper gives none: lower-case the text, split it into words, and take the first
colour word and the first shape word that occur (plural "squares" counts as "square"); a count is the first
integer written in digits or as a word from zero to twenty, taken after the last "Answer:" when the
text has one (the counting prompt asks for that format). A scene-description answer is correct when both the
parsed colour and shape equal the target's; a colour question when the parsed colour does; counting when the
parsed number does. Answers outside that vocabulary (photoreal classes such as "cube", a user's own answers such as
"black cat") are matched word by word instead: the reply's first words, as many as the answer has, after dropping
leading articles ("a", "an", "the"), with a plural "s" on the last word forgiven.
"""

from __future__ import annotations

import re

from .core import Trial
from .vocab import COLORS, SHAPES

NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen twenty").split()


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", text.lower())


def parse_color(text: str) -> str | None:
    return next((w for w in words(text) if w in COLORS), None)


def parse_shape(text: str) -> str | None:
    for w in words(text):
        if w in SHAPES:
            return w
        if w.endswith("s") and w[:-1] in SHAPES:
            return w[:-1]
    return None


def parse_count(text: str) -> int | None:
    """The number after the last "Answer:" if the text has one (the App. C format), else the first number."""
    m = re.findall(r"answer\s*:\s*(\w+)", text.lower())
    if m:
        text = m[-1]
    for w in words(text):
        if w.isdigit():
            return int(w)
        if w in NUMBER_WORDS:
            return NUMBER_WORDS.index(w)
    return None


def leading_words(text: str, n: int) -> str | None:
    """The first ``n`` words of ``text`` after leading articles, lower-cased and joined by spaces (None if fewer)."""
    ws = words(text)
    while ws and ws[0] in ("a", "an", "the"):
        ws = ws[1:]
    return " ".join(ws[:n]) if len(ws) >= n and n > 0 else None


def _in_vocabulary(trial: Trial) -> bool:
    ws = words(trial.answer)
    if trial.task == "scene_description":
        return len(ws) == 2 and ws[0] in COLORS and ws[1] in SHAPES
    if trial.task == "counting":
        return True
    return len(ws) == 1 and ws[0] in COLORS


def parse(trial: Trial, text: str) -> str | None:
    """The answer ``text`` reduced to the form of ``trial.answer`` (None when nothing parses)."""
    if not _in_vocabulary(trial):
        want = words(trial.answer)
        got = leading_words(text, len(want))
        if got is not None and want and got.split()[-1] == want[-1] + "s":
            got = " ".join(got.split()[:-1] + [want[-1]])
        return got
    if trial.task == "scene_description":
        c, s = parse_color(text), parse_shape(text)
        return None if c is None or s is None else f"{c} {s}"
    if trial.task == "counting":
        n = parse_count(text)
        return None if n is None else str(n)
    return parse_color(text)


def is_correct(trial: Trial, text: str) -> bool:
    return parse(trial, text) == " ".join(words(trial.answer))


# -- numbered object lists (the COCO prompt of App. B) -----------------------------------------------------------
#: "In this image there is 1. a": the model continues with its first object, then "2. a ...", ...
OBJECT_LIST_PROMPT = "In this image there is 1. a"
_MARKER = re.compile(r"(?:^|(?<=[\s,;.:]))\(?\d{1,2}[.)](?=\s|$)")
_FLAT = re.compile(r"\s*(?:,|;|\band\b)\s*")
_ARTICLES = ("a", "an", "the", "another")


def _clean_item(item: str) -> str:
    item = item.split("\n", 1)[0]
    ws = re.findall(r"[a-z0-9]+(?:[.'-][a-z0-9]+)*", item.lower())
    while ws and ws[0] in _ARTICLES:
        ws = ws[1:]
    return " ".join(ws)


def _vocabulary_objects(text: str) -> list[str]:
    """A run of vismech's own words split into objects: an optional colour word, then a shape word."""
    out, color = [], None
    for w in words(text):
        if w in COLORS:
            color = w
        elif w in SHAPES or (w.endswith("s") and w[:-1] in SHAPES):
            out.append(f"{color} {w}" if color else w)
            color = None
        elif w not in _ARTICLES:
            return []
    return out


def parse_object_list(text: str) -> list[str]:
    """The objects a model lists after ``OBJECT_LIST_PROMPT``, in order, lower-cased.

    ``text`` is the continuation, so it starts inside item 1 (" dog 2. a cat 3. a bird" -> dog, cat, bird). Rules:
    (1) items are split at numbered markers "2." / "2)" / "(2)" (a number up to two digits followed by "." or ")"
    and a space or the end, at the start or after a space or punctuation, so "2.5 litre" and "10 chairs" are not
    markers); (2) without any marker, the sentence form is split at ",", ";" and "and" ("red square, a blue circle
    and a green triangle"); (3) if that gives one item made only of vismech's colour and shape words, it is split
    into objects of an optional colour and a shape ("red square blue circle"). Each item keeps its first line, is
    lower-cased, loses its punctuation (a word's inner ".", "'" or "-" stays) and leading articles (a, an, the,
    another); empty items are dropped. A multi-word item is kept whole ("man riding a horse").
    """
    parts = _MARKER.split(text)
    if len(parts) == 1:
        parts = _FLAT.split(text)
    items = [c for c in (_clean_item(p) for p in parts) if c]
    if len(items) == 1 and len(vocab := _vocabulary_objects(items[0])) > 1:
        items = vocab
    return items


def same_object(a: str, b: str) -> bool:
    """Two listed objects are the same when equal, or equal once a plural "s" or "es" is added to one of them."""
    return any(x == y or x == y + "s" or x == y + "es" for x, y in ((a, b), (b, a)))
