"""The family spec: everything vismech knows about one VLM family, in one object.

A spec (a subclass of ``Family``, one module per family in this package, found by ``families/__init__``) answers,
for its family: which transformers classes to build (``class_name``, ``config_class``) and which config
``model_type`` it serves; how an image becomes pixel inputs and how many image tokens it takes, where each grid
cell's tokens lie inside that image-token run (and, for an image file, how its pixels reach the token grid:
``picture_views``, so a box or mask finds its tokens); how a prompt is framed (its published chat format,
vismech's own format for the models vismech builds, how its processor expands the image placeholder, and the plain
completion format; ``vismech.models.framing`` applies them); where the hook sites sit in a decoder layer
(``sites``); its tiny test config, its real-size presets and the special tokens of its prompts. Every other
module reads the spec; the adapter (``vismech.models.vlm``), the hooks and the engine never branch on the family.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import transformers as tf

from vismech.scenes.core import Geometry, Layout, Region
from vismech.scenes.regions import MIN_COVERAGE, View, coverage, object_tokens

from ..framing import ChatFormat


def image_processor_class(name: str):
    """The PIL backend of an image-processor class when it exists (no torchvision needed), else the class."""
    return getattr(tf, name + "Pil", None) or getattr(tf, name)


@dataclass(frozen=True)
class ImageInputs:
    """Pixel inputs of a batch of images, and for each image its number of tokens and token-grid shape."""

    tensors: dict[str, torch.Tensor]
    n_tokens: list[int]
    grid: list[tuple[int, int] | None]  # (rows, cols) of the base token grid, None where tokens are not spatial
    extra: list[Any]  # family-specific per-image layout data


@dataclass(frozen=True)
class Site:
    """Where one hook site sits in a decoder layer: the module (its path relative to the decoder layer; empty for the
    layer itself), whether the site is that module's first input (``kind="input"``, a forward pre-hook) or its
    output (``kind="output"``, a forward hook; the first element when it returns a tuple), and the layout of the
    hooked tensor: ``"flat"`` [batch, pos, heads * dim], ``"bthd"`` [batch, pos, heads, dim] or ``"bhtd"``
    [batch, heads, pos, dim]. ``hooks.hooked`` shows every site to its callers as [batch, pos, heads, dim]."""

    module: str
    kind: str = "output"
    layout: str = "flat"

    def __post_init__(self) -> None:
        if self.kind not in ("input", "output"):
            raise ValueError(f"site kind must be 'input' or 'output', not {self.kind!r}")
        if self.layout not in ("flat", "bthd", "bhtd"):
            raise ValueError(f"site layout must be 'flat', 'bthd' or 'bhtd', not {self.layout!r}")


#: The sites of a Llama-style decoder layer (every family so far): head outputs are the input of the attention
#: output projection, queries / keys / values the outputs of their projections (before rotary embedding), the
#: residual stream the layer's output, the MLP's contribution its output.
DEFAULT_SITES: dict[str, Site] = {
    "z": Site("self_attn.o_proj", "input"),
    "q": Site("self_attn.q_proj"),
    "k": Site("self_attn.k_proj"),
    "v": Site("self_attn.v_proj"),
    "resid": Site(""),
    "mlp": Site("mlp"),
}


def normed_qk_sites(layout: str) -> dict[str, Site]:
    """``DEFAULT_SITES`` with ``q``/``k`` at the attention's per-head norms (``self_attn.q_norm``/``k_norm``), for
    language models that RMS-normalise queries and keys before rotary embedding; ``layout``: the norms' tensor
    layout ("bthd" Qwen3, "bhtd" Gemma 3)."""
    return {**DEFAULT_SITES, "q": Site("self_attn.q_norm", layout=layout), "k": Site("self_attn.k_norm", layout=layout)}


@dataclass(frozen=True)
class Preset:
    """One published checkpoint's architecture (``random:NAME``), declared in its family's spec module
    (``Family.presets``) and listed by ``vismech.models.presets.PRESETS``.

    ``kwargs`` are the keyword arguments of the family's top-level config class; nested sub-configs
    are plain dicts carrying their ``model_type`` (the form a Hub ``config.json`` has), which every
    transformers 5.x release turns into the right sub-config class.
    """

    name: str
    family: str
    published_params: float  # parameter count shown on the model's Hugging Face page
    source: str  # where the numbers came from
    hf_id: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def spec(self) -> "Family":
        from . import FAMILIES

        return FAMILIES[self.family]

    @property
    def config_class(self) -> type:
        return getattr(tf, self.spec.config_class)

    @property
    def model_class(self) -> type:
        return self.spec.model_class()

    def config(self) -> tf.PretrainedConfig:
        """A fresh, full config object (``...Config``) with ``architectures`` set."""
        cfg = self.config_class(**copy.deepcopy(self.kwargs))
        cfg.architectures = [self.model_class.__name__]
        cfg.name_or_path = f"random:{self.name}"
        return cfg


def text_kwargs(tok, **over) -> dict[str, Any]:
    """The language-model sizes of every tiny model (width 64, 3 layers, 4 query and 2 key/value heads), with the
    vocabulary and special-token ids of ``tok``; ``over`` replaces or adds keys."""
    kw = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
              pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
              tie_word_embeddings=False)
    kw.update(over)
    return kw


class Family:
    """Base spec. A family module subclasses it, sets the class attributes and overrides the image methods; every
    subclass that sets its own ``name`` is registered (``families.FAMILIES``)."""

    #: the family's name (``tiny:NAME``, ``--arch``, presets' ``family``)
    name: ClassVar[str]
    #: listing order (``vismech models``, test parametrisation): 0-4 are the paper's five families; a new family
    #: takes the next free number (ties are listed by name)
    order: ClassVar[int] = 100
    #: the transformers model and config classes (names, resolved in the installed transformers)
    class_name: ClassVar[str]
    config_class: ClassVar[str]
    #: the config ``model_type`` values this spec serves (default: ``(name,)``)
    model_types: ClassVar[tuple[str, ...]] = ()
    #: the token geometry of the family's real checkpoints (what ``vismech stimuli --model NAME`` renders for)
    default_geometry: ClassVar[Geometry]
    #: special tokens of the family's prompts, for vismech's word tokenizer (``models.wordtok``)
    special_tokens: ClassVar[tuple[str, ...]] = ()
    #: True only for the paper's five families (each sets it in its own class body; it is not inherited), whose
    #: special tokens make up the word vocabulary every tiny model and shipped organism was built with; a new family
    #: leaves it False: its own tokens are appended to its own tokenizer only, so adding a family never changes
    #: another family's token ids
    shared_vocab: ClassVar[bool] = False
    #: config attribute -> token whose id it holds; set to the word tokenizer's ids for ``random:`` presets
    config_tokens: ClassVar[dict[str, str]] = {}
    #: the hook sites of a decoder layer (``Site``); a family with q/k norms points ``q``/``k`` at the norms
    sites: ClassVar[dict[str, Site]] = DEFAULT_SITES
    #: the attention module of a decoder layer (what ``hooks.attention_function`` routes)
    attention_module: ClassVar[str] = "self_attn"
    #: the modules (children of the model's ``model``) that turn pixels into the language model's image inputs
    vision_modules: ClassVar[tuple[str, ...]] = ()
    #: the vision tower attends over packed windows (``models.packed_attention``: one SDPA call per window length)
    packed_vision: ClassVar[bool] = False
    #: language-model inputs packed over the image tokens of the whole batch -> the boolean [batch, pos] input
    #: marking where their rows go (row-major); the fast engine cuts and repeats them along with that mask (and,
    #: like any input beyond embeddings, mask and positions, runs them on its copied-prefix engine)
    packed_inputs: ClassVar[dict[str, str]] = {}
    #: real-size architectures of the family's published checkpoints (``random:NAME``), listed by
    #: ``models.presets.PRESETS``; only those a class sets in its own body count (a subclass does not inherit them)
    presets: ClassVar[tuple[Preset, ...]] = ()
    image_token: ClassVar[str]
    image_open: ClassVar[str] = ""
    image_close: ClassVar[str] = ""
    #: the family's published chat format (used for a real checkpoint that ships no chat template)
    chat: ClassVar[ChatFormat]
    #: the chat format vismech's own models (tiny, presets, organisms) were built and trained with
    vismech_chat: ClassVar[ChatFormat]
    #: what a chat template writes for one image, before the processor expands it
    placeholder: ClassVar[str]
    plain_format: ClassVar[str] = "{image}{text}"
    spatial_tokens: ClassVar[bool] = True
    #: suffixes of the decoder-layer ModuleList of the language model, tried in order
    layer_paths: ClassVar[tuple[str, ...]] = ("model.language_model.layers",)

    def model_class(self):
        return getattr(tf, self.class_name)

    def tiny_config(self, tok) -> tf.PretrainedConfig:
        """The config of the family's tiny test model (``tiny:NAME``; sizes from ``text_kwargs``) whose
        vocabulary and special-token ids are those of ``tok`` (the word tokenizer built for this family)."""
        raise NotImplementedError

    # -- geometry and images -------------------------------------------------------------------------------
    def geometry(self, config, image_processor) -> Geometry:
        raise NotImplementedError

    def image_processor_for(self, config):
        """An image processor matching ``config`` (used for tiny and organism models, which ship none)."""
        raise NotImplementedError

    def process_images(self, image_processor, images) -> ImageInputs:
        raise NotImplementedError

    def packed_images(self, image_processor, images, dtype) -> ImageInputs | None:
        """``process_images`` with the pixels as ``organism.transfer.pack_pixels`` packs them (``pixel_frame`` in
        ``dtype``, ``pixel_repeat``), built so directly (never the repeated frames), or None where the family does
        not build them so."""
        return None

    def _require_spatial(self, n_tokens: int) -> None:
        if not self.spatial_tokens:
            raise ValueError(
                f"{self.name} compresses each image into {n_tokens} resampled tokens with no per-patch "
                "positions, so analyses of object image tokens (key interventions, object-token RSA) cannot run "
                "on it; use a family with per-patch image tokens for those (`vismech models` lists them)"
            )

    def picture_views(self, image_processor, image_size: tuple[int, int], grid, extra) -> list[View]:
        """How an image file of ``image_size`` (W, H) reaches this family's token grid(s)."""
        raise NotImplementedError

    def region_offsets(self, image_processor, image_size: tuple[int, int], region: Region, n_tokens: int, grid,
                       extra, min_coverage: float) -> list[tuple[int, float]]:
        """(offset inside one image's token run, covered fraction) of the tokens that show an object given by its
        ``region`` in an image file of ``image_size`` (``scenes.regions.object_tokens`` in every view)."""
        self._require_spatial(n_tokens)
        out = []
        for view in self.picture_views(image_processor, image_size, grid, extra):
            cov = coverage(region, view, image_size=image_size)
            out += object_tokens(cov, view, min_coverage, what=f"the object in box {list(region.box)}")
        return out

    def cell_offsets(self, layout: Layout, cell, n_tokens: int, grid, extra) -> list[int]:
        """Offsets, inside one image's token run, of the tokens that show the object at ``cell``."""
        self._require_spatial(n_tokens)
        rows, cols = grid
        if rows != layout.grid_tokens or cols != layout.grid_tokens:
            raise ValueError(
                f"the image was resized to a {rows}x{cols} token grid but the scene was laid out on "
                f"{layout.grid_tokens}x{layout.grid_tokens}: render the scene with this model's geometry"
            )
        return layout.cell_tokens(cell)

    def expand_placeholder(self, text: str, at: int, n_tokens: int, extra, processor: bool = True
                           ) -> tuple[str, int]:
        """Expand the image marker (``image_marker``) at ``at`` into the image's run of ``n_tokens``: as the
        family's processor does (``processor``), or as vismech's own models were built (the token repeated). Returns
        the text and the number of characters added."""
        run = self.image_token * n_tokens
        end = at + len(self.image_token)
        return text[:at] + run + text[end:], len(run) - len(self.image_token)

    def image_marker(self, processor: bool) -> str:
        """What a framed prompt holds once for its image and ``expand_placeholder`` expands: the image token, in
        vismech's own format (``processor`` False) and in a chat template or plain prompt of a family whose
        template writes it; a family whose template writes another token (Gemma 3: begin-of-image) returns that."""
        return self.image_token

    def image_text(self, n_tokens: int) -> str:
        return self.image_open + self.image_token * n_tokens + self.image_close

    def extra_inputs(self, input_ids: torch.Tensor, image_token_id: int) -> dict[str, torch.Tensor]:
        return {}

    def bind(self, config) -> "Family":
        """Take the sizes this spec needs from a loaded config; returns self."""
        return self


def _get(size, key: str):
    """``size[key]`` of an image processor's size (a dict or transformers' SizeDict)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def tiled_views(image_size: tuple[int, int], g: int, token_px: float, rows: int, cols: int, tile: int) -> list[View]:
    """How an image of ``image_size`` (W, H) reaches the tokens of a processor that cuts it into tiles: stretched
    to ``rows`` x ``cols`` tiles of ``tile`` px, each seen as g x g tokens of ``token_px`` and held in the run one
    tile after another, then the whole image squashed to one tile, last (``rows`` = 0: that one alone). Every resize
    maps the whole image onto the whole new canvas, so each view is a plain stretch."""
    W, H = image_size
    whole = View(g, g, token_px, (tile / W, tile / H), base=rows * cols * g * g, tile=(tile, g))
    if not rows:
        return [whole]
    return [View(rows * g, cols * g, token_px, (cols * tile / W, rows * tile / H), tile=(tile, g), tile_major=True),
            whole]


def tiled_cell_offsets(spec: Family, layout: Layout, cell, n_tokens: int, grid, extra) -> list[int]:
    """``Family.cell_offsets`` of a tiling spec whose ``extra`` is (rows, cols, tile px): the layout's own tokens
    when the image is one tile, else the tokens of the cell's box in every view (a drawn scene is fed at tile px)."""
    rows, _, tile = extra
    if not rows:
        return Family.cell_offsets(spec, layout, cell, n_tokens, grid, extra)
    got = spec.region_offsets(None, (tile, tile), Region(layout.cell_box(cell)), n_tokens, grid, extra, MIN_COVERAGE)
    return sorted(k for k, _ in got)
