"""An offline word-level tokenizer for vismech's tiny test models and trained organisms.

No tokenizer can be downloaded here, so tiny models and organisms use a word-level vocabulary built from every
word vismech's prompts can contain (templates, colours, shapes, relations, numbers) plus the special tokens of
the supported families' prompt formats (``special_tokens``). It is a ``PreTrainedTokenizerFast``, so it saves and
loads with ``save_pretrained`` / ``from_pretrained`` offline and gives character offsets like any real tokenizer. Built for a
family, it carries that family's vismech chat template (``models.framing.vismech_template``), which
``save_pretrained`` writes next to it, so a saved organism is framed exactly as it was trained.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

#: The special tokens of every vocabulary, first (ids 0-3).
COMMON_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")

EXTRA_WORDS = (
    "user", "assistant", "system", "you", "are", "a", "helpful", "answer", "complete", "the", "sentence",
    "that", "describes", "this", "image", "above", "below", "left", "right", "and", "there", "is",
)

_WORD = re.compile(r"\w+|[^\w\s]")


def special_tokens(family: str | None = None) -> tuple[str, ...]:
    """The special tokens of the word vocabulary, ids 0, 1, ...: the common ones, then the union of the
    ``special_tokens`` of the families with ``shared_vocab`` (the paper's five) in registry order, each token where
    it first appears; for ``family``, then that family's own tokens not among them. So the ids of every shipped
    organism and tiny model stay what they were built with, and a new family's tokens reach only its tokenizer."""
    from .families import FAMILIES

    out = list(COMMON_TOKENS)
    for spec in FAMILIES.values():
        if vars(type(spec)).get("shared_vocab", False):  # set in the family's own class body
            out += [t for t in spec.special_tokens if t not in out]
    if family is not None:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
        out += [t for t in FAMILIES[family].special_tokens if t not in out]
    return tuple(out)


def default_texts() -> list[str]:
    """Every text whose words the tokenizer must know: the scene vocabulary and prompt templates."""
    from vismech.scenes import vocab

    texts = list(vocab.TEMPLATE_TEXTS) + list(vocab.COLORS) + list(vocab.SHAPES) + list(EXTRA_WORDS)
    texts += [str(i) for i in range(0, 21)]
    return texts


def build_word_tokenizer(texts: list[str] | None = None, family: str | None = None) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over the words of ``texts`` (default: vismech's prompts), with the
    vismech chat template of ``family`` when one is given."""
    words: set[str] = set()
    for t in texts if texts is not None else default_texts():
        words.update(w.lower() for w in _WORD.findall(t))
    specials = special_tokens(family)
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=[t for t in specials if t not in COMMON_TOKENS],
    )
    tok.padding_side = "left"
    if family is not None:
        from .families import FAMILIES
        from .framing import vismech_template

        tok.chat_template = vismech_template(FAMILIES[family])
    return tok
