"""Units are stored as safetensors + a JSON skeleton: exact round trips, and nothing in a run directory runs code."""

import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from vismech.store import units
from vismech.engine.edits import HeadRun


def _same(a, b) -> bool:
    """Equal in type, dtype, shape and every bit (NaN equals NaN), recursively."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray) or isinstance(a, np.generic):
        return a.dtype == b.dtype and a.shape == b.shape and np.asarray(a).tobytes() == np.asarray(b).tobytes()
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                         b.reshape(-1).view(torch.uint8))
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, HeadRun):
        return all(_same(getattr(a, f), getattr(b, f)) for f in ("top", "cand_hit", "cand_logits", "z", "texts"))
    return a == b


VALUES = [
    None, True, 0, -7, 2 ** 70, 0.1, -0.0, float("nan"), float("inf"), "", "ç\n\"x\"",
    [1, (2, 3), [4.5, None]], (), [],
    {(0, 1): "cell", ("id_selection", 5, 2.0, "random"): 3, 1: [2], "b": 1, "a": 2},  # tuple keys, order kept
    np.arange(6, dtype=np.int64).reshape(2, 3).T,  # not contiguous
    np.zeros((0, 4), np.float32), np.array([True, False]), np.array(3.25, np.float64), np.float32(1.5),
    np.int64(-3), np.array([1, 2], np.uint16), np.array([0.5], np.float16),
    torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16), torch.arange(4, dtype=torch.int32), torch.zeros(()),
    HeadRun(np.array([3, 1]), np.zeros((2, 1), bool), np.ones((2, 1), np.float32), None, ["a", "b"]),
    ([{"trial": 0, "first_token_correct": 1, "generated": ""}], {"x": np.ones(2)}),
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_round_trip_is_exact(value):
    back = units.loads(units.dumps(value))
    assert _same(value, back), (value, back)


def test_refuses_what_it_cannot_restore():
    class Plain:
        pass

    for bad in (Plain(), {1, 2}, np.array(["a"]), np.array([object()], dtype=object)):
        with pytest.raises(TypeError):
            units.dumps(bad)


def test_damaged_files_are_reported_not_run(tmp_path):
    good = units.dumps({"a": np.arange(10)})
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w').write('x')",))

    for data in (good[:-5], good[:20], b"", b"\x00" * 64, pickle.dumps(Payload()),
                 good.replace(b"vismech-unit/1", b"vismech-unit/9"),
                 good.replace(b'"ndarray"', b'"eval"') if b'"ndarray"' in good else good[:-1]):
        with pytest.raises(units.DamagedUnit):
            units.loads(data)
    assert not marker.exists()


def test_no_pickle_loading_anywhere_in_src():
    """Nothing in vismech loads a pickle: no weights_only=False, no pickle.load(s), no allow_pickle=True."""
    src = Path(units.__file__).parent
    bad = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|allow_pickle\s*=\s*True|torch\.load\((?![^)]*"
                     r"weights_only\s*=\s*True)")
    hits = [f"{p.relative_to(src)}:{i}" for p in src.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert hits == []
