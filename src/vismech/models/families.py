"""One small spec per supported VLM family: classes, prompt formats, image inputs and image-token layout.

A spec answers, for its family: which transformers class to build, how an image becomes pixel inputs and how many
image tokens it takes, where each grid cell's tokens lie inside that image-token run (and, for an image file, how its
pixels reach the token grid: ``picture_views``, so a box or mask finds its tokens), and how a prompt is framed
(its published chat format, vismech's own format for the models vismech builds, how its processor expands the image
placeholder, and the plain completion format; ``vismech.models.framing`` applies them). Adding a family means adding a
spec here; the adapter (`vismech.models.vlm`) and the hooks never branch on the family.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import transformers as tf

from vismech.errors import UserError
from vismech.scenes.core import Geometry, Layout, Region
from vismech.scenes.regions import View, coverage, object_tokens

from .framing import ChatFormat

QWEN_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


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


class Family:
    """Base spec. Subclasses set the class attributes and override the image methods."""

    name: ClassVar[str]
    class_name: ClassVar[str]
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

    # -- geometry and images -------------------------------------------------------------------------------
    def geometry(self, config, image_processor) -> Geometry:
        raise NotImplementedError

    def image_processor_for(self, config):
        """An image processor matching ``config`` (used for tiny and organism models, which ship none)."""
        raise NotImplementedError

    def process_images(self, image_processor, images) -> ImageInputs:
        raise NotImplementedError

    def _require_spatial(self, n_tokens: int) -> None:
        if not self.spatial_tokens:
            raise ValueError(
                f"{self.name} compresses each image into {n_tokens} resampled tokens with no per-patch "
                "positions, so analyses of object image tokens (key interventions, object-token RSA) cannot run "
                "on it; use a Qwen or LLaVA family model for those"
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
        """Expand the image token at ``at`` into the image's run of ``n_tokens``: as the family's processor does
        (``processor``), or as vismech's own models were built (the token repeated). Returns the text and the number
        of characters added."""
        run = self.image_token * n_tokens
        end = at + len(self.image_token)
        return text[:at] + run + text[end:], len(run) - len(self.image_token)

    def image_text(self, n_tokens: int) -> str:
        return self.image_open + self.image_token * n_tokens + self.image_close

    def extra_inputs(self, input_ids: torch.Tensor, image_token_id: int) -> dict[str, torch.Tensor]:
        return {}

    def bind(self, config) -> "Family":
        """Take the sizes this spec needs from a loaded config; returns self."""
        return self


class Qwen2VL(Family):
    name = "qwen2_vl"
    class_name = "Qwen2VLForConditionalGeneration"
    image_token = "<|image_pad|>"
    image_open, image_close = "<|vision_start|>", "<|vision_end|>"
    placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    chat = vismech_chat = ChatFormat(QWEN_SYSTEM + "<|im_start|>user\n", placeholder, "", "<|im_end|>\n",
                                     "<|im_start|>assistant\n", "<|im_start|>assistant\n", "<|im_end|>\n")

    def _vision(self, config):
        return config.vision_config

    def geometry(self, config, image_processor) -> Geometry:
        v = self._vision(config)
        return Geometry(token_px=v.patch_size * v.spatial_merge_size)

    def image_processor_for(self, config):
        v = self._vision(config)
        px = v.patch_size * v.spatial_merge_size
        return image_processor_class("Qwen2VLImageProcessor")(
            patch_size=v.patch_size, merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
            min_pixels=px * px, max_pixels=px * px * 4096)

    def picture_views(self, image_processor, image_size, grid, extra):
        # the processor resizes the image to exactly the token grid (its smart_resize), without cropping
        rows, cols = grid
        t = image_processor.patch_size * image_processor.merge_size
        return [View(rows, cols, t, (cols * t / image_size[0], rows * t / image_size[1]))]

    def process_images(self, image_processor, images) -> ImageInputs:
        out = image_processor(images=images, return_tensors="pt")
        m = image_processor.merge_size
        thw = out["image_grid_thw"]
        grids = [(int(h) // m, int(w) // m) for _, h, w in thw.tolist()]
        n = [int(t) * r * c for (t, _, _), (r, c) in zip(thw.tolist(), grids)]
        return ImageInputs({"pixel_values": out["pixel_values"], "image_grid_thw": thw}, n, grids, [None] * len(n))

    def extra_inputs(self, input_ids, image_token_id):
        # transformers 5.x builds Qwen's 3-D M-RoPE positions from this; without it, it silently uses 1-D ones
        return {"mm_token_type_ids": (input_ids == image_token_id).to(torch.int32)}


class Qwen25VL(Qwen2VL):
    name = "qwen2_5_vl"
    class_name = "Qwen2_5_VLForConditionalGeneration"


class Llava(Family):
    name = "llava"
    class_name = "LlavaForConditionalGeneration"
    image_token = "<image>"
    placeholder = "<image>"
    # llava-hf's template: "USER: <image>\nQUESTION ASSISTANT:"; an assistant turn is "ASSISTANT: TEXT "
    chat = ChatFormat("USER: ", "<image>\n", "", " ", "ASSISTANT: ", "ASSISTANT:", " ")
    vismech_chat = ChatFormat("USER: ", "<image>", "\n", " ", "ASSISTANT:", "ASSISTANT:", "</s>")
    plain_format = "{image}\n{text}"

    def geometry(self, config, image_processor) -> Geometry:
        v = config.vision_config
        return Geometry(token_px=v.patch_size, canvas_tokens=v.image_size // v.patch_size, input_px=v.image_size)

    def image_processor_for(self, config):
        s = config.vision_config.image_size
        return image_processor_class("CLIPImageProcessor")(size={"shortest_edge": s},
                                                           crop_size={"height": s, "width": s})

    def process_images(self, image_processor, images) -> ImageInputs:
        out = image_processor(images=images, return_tensors="pt")
        pv = out["pixel_values"]
        g = pv.shape[-1] // self._patch
        return ImageInputs({"pixel_values": pv}, [g * g] * len(images), [(g, g)] * len(images), [None] * len(images))

    _patch: int = 14

    def bind(self, config):
        self._patch = config.vision_config.patch_size
        return self

    def picture_views(self, image_processor, image_size, grid, extra):
        # CLIP-style processing: (LlavaImageProcessor's do_pad: pad to a centred square,) resize (shortest edge or
        # a fixed size), centre crop; the crop is cut into patch-size tokens
        W, H = image_size
        ox = oy = 0.0
        if getattr(image_processor, "do_pad", False):
            side = max(W, H)
            ox, oy, W, H = (side - W) // 2, (side - H) // 2, side, side
        size = image_processor.size
        if not getattr(image_processor, "do_resize", True):
            h2, w2 = H, W
        elif _get(size, "height") and _get(size, "width"):
            h2, w2 = _get(size, "height"), _get(size, "width")
        elif _get(size, "shortest_edge") and not _get(size, "longest_edge"):
            s = _get(size, "shortest_edge")
            short, long = min(W, H), max(W, H)
            h2, w2 = (int(s * long / short), s) if W <= H else (s, int(s * long / short))
        else:
            raise ValueError(f"vismech cannot map boxes through an image processor with size {size}; use one with "
                             "a shortest_edge or height/width size")
        sx, sy = w2 / W, h2 / H
        left = top = 0
        if getattr(image_processor, "do_center_crop", False):
            crop = image_processor.crop_size
            top, left = (h2 - _get(crop, "height")) // 2, (w2 - _get(crop, "width")) // 2
        g = grid[0]
        return [View(g, g, self._patch, (sx, sy), (ox * sx - left, oy * sy - top))]


class LlavaOnevision(Llava):
    name = "llava_onevision"
    class_name = "LlavaOnevisionForConditionalGeneration"
    # the llava-hf checkpoints' template ("<|im_start|>user\n<image>\nTEXT<|im_end|>\n..."), with the Qwen system
    # prompt LLaVA-OneVision was trained with
    chat = ChatFormat(QWEN_SYSTEM + "<|im_start|>user\n", "<image>\n", "", "<|im_end|>\n",
                      "<|im_start|>assistant\n", "<|im_start|>assistant\n", "<|im_end|>\n")
    vismech_chat = ChatFormat("<|im_start|>user ", "<image>", "\n", "<|im_end|>", "<|im_start|>assistant\n",
                              "<|im_start|>assistant\n", "<|im_end|>")

    def image_processor_for(self, config):
        s = config.vision_config.image_size
        return image_processor_class("LlavaOnevisionImageProcessor")(
            size={"height": s, "width": s}, image_grid_pinpoints=config.image_grid_pinpoints)

    def process_images(self, image_processor, images) -> ImageInputs:
        odd = next((im.size for im in images if im.size[0] != im.size[1]), None)
        if odd is not None:  # anyres unpads a non-square image's tiles, which the token layout here does not follow
            raise ValueError(f"vismech runs LLaVA-OneVision on square images only; one is {odd[0]}x{odd[1]}: pad or "
                             "crop your images to squares")
        out = image_processor(images=images, return_tensors="pt")
        pv = out["pixel_values"]
        p = pv.shape[-1] // self._patch
        tiles = pv.shape[1] - 1
        scale = math.isqrt(tiles)
        if scale * scale != tiles:
            raise ValueError("vismech needs square canvases for LLaVA-OneVision (anyres tiles of a square grid)")
        hi = p * scale
        n = p * p + hi * (hi + 1)  # base grid, then the high-resolution grid with one newline token per row
        return ImageInputs({"pixel_values": pv, "image_sizes": out["image_sizes"]}, [n] * len(images),
                           [(p, p)] * len(images), [scale] * len(images))

    def picture_views(self, image_processor, image_size, grid, extra):
        # base image resized to size x size; anyres tiles of the same size, scale x scale of them for a square image
        W, H = image_size  # square: process_images refuses others
        S, p, scale = _get(image_processor.size, "height"), grid[0], extra
        base = View(p, p, self._patch, (S / W, S / H))
        hi = View(p * scale, p * scale, self._patch, (scale * S / W, scale * S / H), base=p * p,
                  row_stride=p * scale + 1, tile=(S, p))
        return [base, hi]

    def cell_offsets(self, layout, cell, n_tokens, grid, extra):
        base = super().cell_offsets(layout, cell, n_tokens, grid, extra)
        p, scale = grid[0], extra
        hi = []
        for b in base:
            r, c = divmod(b, p)
            for i in range(scale):
                for j in range(scale):
                    hr, hc = r * scale + i, c * scale + j
                    hi.append(p * p + hr * (p * scale + 1) + hc)
        return base + sorted(hi)


class Idefics2(Family):
    name = "idefics2"
    class_name = "Idefics2ForConditionalGeneration"
    image_token = "<image>"
    image_open = image_close = "<fake_token_around_image>"
    placeholder = "<image>"
    # the published template: "User:<image>QUESTION<end_of_utterance>\nAssistant:"; an assistant turn whose
    # content starts with text is "Assistant: TEXT<end_of_utterance>\n"
    chat = ChatFormat("User:", "<image>", "", "<end_of_utterance>\n", "Assistant: ", "Assistant:",
                      "<end_of_utterance>\n")
    vismech_chat = ChatFormat("User:", "<fake_token_around_image><image><fake_token_around_image>", "",
                              "<end_of_utterance>\n", "Assistant:", "Assistant:", "<end_of_utterance>\n")
    plain_format = "{image}{text}"
    spatial_tokens = False
    layer_paths = ("model.text_model.layers",)

    def geometry(self, config, image_processor) -> Geometry:
        v = config.vision_config
        size = getattr(image_processor, "size", None) or {}  # the processor resizes the short side to this
        px = size.get("shortest_edge") if isinstance(size, dict) else None
        return Geometry(token_px=v.patch_size, canvas_tokens=(px or v.image_size) // v.patch_size)

    def image_processor_for(self, config):
        s = config.vision_config.image_size
        return image_processor_class("Idefics2ImageProcessor")(size={"shortest_edge": s, "longest_edge": s},
                                                               do_image_splitting=False)

    def process_images(self, image_processor, images) -> ImageInputs:
        out = image_processor(images=[[im] for im in images], return_tensors="pt")
        k = out["pixel_values"].shape[1]  # 1, or 5 when the processor splits each image into 4 crops + itself
        n = self._latents * k
        return ImageInputs({"pixel_values": out["pixel_values"], "pixel_attention_mask": out["pixel_attention_mask"]},
                           [n] * len(images), [None] * len(images), [k] * len(images))

    def expand_placeholder(self, text, at, n_tokens, extra, processor=True):
        if not processor:
            return super().expand_placeholder(text, at, n_tokens, extra, processor)
        # Idefics2Processor: <fake> + latents x <image> + <fake> per (sub-)image, fake tokens shared between
        # neighbours, and a space after the closing fake token when a word follows it directly
        k = extra or 1
        run = self.image_open + (self.image_token * (n_tokens // k) + self.image_close) * k
        end = at + len(self.image_token)
        if end < len(text) and not text[end].isspace() and text[end] != "<":
            run += " "
        return text[:at] + run + text[end:], len(run) - len(self.image_token)

    _latents: int = 64

    def bind(self, config):
        self._latents = config.perceiver_config.resampler_n_latents
        return self


def _get(size, key: str):
    """``size[key]`` of an image processor's size (a dict or transformers' SizeDict)."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


FAMILIES: dict[str, Family] = {f.name: f for f in (Qwen2VL(), Qwen25VL(), Llava(), LlavaOnevision(), Idefics2())}

#: The token geometry of the real checkpoints of each family (what ``vismech stimuli --model FAMILY`` renders for):
#: Qwen: 14 px patches merged 2x2 into 28 px tokens, free canvas; LLaVA-1.5: 336 px CLIP with 14 px patches;
#: LLaVA-OneVision: 384 px SigLIP with 14 px patches (27 tokens, 378 px drawn, padded to 384); Idefics2: 378 px.
DEFAULT_GEOMETRY: dict[str, Geometry] = {
    "qwen2_vl": Geometry(28), "qwen2_5_vl": Geometry(28), "llava": Geometry(14, canvas_tokens=24),
    "llava_onevision": Geometry(14, canvas_tokens=27, input_px=384), "idefics2": Geometry(14, canvas_tokens=27),
}

#: model_type of a config -> family name
MODEL_TYPES = {"qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl", "llava": "llava",
               "llava_onevision": "llava_onevision", "idefics2": "idefics2"}


def family_for_config(config) -> Family:
    """The spec for a loaded config, bound to its sizes; a clear error for unsupported architectures."""
    fam = MODEL_TYPES.get(getattr(config, "model_type", None))
    if fam is None:
        raise UserError(
            f"model type {getattr(config, 'model_type', None)!r} is not supported; vismech supports "
            f"{', '.join(sorted(FAMILIES))} (see `vismech models`)"
        )
    return type(FAMILIES[fam])().bind(config)
