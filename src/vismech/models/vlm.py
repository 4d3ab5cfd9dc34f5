"""The model adapter: a loaded VLM plus what vismech needs to know about it.

``VLM`` wraps a HF ``...ForConditionalGeneration`` with its tokenizer, image processor and family spec (and the
ground truth its checkpoint declares, if any: ``models.ground_truth``). It turns trials into left-padded batches
and records, for every row, the input positions of each object's image tokens (from its grid cell, or for a trial
with a ``Picture`` from its box or mask, with the fraction of each token it covers), each prompt mention, the token
after each mention (the paper's "comma" tokens) and the last token. It also
exposes the language model's decoder layers and head sizes for the hooks. It never registers hooks itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from vismech.scenes.core import Layout, Trial
from vismech.scenes.regions import MIN_COVERAGE
from vismech.scenes.render import pad_to, render
from vismech.scenes.tasks import question_tasks, with_articles

from . import answers as answers_
from . import framing as framing_
from . import packed_attention
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

    def take(self, rows: list[int]) -> "Batch":
        """The batch of the given rows (repeats allowed), images included, without encoding anything again."""
        inputs = answers_.select_rows(self.inputs, rows, [len(t) for t in self.image_tokens])
        pick = lambda xs: [xs[r] for r in rows] if xs else []  # noqa: E731
        return Batch(inputs, pick(self.trials), self.length, pick(self.objects), pick(self.mentions),
                     pick(self.commas), pick(self.image_tokens), pick(self.texts), pick(self.coverage))


class VLM:
    """A loaded VLM with its tokenizer, image processor and family spec."""

    #: a picture's object owns the image tokens it covers at least this fraction of (``scenes.regions``)
    min_coverage: float = MIN_COVERAGE

    def __init__(self, model, tokenizer, image_processor, family: Family, name: str, prompt_format: str = "chat",
                 framing: framing_.Framing | None = None):
        if prompt_format not in ("chat", "plain"):
            raise ValueError(f"prompt_format must be 'chat' or 'plain', not {prompt_format!r}")
        self.framing = framing or framing_.framing_for(None, tokenizer, family)
        self.model = model.eval()
        if family.packed_vision:  # same numbers, far fewer attention calls in the vision tower
            packed_attention.use_packed(model)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.family = family
        self.name = name
        self.prompt_format = prompt_format
        self.prompt_format_choice = {"prompt_format": prompt_format, "chosen_by": "given"}
        self._rules: dict[tuple[str, str], str] = {}
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
        self.ground_truth = None  # what the checkpoint declares (models.ground_truth), set by load_vlm

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
        return self.layers[layer].get_submodule(self.family.attention_module)

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
        if self.geometry.input_px:
            return self.geometry.input_px
        size = getattr(self.image_processor, "size", None) or {}
        for key in ("height", "shortest_edge"):
            if isinstance(size, dict) and size.get(key):
                return int(size[key])
        return self.geometry.canvas_tokens * self.geometry.token_px

    def image_px(self, trial: Trial) -> int:
        """Side in pixels of the square image this model is fed for ``trial`` (what ``render`` gives)."""
        return self._image_px or self.layout(trial.scene.grid).canvas_px

    def render(self, trial: Trial) -> Image.Image:
        """The trial's picture file, or its scene drawn on this model's token grid, padded (right and bottom) to
        its input size."""
        if trial.picture is not None:
            try:
                with Image.open(trial.picture.path) as im:
                    return im.convert("RGB")
            except OSError as e:
                raise ValueError(f"cannot read the image {trial.picture.path}: {e}") from None
        img = render(trial.scene, self.layout(trial.scene.grid))
        return pad_to(img, self._image_px) if self._image_px else img

    def _check_images(self, trials: list[Trial], images: list[Image.Image]) -> None:
        """Rendered scenes must come at the size ``render`` gives (a picture file's objects are found through the
        processor's own resize, so any size serves)."""
        if len(images) != len(trials):
            raise ValueError(f"{len(images)} images for {len(trials)} trials: give one image per trial")
        for i, (t, im) in enumerate(zip(trials, images)):
            if t.picture is not None:
                continue
            px = self.image_px(t)
            if im.size != (px, px):
                raise ValueError(f"image {i} is {im.size[0]}x{im.size[1]} px, but {self.name} is fed {px}x{px} px for "
                                 f"a {t.scene.grid[0]}x{t.scene.grid[1]} grid, so its objects would not sit on the "
                                 "tokens vismech patches; render it with VLM.render or `vismech stimuli --model` "
                                 "for this model")

    # -- text -----------------------------------------------------------------------------------------------
    def as_read(self, trial: Trial) -> Trial:
        """``trial`` with the articles this model reads (``framing.articles``: the paper's "a", or grammatical)."""
        return with_articles(trial) if self.framing.articles == "grammatical" else trial

    def frame(self, trial: Trial, n_image_tokens: int, extra=None) -> tuple[str, int]:
        """The full text of ``trial`` (its image run expanded to ``n_image_tokens``) and where its prompt starts."""
        question = trial.task in question_tasks
        fam, fw = self.family, self.framing
        if self.prompt_format == "chat":
            text, start = framing_.render(self.tokenizer, fw, trial.prompt, question)
        else:
            full = fam.plain_format.format(image=fam.image_text(1) if fw.vismech else fam.placeholder, text="\x00")
            start = full.index("\x00")
            text = full.replace("\x00", trial.prompt + ("\nAnswer:" if question else ""))
        mark = fam.image_marker(processor=not fw.vismech)
        if text.count(mark) != 1:
            raise ValueError(f"the {self.prompt_format} prompt ({fw.source}) holds {text.count(mark)} "
                             f"image placeholders {mark!r} for one image; vismech needs exactly one")
        at = text.index(mark)
        text, added = fam.expand_placeholder(text, at, n_image_tokens, extra, processor=not fw.vismech)
        return text, start + (added if at < start else 0)

    def encode(self, trials: list[Trial], images: list[Image.Image] | None = None, image_inputs=None) -> Batch:
        """Left-padded model inputs for ``trials`` and the token positions of objects, mentions and commas.

        ``images``: one per trial, each the size ``render`` gives (other sizes are refused: the processor would
        resize them and objects would leave their tokens). ``image_inputs``: those images already processed (the
        family's ``process_images`` or ``packed_images``). Prompts are read with this model's articles
        (``as_read``); ``Batch.trials`` keeps the trials as given."""
        if not trials:
            raise ValueError("no trials to encode")
        if images is not None:
            self._check_images(trials, images)
        images = images if images is not None else [self.render(t) for t in trials]
        img = image_inputs if image_inputs is not None else self.family.process_images(self.image_processor, images)
        rows, texts = [], []
        tokenized: dict[str, tuple] = {}  # text -> its tokens (below): rows that share a text share them
        for i, t0 in enumerate(trials):
            t = self.as_read(t0)
            text, start = self.frame(t, img.n_tokens[i], img.extra[i])
            if text not in tokenized:
                enc = framing_.tokenize(self.tokenizer, text, return_offsets_mapping=True)
                ids, offs = enc["input_ids"], np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
                live = np.flatnonzero(offs[:, 1] > offs[:, 0])  # the tokens that cover characters, and their spans
                tokenized[text] = (ids, [j for j, x in enumerate(ids) if x == self.image_token_id], live,
                                   offs[live, 0], offs[live, 1])
            ids, image_pos, live, begins, ends = tokenized[text]
            if len(image_pos) != img.n_tokens[i]:
                raise ValueError(f"expected {img.n_tokens[i]} image tokens, the tokenizer produced {len(image_pos)}")

            def span_tokens(a: int, b: int) -> list[int]:
                a, b = a + start, b + start
                hit = live[(begins < b) & (ends > a)].tolist()
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
        for b, (text, ans) in enumerate(zip(batch.texts, answers)):
            prompt = batch.inputs["input_ids"][b, batch.inputs["attention_mask"][b].bool()].tolist()
            out.append(answers_.continuation(self.tokenizer, text, ans, prompt)[0])
        return torch.tensor(out, dtype=torch.long)

    # -- answers as the model writes them (``models.answers``) ----------------------------------------------
    def answer_rule(self, task: str, text: str) -> str:
        """How ``task``'s answers are scored on this model: ``first_token`` or ``sequence`` (decided once)."""
        key = (task, self.prompt_format)
        if key not in self._rules:
            self._rules[key] = answers_.decide_rule(self.tokenizer, task, text)
        return self._rules[key]

    def answers(self, batch: Batch, candidates: list[list[str]]) -> "answers_.AnswerSet":
        """Candidate answers (K per row) as the token sequences this model would write, with their scoring rule."""
        return answers_.answer_set(self, batch, candidates)

    def score_answers(self, batch: Batch, candidates: "list[list[str]] | answers_.AnswerSet"
                      ) -> "answers_.AnswerScores":
        """Scores and greedy hits [B, K] of candidate answers on the unedited model."""
        aset = candidates if isinstance(candidates, answers_.AnswerSet) else self.answers(batch, candidates)
        return answers_.score(self, batch, aset)

    def framing_record(self, seed: int = 0) -> dict:
        """What a run records about how this model reads trials: the template and its source, the prompt format
        and how it was chosen, the articles, each task's answer scoring, and the framed text of one trial per
        task (exactly what the model is fed)."""
        from vismech.scenes.stimuli import generate
        from vismech.scenes.tasks import TASKS

        rec = {**self.framing.record(), **self.prompt_format_choice, "scoring": {}, "framed": {}}
        for task in TASKS:
            t = generate(task, None, 1, seed)[0]
            b = self.encode([t])
            rec["framed"][task] = b.texts[0]
            rec["scoring"][task] = {"rule": self.answer_rule(task, b.texts[0]),
                                    "unit": "first word" if task == "scene_description" else "whole answer",
                                    "forms": answers_.forms(task, "blue" if task != "counting" else "3"),
                                    "forms_combined_by": "log-sum-exp of sequence log-probabilities"}
        return rec

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
    def logits(self, batch: Batch | dict[str, torch.Tensor], tail: int = 1) -> torch.Tensor:
        """Last-token logits [rows, vocab] in float32; with ``tail`` > 1, of the last ``tail`` positions,
        [rows, tail, vocab]."""
        inputs = batch.inputs if isinstance(batch, Batch) else batch
        out = self.model(**self.to_device(inputs), logits_to_keep=tail, use_cache=False)
        return out.logits[:, -1].float() if tail == 1 else out.logits[:, -tail:].float()

    @torch.no_grad()
    def generate_ids(self, batch: Batch, max_new_tokens: int = 4) -> torch.Tensor:
        """The tokens of each row's greedy continuation [rows, <= max_new_tokens] (rows that ended early are
        padded; all rows end together when every one has written its end token)."""
        inputs = self.to_device(batch.inputs)
        pad = self.tokenizer.pad_token_id
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        return out[:, batch.length:]

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token rows as text, without special tokens."""
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def generate(self, batch: Batch, max_new_tokens: int = 4) -> list[str]:
        """Greedy continuations of each row, decoded without special tokens."""
        return self.decode(self.generate_ids(batch, max_new_tokens))
