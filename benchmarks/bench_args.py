"""The arguments the small benchmarks share: which model, on which device, in which dtype, loaded once."""

from __future__ import annotations

import argparse

from vismech.models.load import load_vlm


def parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by ``doc``'s first line, with ``--model`` (default the shipped organism), ``--device``
    (cpu) and ``--dtype`` (fp32)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", default="organism")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    return ap


def model(a: argparse.Namespace):
    """The VLM the parsed arguments name."""
    return load_vlm(a.model, dtype=a.dtype, device=a.device)
