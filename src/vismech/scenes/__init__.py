"""Stimuli for the position-ID experiments: coloured shapes on a grid, the paper's prompts, trial sets, causal
mediation pairs and rendering aligned to a model's image tokens. No torch; everything is deterministic under a seed.

``core`` holds the dataclasses, ``vocab`` the words and prompt texts, ``render`` the images, ``tasks`` one trial per
task, ``sets`` the paper's trial sets, ``counterfactual`` the CMA pairs, ``stimuli`` the registry and files,
``manifest`` the stimulus folder format (any user's images with object boxes or masks), ``regions`` the image tokens
a box or mask covers, and ``photoreal`` the photorealistic two-object scenes (rendered with Mitsuba 3).
"""

from .core import CounterfactualPair, Geometry, Layout, Obj, Picture, Region, Scene, Trial
from .counterfactual import CONDITIONS, cma_pairs
from .render import render, shape_mask
from .sets import (
    ENTROPY_VOCAB, PCA_CELLS, PCA_CONJUNCTIONS, RELABS_CONJUNCTIONS, RELABS_ORIGINS, all_cells, color_retrieval_set,
    counting_set, entropy_conjunctions, entropy_set, knn_protocol, pca_set, relabs_set, scene_description_set,
    spatial_relation_set,
)
from .stimuli import TASK_GENERATORS, generate, load_layouts, load_stimuli, write_stimuli
from .tasks import (
    COLOR_RETRIEVAL, COMPLETION_TASKS, COUNTING, QUESTION_TASKS, SCENE_DESCRIPTION, SPATIAL_RELATION, TASKS,
    color_retrieval, counting, is_question_task, question_tasks, relation_target, scene_description,
    spatial_relation,
)
from .vocab import COLORS, COUNTING_PROMPT, RELATIONS, SHAPES, TEMPLATE_TEXTS

__all__ = [
    "Obj", "Scene", "Geometry", "Layout", "Trial", "CounterfactualPair", "Picture", "Region",
    "COLORS", "SHAPES", "RELATIONS", "TEMPLATE_TEXTS", "COUNTING_PROMPT",
    "render", "shape_mask",
    "SCENE_DESCRIPTION", "COLOR_RETRIEVAL", "SPATIAL_RELATION", "COUNTING", "TASKS", "QUESTION_TASKS",
    "COMPLETION_TASKS", "question_tasks", "is_question_task",
    "scene_description", "color_retrieval", "spatial_relation", "counting", "relation_target",
    "knn_protocol", "pca_set", "entropy_set", "entropy_conjunctions", "relabs_set", "scene_description_set",
    "color_retrieval_set", "spatial_relation_set", "counting_set", "all_cells",
    "PCA_CONJUNCTIONS", "PCA_CELLS", "ENTROPY_VOCAB", "RELABS_ORIGINS", "RELABS_CONJUNCTIONS",
    "CONDITIONS", "cma_pairs",
    "TASK_GENERATORS", "generate", "write_stimuli", "load_stimuli", "load_layouts",
]
