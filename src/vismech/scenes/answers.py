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
