"""The model adapter: a loaded VLM plus what vismech needs to know about it.

``VLM`` wraps a HF ``...ForConditionalGeneration`` with its tokenizer, image processor and family spec. It turns
trials into left-padded batches and records, for every row, the input positions of each object's image tokens
(from its grid cell, or for a trial with a ``Picture`` from its box or mask, with the fraction of each token it
covers), each prompt mention, the token after each mention (the paper's "comma" tokens) and the last token. It also
exposes the language model's decoder layers and head sizes for the hooks. It never registers hooks itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from vismech.scenes.core import Layout, Trial
from vismech.scenes.regions import MIN_COVERAGE
from vismech.scenes.render import render
from vismech.scenes.tasks import question_tasks

from .families import Family


@dataclass
class Batch:
    """Model inputs for a list of trials, left-padded to one length, with the positions analyses need.

    All positions are absolute indices into the padded sequence of length ``length``; the last token of every
    row is at ``length - 1``. ``objects[row][cell]`` are the image-token positions of the object at ``cell`` and
    ``coverage[row][cell]`` the fraction of each of those tokens it covers (1.0 for drawn scenes).
    """

    inputs: dict[str, torch.Tensor]
    trials: list[Trial]
    length: int
    objects: list[dict[tuple[int, int], list[int]]]
    mentions: list[list[list[int]]]
    commas: list[list[int]]
    image_tokens: list[list[int]]
    texts: list[str] = field(repr=False)
    coverage: list[dict[tuple[int, int], list[float]]] = field(default_factory=list, repr=False)

    @property
    def last(self) -> int:
        return self.length - 1

    def __len__(self) -> int:
        return len(self.trials)


class VLM:
    """A loaded VLM with its tokenizer, image processor and family spec."""

    #: a picture's object owns the image tokens it covers at least this fraction of (``scenes.regions``)
    min_coverage: float = MIN_COVERAGE

    def __init__(self, model, tokenizer, image_processor, family: Family, name: str, prompt_format: str = "chat"):
        if prompt_format not in ("chat", "plain"):
            raise ValueError(f"prompt_format must be 'chat' or 'plain', not {prompt_format!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.family = family
        self.name = name
        self.prompt_format = prompt_format
        cfg = model.config
        self.text_config = cfg.get_text_config()
        self.image_token_id = int(cfg.image_token_id)
        self.geometry = family.geometry(cfg, image_processor)
        self.layers = self._find_layers()
        tc = self.text_config
        self.n_layers = len(self.layers)
        self.n_heads = tc.num_attention_heads
        self.n_kv_heads = getattr(tc, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // self.n_heads
        self._image_px = self._expected_image_px()

    # -- structure ------------------------------------------------------------------------------------------
    def _find_layers(self) -> torch.nn.ModuleList:
        modules = dict(self.model.named_modules())
        for path in self.family.layer_paths:
            for name, mod in modules.items():
                if (name == path or name.endswith("." + path)) and isinstance(mod, torch.nn.ModuleList):
                    return mod
        raise ValueError(
            f"could not find the language model's decoder layers ({', '.join(self.family.layer_paths)}) in "
            f"{type(self.model).__name__}; this transformers version lays the model out differently than vismech "
            "expects: please report it with `pip show transformers`"
        )

    def attention(self, layer: int) -> torch.nn.Module:
        return self.layers[layer].self_attn

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the embedding's device (differs from ``device`` under a multi-GPU device_map)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- images ---------------------------------------------------------------------------------------------
    def layout(self, grid: tuple[int, int]) -> Layout:
        return self.geometry.layout(*grid)

    def _expected_image_px(self) -> int | None:
        if self.geometry.canvas_tokens is None:
            return None
        size = getattr(self.image_processor, "size", None) or {}
        for key in ("height", "shortest_edge"):
            if isinstance(size, dict) and size.get(key):
                return int(size[key])
        return self.geometry.canvas_tokens * self.geometry.token_px

    def render(self, trial: Trial) -> Image.Image:
        """The trial's picture file, or its scene drawn on this model's token grid, padded (right and bottom) to
        its input size."""
        if trial.picture is not None:
            try:
                with Image.open(trial.picture.path) as im:
                    return im.convert("RGB")
            except OSError as e:
                raise ValueError(f"cannot read the image {trial.picture.path}: {e}") from None
        layout = self.layout(trial.scene.grid)
        img = render(trial.scene, layout)
        px = self._image_px
        if px is not None and px != img.width:
            if px < img.width:
                raise ValueError(f"the {img.width}px canvas is larger than this model's {px}px input")
            canvas = Image.new("RGB", (px, px), (255, 255, 255))
            canvas.paste(img, (0, 0))
            img = canvas
        return img

    # -- text -----------------------------------------------------------------------------------------------
    def frame(self, trial: Trial, n_image_tokens: int) -> tuple[str, int]:
        return self.family.frame(self.family.image_text(n_image_tokens), trial.prompt,
                                 question=trial.task in question_tasks, chat=self.prompt_format == "chat")

    def encode(self, trials: list[Trial], images: list[Image.Image] | None = None) -> Batch:
        """Left-padded model inputs for ``trials`` and the token positions of objects, mentions and commas."""
        if not trials:
            raise ValueError("no trials to encode")
        images = images if images is not None else [self.render(t) for t in trials]
        img = self.family.process_images(self.image_processor, images)
        rows, texts = [], []
        for i, t in enumerate(trials):
            text, start = self.frame(t, img.n_tokens[i])
            enc = self.tokenizer(text, return_offsets_mapping=True)
            ids, offs = enc["input_ids"], enc["offset_mapping"]
            image_pos = [j for j, x in enumerate(ids) if x == self.image_token_id]
            if len(image_pos) != img.n_tokens[i]:
                raise ValueError(f"expected {img.n_tokens[i]} image tokens, the tokenizer produced {len(image_pos)}")

            def span_tokens(a: int, b: int) -> list[int]:
                a, b = a + start, b + start
                hit = [j for j, (s, e) in enumerate(offs) if e > s and s < b and e > a]
                if not hit:
                    raise ValueError(f"no token covers {text[a:b]!r} in the prompt")
                return hit

            mentions = [span_tokens(*s) for s in t.mentions]
            commas = [span_tokens(*s)[0] for s in t.commas]
            objects, cover = {}, {}
            if self.family.spatial_tokens and t.picture is not None:
                for o in t.scene.objects:
                    got = self.family.region_offsets(self.image_processor, images[i].size, t.picture.region(o.cell),
                                                     img.n_tokens[i], img.grid[i], img.extra[i], self.min_coverage)
                    objects[o.cell] = [image_pos[k] for k, _ in got]
                    cover[o.cell] = [c for _, c in got]
            elif self.family.spatial_tokens:
                layout = self.layout(t.scene.grid)
                for o in t.scene.objects:
                    off = self.family.cell_offsets(layout, o.cell, img.n_tokens[i], img.grid[i], img.extra[i])
                    objects[o.cell] = [image_pos[k] for k in off]
                    cover[o.cell] = [1.0] * len(off)
            rows.append((ids, image_pos, objects, mentions, commas, cover))
            texts.append(text)
        length = max(len(r[0]) for r in rows)
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else 0
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        objects, mentions, commas, image_tokens, coverage = [], [], [], [], []
        for i, (ids, image_pos, objs, ments, comms, cover) in enumerate(rows):
            p = length - len(ids)
            input_ids[i, p:] = torch.tensor(ids)
            mask[i, p:] = 1
            objects.append({c: [x + p for x in v] for c, v in objs.items()})
            mentions.append([[x + p for x in m] for m in ments])
            commas.append([x + p for x in comms])
            image_tokens.append([x + p for x in image_pos])
            coverage.append(cover)
        inputs = {"input_ids": input_ids, "attention_mask": mask, **img.tensors,
                  **self.family.extra_inputs(input_ids, self.image_token_id)}
        return Batch(inputs, list(trials), length, objects, mentions, commas, image_tokens, texts, coverage)

    def answer_ids(self, batch: Batch, answers: list[str]) -> torch.Tensor:
        """The first token the model would emit for each answer string, continuing each row's text."""
        out = []
        for text, ans in zip(batch.texts, answers):
            sep = "" if (not text or text[-1].isspace()) else " "
            prefix = self.tokenizer(text)["input_ids"]
            full = self.tokenizer(text + sep + ans)["input_ids"]
            k = next((j for j, (a, b) in enumerate(zip(prefix, full)) if a != b), len(prefix))
            if k >= len(full):
                raise ValueError(f"answer {ans!r} adds no token to the prompt")
            out.append(full[k])
        return torch.tensor(out, dtype=torch.long)

    def first_token_pairs(self, batch: Batch, a1: list[str], a1_star: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """First-token ids of two answers per row; a clear error where they coincide (the score is undefined)."""
        x, y = self.answer_ids(batch, a1), self.answer_ids(batch, a1_star)
        same = (x == y).nonzero().flatten().tolist()
        if same:
            i = same[0]
            raise ValueError(
                f"answers {a1[i]!r} and {a1_star[i]!r} begin with the same token for this tokenizer, so first-token "
                "logits cannot tell them apart; choose stimuli whose answers differ in their first word"
            )
        return x, y

    # -- running --------------------------------------------------------------------------------------------
    def to_device(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dev, dt = self.input_device, self.dtype
        return {k: (v.to(dev, dt) if v.is_floating_point() else v.to(dev)) for k, v in inputs.items()}

    @torch.no_grad()
    def logits(self, batch: Batch | dict[str, torch.Tensor]) -> torch.Tensor:
        """Last-token logits [rows, vocab] in float32."""
        inputs = batch.inputs if isinstance(batch, Batch) else batch
        out = self.model(**self.to_device(inputs), logits_to_keep=1, use_cache=False)
        return out.logits[:, -1].float()

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 4) -> list[str]:
        """Greedy continuations of each row, decoded without special tokens."""
        inputs = self.to_device(batch.inputs)
        pad = self.tokenizer.pad_token_id
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        return self.tokenizer.batch_decode(out[:, batch.length:], skip_special_tokens=True)
