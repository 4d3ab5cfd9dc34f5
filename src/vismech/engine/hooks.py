"""Capture, replace and add to activations of the language model, with plain PyTorch hooks in context managers.

Sites (TransformerLens' names), per decoder layer ``l`` of the language backbone; where each sits is the family
spec's site map (``Family.sites``: module, input or output, layout), here the Llama-style default:

- ``z``: per-head attention outputs, the input of ``self_attn.o_proj``, viewed as [batch, pos, heads, head_dim];
- ``q``: queries after any query norm and before rotary embedding (the output of ``q_proj``, or of ``q_norm`` in
  families that have one), [batch, pos, heads, head_dim];
- ``k``: keys, likewise (``k_proj`` or ``k_norm``), [batch, pos, kv_heads, head_dim] (GQA: fewer heads than
  ``q``; see ``kv_head_of``);
- ``v``: values, the output of ``v_proj``, [batch, pos, kv_heads, head_dim];
- ``resid``: the residual stream after the layer, [batch, pos, 1, hidden] (one "head" spanning the width);
- ``mlp``: the output of the layer's MLP, what it adds to the residual stream, [batch, pos, 1, hidden].

``attention_weights`` records attention probabilities of chosen heads at chosen query positions (after rotary
embedding and masking, as the model computes them), keeping the autograd graph: training can supervise them.

This is the only module in vismech that registers hooks. Every hook it registers is removed when its context
exits, also on an exception. Edits never write into the model's own tensors: the hooked tensor is cloned first,
so the same hooks work under autograd.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

SITES = ("z", "q", "k", "v", "resid", "mlp")


def site_module(vlm, site: str, layer: int):
    """(module, ``Site``) of ``site`` at ``layer``, from the family's site map."""
    if not 0 <= layer < vlm.n_layers:
        raise ValueError(f"layer {layer} is out of range: {vlm.name} has layers 0..{vlm.n_layers - 1}")
    if site not in SITES:
        raise ValueError(f"unknown hook site {site!r}; choose one of {', '.join(SITES)}")
    where = vlm.family.sites[site]
    return vlm.layers[layer].get_submodule(where.module), where


def n_heads_at(vlm, site: str) -> int:
    return {"z": vlm.n_heads, "q": vlm.n_heads, "k": vlm.n_kv_heads, "v": vlm.n_kv_heads, "resid": 1,
            "mlp": 1}[site]


def kv_head_of(vlm, head: int) -> int:
    """The key/value head that query head ``head`` reads under grouped-query attention."""
    return head // (vlm.n_heads // vlm.n_kv_heads)


def _to_heads(x: torch.Tensor, heads: int, layout: str) -> torch.Tensor:
    """The [batch, pos, heads, dim] view of a hooked tensor of ``layout`` (``Site.layout``)."""
    if layout == "bthd":
        return x
    if layout == "bhtd":
        return x.transpose(1, 2)
    return x.view(*x.shape[:-1], heads, x.shape[-1] // heads)


def _from_heads(y: torch.Tensor, x: torch.Tensor, layout: str) -> torch.Tensor:
    """A replacement ``y`` [batch, pos, heads, dim] in the layout of the hooked tensor ``x``."""
    return y.transpose(1, 2) if layout == "bhtd" else y.reshape(x.shape)


@contextlib.contextmanager
def hooked(vlm, site: str, layer: int, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call ``fn`` on the [batch, pos, heads, dim] view of ``site`` at ``layer`` during every forward.

    ``fn`` may return a replacement tensor of the same shape (used downstream) or None (read only).
    """
    (mod, where), heads = site_module(vlm, site, layer), n_heads_at(vlm, site)

    def apply(x: torch.Tensor) -> torch.Tensor | None:
        y = fn(_to_heads(x, heads, where.layout))
        return None if y is None else _from_heads(y, x, where.layout)

    if where.kind == "input":
        def pre(module, args, kwargs):
            y = apply(args[0])
            return None if y is None else ((y,) + tuple(args[1:]), kwargs)

        handle = mod.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        def post(module, args, out):
            x = out[0] if isinstance(out, tuple) else out
            y = apply(x)
            if y is None:
                return None
            return (y,) + tuple(out[1:]) if isinstance(out, tuple) else y

        handle = mod.register_forward_hook(post)
    try:
        yield
    finally:
        handle.remove()


def on_device(t: torch.Tensor, cast: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """``get(x)``: ``t`` on ``x``'s device (and in its dtype with ``cast``), moved once per device and dtype. A hook
    that moved a host tensor at every call would make the host wait for the device at every layer of every forward
    (a copy from pageable memory is synchronous): generation and captures would run unpipelined."""
    moved: dict = {}

    def get(x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype if cast else None)
        if key not in moved:
            moved[key] = t.to(x.device, x.dtype) if cast else t.to(x.device)
        return moved[key]

    return get


@contextlib.contextmanager
def capture(vlm, sites: list[tuple[str, int]], positions: torch.Tensor | None = None,
            heads: torch.Tensor | None = None, to_cpu: bool = False, dtype: torch.dtype | None = None
            ) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
    """Record ``(site, layer)`` activations of the forwards run inside the context.

    ``positions`` ([batch, P] long) keeps only those positions per row, giving [batch, P, heads, dim]; ``heads``
    keeps only those heads. The dict is filled as forwards run (the last forward wins).
    """
    store: dict[tuple[str, int], torch.Tensor] = {}
    pos = None if positions is None else on_device(positions, cast=False)
    hds = None if heads is None else on_device(heads, cast=False)
    with contextlib.ExitStack() as stack:
        for site, layer in sites:
            def fn(x, key=(site, layer)):
                if pos is not None:
                    x = x[torch.arange(x.shape[0], device=x.device)[:, None], pos(x)]
                if hds is not None:
                    x = x[..., hds(x), :]
                x = x.detach()
                if dtype is not None:
                    x = x.to(dtype)
                store[key] = x.cpu() if to_cpu else x.clone()

            stack.enter_context(hooked(vlm, site, layer, fn))
        yield store


@dataclass
class Edit:
    """Set or add ``values`` at ``(rows[i], positions[i], heads[i])`` of ``site`` at ``layer``.

    ``rows``, ``positions`` and ``heads`` are 1-D long tensors of one length N (or broadcastable to it) and
    ``values`` is [N, dim] (or broadcastable). ``mode`` is ``"set"`` (patch) or ``"add"`` (additive
    intervention).
    """

    site: str
    layer: int
    rows: torch.Tensor
    positions: torch.Tensor
    heads: torch.Tensor
    values: torch.Tensor
    mode: str = "set"
    _on: tuple = field(default=(), init=False, repr=False, compare=False)  # rows, positions, heads, values on a device

    def __post_init__(self) -> None:
        if self.mode not in ("set", "add"):
            raise ValueError(f"edit mode must be 'set' or 'add', not {self.mode!r}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """A copy of ``x`` with the edit made."""
        return self.apply_(x.clone())

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """The edit made in ``x`` itself (returned). Index tensors and values go to ``x``'s device once per edit."""
        if not self._on:  # made at the first write (most edits of a stacked block are merged and never applied)
            self._on = tuple(on_device(torch.as_tensor(t), cast=False) for t in (self.rows, self.positions,
                                                                              self.heads)) + (on_device(self.values),)
        r, p, h, v = (get(x) for get in self._on)
        if self.mode == "set":
            x[r, p, h] = v.expand_as(x[r, p, h])
        else:
            x[r, p, h] += v.expand_as(x[r, p, h])
        return x

    def triples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the edited (row, position, head) triples [N, 3], the values [N, dim]), broadcast to one per triple."""
        idx = torch.broadcast_tensors(*(torch.as_tensor(t) for t in (self.rows, self.positions, self.heads)))
        shape = idx[0].shape
        v = self.values.expand(*shape, self.values.shape[-1]).reshape(-1, self.values.shape[-1])
        return torch.stack([i.reshape(-1) for i in idx], 1), v


def merged(edits: list[Edit]) -> list[Edit]:
    """``edits`` (one site and layer, applied in list order) with consecutive edits of one mode joined into one
    wherever no (row, position, head) is edited twice among them: the same result in one indexed write. Linear in
    the number of edited triples (each triple coded as one integer, a set per joined group)."""
    trip = [e.triples() for e in edits]
    if not trip:
        return []
    every = torch.cat([t for t, _ in trip])
    lo = every.min(0).values if len(every) else torch.zeros(3, dtype=torch.long)
    span = (every.max(0).values - lo + 1) if len(every) else torch.ones(3, dtype=torch.long)
    groups: list[dict] = []
    for e, (t, v) in zip(edits, trip):
        c = t - lo
        keys = ((c[:, 0] * span[1] + c[:, 1]) * span[2] + c[:, 2]).tolist()
        own = set(keys)
        ok = len(own) == len(keys)  # no triple twice inside this edit
        g = groups[-1] if groups else None
        if g and ok and g["ok"] and g["mode"] == e.mode and g["dim"] == v.shape[-1] and g["keys"].isdisjoint(own):
            g["t"].append(t)
            g["v"].append(v.to(g["v"][0].dtype))
            g["keys"] |= own
            continue
        groups.append({"mode": e.mode, "dim": v.shape[-1], "t": [t], "v": [v], "keys": own, "ok": ok})
    out = []
    for g in groups:
        t = torch.cat(g["t"]) if len(g["t"]) > 1 else g["t"][0]
        v = torch.cat(g["v"]) if len(g["v"]) > 1 else g["v"][0]
        out.append(Edit(edits[0].site, edits[0].layer, t[:, 0], t[:, 1], t[:, 2], v, g["mode"]))
    return out


@contextlib.contextmanager
def intervene(vlm, edits: list[Edit]) -> Iterator[None]:
    """Apply ``edits`` during every forward run inside the context (edits at one site run in list order; joined
    where that changes nothing, ``merged``, and made in one copy of the site's tensor)."""
    groups: dict[tuple[str, int], list[Edit]] = {}
    for e in edits:
        groups.setdefault((e.site, e.layer), []).append(e)
    with contextlib.ExitStack() as stack:
        for (site, layer), es in groups.items():
            def fn(x, es=merged(es)):
                x = x.clone()
                for e in es:
                    e.apply_(x)
                return x

            stack.enter_context(hooked(vlm, site, layer, fn))
        yield


def language_model(vlm) -> torch.nn.Module:
    """The module that owns the decoder layers (the text backbone)."""
    for m in vlm.model.modules():
        if any(c is vlm.layers for c in m.children()):
            return m
    raise ValueError("could not find the language model that holds the decoder layers")


#: Language-model arguments that steer a run rather than describe its inputs: whoever replays the inputs sets
#: these itself (the fast engine runs with and without a cache of a prefix).
RUN_CONTROL = ("use_cache", "cache", "past_key_values", "cache_position")


def _detached(v):
    if torch.is_tensor(v):
        return v.detach()
    if isinstance(v, (list, tuple)):
        return type(v)(_detached(x) for x in v)
    if isinstance(v, dict):
        return {k: _detached(x) for k, x in v.items()}
    return v


class StopForward(Exception):
    """Raised by ``capture_lm_inputs(stop=True)`` once the language model's inputs are recorded."""


@contextlib.contextmanager
def capture_lm_inputs(vlm, stop: bool = False, detach: bool = True) -> Iterator[dict[str, object]]:
    """Record every argument the language model is called with (by name; None values and ``RUN_CONTROL`` left
    out): embeddings with image features merged in, attention mask, position ids, and whatever else the family
    passes (tensors detached, or with ``detach=False`` kept in the autograd graph; lists, tuples and dicts of them,
    other values as given). With them the text backbone can be rerun without the vision tower. With ``stop``, the
    forward ends there (``StopForward`` is raised from the language model's call: the caller catches it), so the
    text backbone does not run at all."""
    store: dict[str, object] = {}

    def pre(module, args, kwargs):
        store.clear()
        if args:  # by name, as a keyword call would give them
            kwargs = {**inspect.signature(module.forward).bind_partial(*args).arguments, **kwargs}
        for k, v in kwargs.items():
            if v is not None and k not in RUN_CONTROL:
                store[k] = _detached(v) if detach else v
        if stop:
            raise StopForward

    handle = language_model(vlm).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield store
    finally:
        handle.remove()


@contextlib.contextmanager
def layer_inputs(vlm, fn: Callable) -> Iterator[None]:
    """Call ``fn(layer, hidden, kwargs)`` before every decoder layer of the language model runs; ``fn`` may return
    a replacement ``(hidden, kwargs)`` (the batch may grow: rows can join mid-network) or None."""
    handles = []
    for i, module in enumerate(vlm.layers):
        def pre(module, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            got = fn(i, hidden, kwargs)
            if got is None:
                return None
            hidden, kwargs = got
            if args:
                return (hidden,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def attention_routable(vlm) -> bool:
    """Whether the language model looks its attention function up by name (every implementation but ``eager``),
    so that ``attention_function`` can route it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = vlm.text_config._attn_implementation
    return impl not in (None, "eager") and impl in ALL_ATTENTION_FUNCTIONS


@contextlib.contextmanager
def attention_function(vlm, fn: Callable) -> Iterator[None]:
    """Route the attention computation of the language model's layers through
    ``fn(layer, inner, module, query, key, value, attention_mask, *args, **kwargs)``; ``inner`` is the model's own
    attention function (other models in the process keep theirs)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if not attention_routable(vlm):
        raise ValueError(f"{vlm.name} runs {vlm.text_config._attn_implementation!r} attention, which cannot be "
                         "routed; load it with attn_implementation='sdpa'")
    impl = vlm.text_config._attn_implementation
    modules = {vlm.attention(layer): layer for layer in range(vlm.n_layers)}
    inner = ALL_ATTENTION_FUNCTIONS[impl]

    def wrapper(module, *args, **kwargs):
        layer = modules.get(module)
        if layer is None:
            return inner(module, *args, **kwargs)
        return fn(layer, inner, module, *args, **kwargs)

    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    before = local.get(impl)
    local[impl] = wrapper
    try:
        yield
    finally:
        if before is None:
            local.pop(impl, None)
        else:
            local[impl] = before


@contextlib.contextmanager
def attention_weights(vlm, heads: dict[int, list[int]], positions: torch.Tensor) -> Iterator[dict[int, torch.Tensor]]:
    """Record, for every layer ``l`` in ``heads``, the attention probabilities of heads ``heads[l]`` at query
    positions ``positions`` ([batch, P] long): ``store[l]`` is [batch, len(heads[l]), P, keys], float32, with the
    autograd graph kept. The model must run its language model with ``sdpa`` attention (the default); the
    probabilities are recomputed from the queries and keys it passes to that function (GQA handled), and its
    outputs are unchanged."""
    impl = vlm.text_config._attn_implementation
    if impl != "sdpa":
        raise ValueError(f"attention weights are recorded from sdpa attention; {vlm.name} runs {impl!r}: load it "
                         "with attn_implementation='sdpa'")
    groups = vlm.n_heads // vlm.n_kv_heads
    store: dict[int, torch.Tensor] = {}

    def record(layer, inner, module, query, key, value, attention_mask, *args, **kwargs):
        if layer in heads:
            hs = torch.tensor(heads[layer], device=query.device)
            pos = positions.to(query.device)
            rows = torch.arange(query.shape[0], device=query.device)[:, None]
            q = query[:, hs].transpose(1, 2)[rows, pos].transpose(1, 2)  # [B, h, P, D]
            k = key[:, torch.div(hs, groups, rounding_mode="floor")]  # [B, h, T, D]
            scale = kwargs.get("scaling") or module.scaling
            scores = (q.float() @ k.float().transpose(-1, -2)) * scale
            t = key.shape[2]
            if attention_mask is None:
                allowed = torch.arange(t, device=query.device)[None, None, :] <= pos[:, :, None]
                scores = scores.masked_fill(~allowed[:, None], float("-inf"))
            else:
                m = attention_mask[rows, :, pos].transpose(1, 2)[..., :t]  # [B, 1, P, T]
                scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
            store[layer] = scores.softmax(-1)
        return inner(module, query, key, value, attention_mask, *args, **kwargs)

    with attention_function(vlm, record):
        yield store
