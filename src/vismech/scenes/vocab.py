"""The words of the stimuli: colours (with their RGB values), shapes, relations and every fixed prompt text.

Everything the package can write into a prompt or an answer comes from this module, so a word-level tokenizer for a
tiny model can be built from ``TEMPLATE_TEXTS`` plus ``COLORS``, ``SHAPES``, ``RELATIONS`` and the numbers 0-20.

Assumes a white background (hence no "white" colour) and flat, non-anti-aliased rendering, so the RGB values only
need to be far apart from each other and from white. Every colour and shape name is a single common English word.
The prompt templates are the paper's (arXiv 2506.15871, §3.1/A.3/A.4, §4.3, §4.4, App. C) verbatim.
"""

from __future__ import annotations

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 0),
    "purple": (130, 40, 180),
    "orange": (250, 130, 0),
    "pink": (250, 120, 190),
    "brown": (130, 80, 30),
    "gray": (128, 128, 128),
    "cyan": (0, 200, 210),
    "black": (0, 0, 0),
}

SHAPES: tuple[str, ...] = (
    "circle", "square", "triangle", "cross", "star", "heart", "diamond", "pentagon", "hexagon",
)

# Directions of the spatial-relation task, with the (row, col) step to the object they point at.
RELATIONS: dict[str, tuple[int, int]] = {"above": (-1, 0), "below": (1, 0), "left": (0, -1), "right": (0, 1)}

# Scene description (App. A.3 / A.4): "In this image there is a {c0} {s0}, a {c1} {s1} and a".
DESCRIPTION_OPEN = "In this image there is a "
DESCRIPTION_SEP = ", a "
DESCRIPTION_CLOSE = " and a"

# Colour retrieval (§4.3): "In this image what is the color of the {SHAPE}. Answer with the correct color only."
COLOR_QUESTION_OPEN = "In this image what is the color of the "
COLOR_QUESTION_CLOSE = ". Answer with the correct color only."

# Spatial relation (§4.4): "In this image, what is the color of the object that is directly {RELATION} of {REF}.
# Answer with the relevant color only." with REF = "the {color} {shape}".
RELATION_QUESTION_OPEN = "In this image, what is the color of the object that is directly "
RELATION_QUESTION_REF = " of the "
RELATION_QUESTION_CLOSE = ". Answer with the relevant color only."

# Counting (App. C), with the line breaks the paper prints.
COUNTING_PROMPT = "\n".join([
    "You are given an image containing multiple colored objects. Your task is",
    "to carefully observe the image and identify all the unique colored",
    "objects present.",
    "Enumerate all the unique colored objects you find in the image, providing",
    "a numbered list for clarity.",
    "After listing the objects, provide the total count of these unique",
    "colored objects.",
    "Format the total count by writing 'Answer:' followed by the number. It is",
    "crucial to adhere to this format: 'Answer: TOTAL_COUNT'.",
])

TEMPLATE_TEXTS: tuple[str, ...] = (
    DESCRIPTION_OPEN, DESCRIPTION_SEP, DESCRIPTION_CLOSE,
    COLOR_QUESTION_OPEN, COLOR_QUESTION_CLOSE,
    RELATION_QUESTION_OPEN, RELATION_QUESTION_REF, RELATION_QUESTION_CLOSE,
    COUNTING_PROMPT,
)


def check_color(color: str) -> tuple[int, int, int]:
    """RGB of ``color``; ValueError naming the valid colours if it is unknown."""
    try:
        return COLORS[color]
    except KeyError:
        raise ValueError(f"unknown colour {color!r}; valid colours: {', '.join(COLORS)}") from None


def check_shape(shape: str) -> str:
    """``shape`` itself; ValueError naming the valid shapes if it is unknown."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")
    return shape
