"""Resumable units stored in a format that cannot carry code.

A run directory is untrusted input (it is copied, shared, downloaded), so a unit is never a pickle. One unit is one
``.safetensors`` file: its arrays and tensors are the file's tensors, and everything else is a JSON skeleton in the
file's metadata that names them. Loading parses JSON and raw numbers only, so a planted file can at worst fail to
load (``DamagedUnit``), never run code.

What a unit may hold, each restored exactly (type, dtype, shape, values, order): ``None``, ``bool``, ``int``,
``float`` (NaN and infinities too), ``str``, lists, tuples, dicts (any of these as keys, insertion order kept),
numpy arrays and scalars, torch tensors (restored on the CPU), and dataclasses registered with ``unit_type``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np
import torch

FORMAT = "vismech-unit/1"
_TYPES: dict[str, type] = {}


class DamagedUnit(ValueError):
    """A stored unit that cannot be read back (truncated, overwritten, not a vismech unit)."""


def unit_type(cls: type) -> type:
    """Allow the dataclass ``cls`` inside units (a class decorator); only registered classes are rebuilt."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"unit_type takes a dataclass, not {cls!r}")
    _TYPES[cls.__qualname__] = cls
    return cls


def _encode(v: Any, tensors: dict[str, torch.Tensor]) -> Any:
    t = type(v)
    if v is None or t in (bool, int, str):
        return v
    if t is float:
        return v if math.isfinite(v) else {"float": repr(v)}
    if t is list or t is tuple:
        return {t.__name__: [_encode(x, tensors) for x in v]}
    if t is dict:
        return {"dict": [[_encode(k, tensors), _encode(x, tensors)] for k, x in v.items()]}
    if isinstance(v, (np.ndarray, np.generic)):
        arr = np.asarray(v)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"a unit cannot hold a numpy array of dtype {arr.dtype}")
        name = f"t{len(tensors)}"
        tensors[name] = torch.from_numpy(np.array(arr, order="C", copy=True))
        return {"ndarray" if isinstance(v, np.ndarray) else "npscalar": name}
    if isinstance(v, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = v.detach().to("cpu", copy=True).contiguous()
        return {"tensor": name}
    if dataclasses.is_dataclass(v) and _TYPES.get(t.__qualname__) is t:
        return {"dataclass": t.__qualname__,
                "fields": _encode({f.name: getattr(v, f.name) for f in dataclasses.fields(v)}, tensors)}
    raise TypeError(f"a unit cannot hold {t.__name__} (register dataclasses with vismech.store.units.unit_type)")


def _decode(s: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if s is None or type(s) in (bool, int, float, str):
        return s
    if type(s) is not dict or len(s) not in (1, 2):
        raise DamagedUnit("unexpected node in the unit's skeleton")
    kind = next(iter(s))
    if kind == "float":
        return float(s["float"]) if s["float"] in ("nan", "inf", "-inf") else _bad(s)
    if kind in ("list", "tuple"):
        items = [_decode(x, tensors) for x in s[kind]]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {_decode(k, tensors): _decode(x, tensors) for k, x in s["dict"]}
    if kind in ("ndarray", "npscalar", "tensor"):
        t = tensors[s[kind]]
        if kind == "tensor":
            return t
        arr = t.numpy()
        return arr if kind == "ndarray" else arr[()]
    if kind == "dataclass" and s["dataclass"] in _TYPES:
        return _TYPES[s["dataclass"]](**_decode(s["fields"], tensors))
    return _bad(s)


def _bad(s: Any):
    raise DamagedUnit(f"unknown node {str(s)[:60]!r} in the unit's skeleton")


def dumps(value: Any) -> bytes:
    """``value`` as the bytes of a unit file (see the module docstring for what it may hold)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(value, tensors)  # one metadata entry, so the header's bytes do not depend on key order
    return save(tensors, metadata={"vismech": json.dumps({"format": FORMAT, "skeleton": skeleton}, allow_nan=False)})


def loads(data: bytes) -> Any:
    """The value stored by ``dumps``; ``DamagedUnit`` for anything else."""
    from safetensors.torch import load

    try:
        tensors = load(data)
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8:8 + n])["__metadata__"]["vismech"])
        if meta.get("format") != FORMAT:
            raise DamagedUnit(f"not a {FORMAT} file")
        return _decode(meta["skeleton"], tensors)
    except DamagedUnit:
        raise
    except Exception as e:  # safetensors' own errors, bad JSON, missing keys, wrong field names: all mean damaged
        raise DamagedUnit(f"{type(e).__name__}: {e}".splitlines()[0]) from None
