"""How a trial becomes the text a model reads: its chat template, image placeholder expansion and articles.

A ``Framing`` is chosen once per loaded model (``framing_for``):

- **the checkpoint's own chat template** when it ships one (``chat_template.json`` / ``chat_template.jinja`` of
  the processor, else the tokenizer's ``chat_template``). Question tasks are a user turn (image, then the
  question) followed by the generation prompt; the completion task is a user turn with ``COMPLETION_INSTRUCTION``
  and an assistant turn holding the paper's sentence, continued (``continue_final_message=True``). The one image
  placeholder the template writes is then expanded the way the family's processor does it
  (``Family.expand_placeholder``: Qwen's ``<|image_pad|>`` and LLaVA's ``<image>`` repeated n times; Idefics2's
  ``<image>`` becomes ``<fake_token_around_image>`` + n ``<image>`` + ``<fake_token_around_image>`` with a space
  after the closing fake token when a word follows, as ``Idefics2Processor`` does);
- **vismech's own format** for vismech's word-level models (tiny test models, ``random:`` presets and the
  trained organisms): a template that reproduces, byte for byte, the framing these models were built and trained
  with (``Family.vismech_chat``; its first line is the marker ``VISMECH_MARKER``). New organisms save it with
  their tokenizer; an organism saved before that (word-level tokenizer, no template) gets it too;
- **the family's published format written by hand** (``Family.chat``) for a real checkpoint that ships no
  template.

``plain`` prompts are the family's ``plain_format`` (image, then the bare text; question tasks end in
"\\nAnswer:").

Articles (``Framing.articles``): real checkpoints read grammar, so described objects get the right article
("an orange square"; ``scenes.tasks.with_articles``); vismech's own models were trained on the paper's "a"
everywhere and keep it. The final "and a" of the completion prompt is the paper's in both.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

#: The instruction given in chat mode to completion tasks, whose sentence prefix opens the assistant turn.
COMPLETION_INSTRUCTION = "Complete the sentence that describes this image."

#: First characters of every template vismech writes for its own models.
VISMECH_MARKER = "{#vismech chat format"


@dataclass(frozen=True)
class ChatFormat:
    """A chat format as pieces: ``user`` + image + ``between`` + text + ``user_end`` opens a conversation;
    an assistant turn is ``assistant`` + text + ``assistant_end``; the generation prompt is ``generation``."""

    user: str
    image: str
    between: str
    user_end: str
    assistant: str
    generation: str
    assistant_end: str

    def template(self, marker: str = "") -> str:
        """The format as a Jinja chat template (content lists of ``{"type": "image"}`` / ``{"type": "text"}``).
        Every literal piece is a Jinja string expression: chat templates render with ``trim_blocks``, which would
        drop a newline written right after a tag."""
        def lit(piece: str) -> str:
            return "{{ " + json.dumps(piece) + " }}" if piece else ""

        text = "{% for c in m.content %}{% if c.type == 'text' %}{{ c.text }}{% endif %}{% endfor %}"
        return (marker + "{% for m in messages %}{% if m.role == 'user' %}" + lit(self.user)
                + "{% for c in m.content %}{% if c.type == 'image' %}" + lit(self.image) + "{% endif %}{% endfor %}"
                + lit(self.between) + text + lit(self.user_end) + "{% else %}" + lit(self.assistant) + text
                + lit(self.assistant_end) + "{% endif %}{% endfor %}{% if add_generation_prompt %}"
                + lit(self.generation) + "{% endif %}")


@dataclass(frozen=True)
class Framing:
    """The chat template a model is framed with, where it came from, and whose conventions apply.

    ``vismech``: vismech's own model (its placeholder expansion and the paper's "a" articles); otherwise the
    family processor's expansion and grammatical articles."""

    template: str
    source: str
    vismech: bool

    @property
    def articles(self) -> str:
        return "a" if self.vismech else "grammatical"

    def record(self) -> dict:
        return {"template_source": self.source, "conventions": "vismech" if self.vismech else "checkpoint",
                "articles": self.articles}


def vismech_framing(family) -> Framing:
    return Framing(vismech_template(family), f"vismech's own {family.name} format", True)


def vismech_template(family) -> str:
    return family.vismech_chat.template(f"{VISMECH_MARKER} {family.name}#}}")


def _read_template_file(path: Path) -> str | None:
    """A chat template from a ``chat_template.json`` (``{"chat_template": ...}``) or ``.jinja`` file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jinja":
        return text
    value = json.loads(text).get("chat_template")
    if isinstance(value, list):  # several named templates: take the default one
        value = next((t.get("template") for t in value if t.get("name") == "default"), None)
    return value if isinstance(value, str) else None


def _checkpoint_file(path: str | None, name: str) -> Path | None:
    if path is None:
        return None
    if os.path.isdir(path):
        p = Path(path) / name
        return p if p.is_file() else None
    try:  # a hub id: only what is already in the local cache (or downloadable when online)
        from transformers.utils import cached_file

        got = cached_file(path, name, _raise_exceptions_for_missing_entries=False,
                          _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
    return Path(got) if got else None


def framing_for(path: str | None, tokenizer, family) -> Framing:
    """The framing of a checkpoint: its processor's chat template, else its tokenizer's, else vismech's format
    for a vismech word-level tokenizer, else the family's published format written by hand."""
    for name in ("chat_template.json", "chat_template.jinja"):
        f = _checkpoint_file(path, name)
        template = _read_template_file(f) if f is not None else None
        if template:
            return _framing(template, f"checkpoint {name}", family)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if isinstance(template, str) and template:
        return _framing(template, "the tokenizer's chat_template", family)
    if is_word_level(tokenizer):
        return vismech_framing(family)
    return Framing(family.chat.template(), f"vismech's hand-written {family.name} format (the checkpoint ships "
                   "no chat template)", False)


def _framing(template: str, where: str, family) -> Framing:
    if template.startswith(VISMECH_MARKER):
        return Framing(template, f"vismech's own {family.name} format ({where})", True)
    return Framing(template, where, False)


def is_word_level(tokenizer) -> bool:
    """True for vismech's word-level tokenizer (what every vismech-built model uses)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and type(backend.model).__name__ == "WordLevel"


def tokenize(tokenizer, text: str, **kwargs):
    """``tokenizer(text)``, with no second BOS where the text (a chat template's) begins with the BOS already: the
    rule transformers' processors apply to a templated prompt (Gemma 3's template writes ``<bos>`` itself)."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)), **kwargs)


def render(tokenizer, framing: Framing, prompt: str, question: bool) -> tuple[str, int]:
    """The chat text of one trial (one image placeholder, not expanded) and the offset of ``prompt`` in it."""
    image = {"type": "image"}
    if question:
        messages = [{"role": "user", "content": [image, {"type": "text", "text": prompt}]}]
    else:
        messages = [{"role": "user", "content": [image, {"type": "text", "text": COMPLETION_INSTRUCTION}]},
                    {"role": "assistant", "content": [{"type": "text", "text": prompt}]}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=framing.template, tokenize=False,
                                             add_generation_prompt=question, continue_final_message=not question)
    except Exception as e:  # a template error from inside jinja: say which template failed and what to do
        raise ValueError(f"the chat template ({framing.source}) could not frame a trial ({type(e).__name__}: "
                         f"{e}); run with --prompt-format plain, or give the checkpoint a chat template that takes "
                         "content lists of images and text") from None
    if question:
        if text.count(prompt) != 1:
            raise ValueError(f"the chat template ({framing.source}) changed the question text, so vismech cannot "
                             "find the prompt's tokens; run with --prompt-format plain")
        return text, text.index(prompt)
    if not text.endswith(prompt):
        raise ValueError(f"the chat template ({framing.source}) does not end with the continued sentence; run "
                         "with --prompt-format plain")
    return text, len(text) - len(prompt)
