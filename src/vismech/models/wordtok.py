"""An offline word-level tokenizer for vismech's tiny test models and trained organisms.

No tokenizer can be downloaded here, so tiny models and organisms use a word-level vocabulary built from every
word vismech's prompts can contain (templates, colours, shapes, relations, numbers) plus the special tokens of
every supported family's prompt format. It is a ``PreTrainedTokenizerFast``, so it saves and loads with
``save_pretrained`` / ``from_pretrained`` offline and gives character offsets like any real tokenizer. Built for a
family, it carries that family's vismech chat template (``models.framing.vismech_template``), which
``save_pretrained`` writes next to it, so a saved organism is framed exactly as it was trained.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

#: Special tokens of the prompt formats of every supported family, in one vocabulary.
SPECIAL_TOKENS = (
    "<pad>", "<unk>", "<s>", "</s>",
    "<|im_start|>", "<|im_end|>", "<|endoftext|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
    "<image>", "<video>",
    "<fake_token_around_image>", "<end_of_utterance>",
)

EXTRA_WORDS = (
    "user", "assistant", "system", "you", "are", "a", "helpful", "answer", "complete", "the", "sentence",
    "that", "describes", "this", "image", "above", "below", "left", "right", "and", "there", "is",
)

_WORD = re.compile(r"\w+|[^\w\s]")


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
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<pad>", "<unk>", "<s>", "</s>")],
    )
    tok.padding_side = "left"
    if family is not None:
        from .families import FAMILIES
        from .framing import vismech_template

        tok.chat_template = vismech_template(FAMILIES[family])
    return tok
