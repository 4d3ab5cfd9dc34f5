"""Golden tests of the hook layer on tiny random models of every family (bit-exact where the math allows)."""

import pytest
import torch

from conftest import two_object_trials
from vismech.engine import hooks


def _batch(vlm):
    return vlm.encode(two_object_trials())


def test_idle_hooks_change_nothing(vlm):
    b = _batch(vlm)
    ref = vlm.logits(b)
    sites = [(s, l) for s in hooks.SITES for l in range(vlm.n_layers)]
    with hooks.capture(vlm, sites) as got:
        out = vlm.logits(b)
    assert torch.equal(out, ref)
    z = got[("z", 0)]
    assert z.shape == (2, b.length, vlm.n_heads, vlm.head_dim)
    assert got[("k", 1)].shape == (2, b.length, vlm.n_kv_heads, vlm.head_dim)
    assert got[("resid", 2)].shape[-2:] == (1, vlm.text_config.hidden_size)


def test_the_mlp_site_is_what_the_mlp_adds_and_replacing_it_changes_the_output(vlm):
    """``mlp`` is the output of the layer's MLP module (read here with a plain hook for comparison), shown as one
    "head" spanning the width; zeroing it at a layer gives the same logits as zeroing that MLP's down projection."""
    b, layer = _batch(vlm), 1
    seen = {}
    mlp = vlm.layers[layer].mlp
    handle = mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    with hooks.capture(vlm, [("mlp", layer)]) as got:
        ref = vlm.logits(b)
    handle.remove()
    assert got[("mlp", layer)].shape == (2, b.length, 1, vlm.text_config.hidden_size)
    assert torch.equal(got[("mlp", layer)][:, :, 0], seen["out"])
    with hooks.hooked(vlm, "mlp", layer, torch.zeros_like):
        zeroed = vlm.logits(b)
    assert not torch.allclose(zeroed, ref)
    down = mlp.down_proj.weight
    saved = down.detach().clone()
    with torch.no_grad():
        down.zero_()
    try:
        assert torch.allclose(vlm.logits(b), zeroed, atol=1e-5)
    finally:
        with torch.no_grad():
            down.copy_(saved)


def test_self_patch_changes_nothing(vlm):
    b = _batch(vlm)
    ref = vlm.logits(b)
    sites = [("z", l) for l in range(vlm.n_layers)]
    with hooks.capture(vlm, sites) as got:
        vlm.logits(b)
    edits = [hooks.Edit("z", l, torch.arange(2)[:, None, None], torch.arange(b.length)[None, :, None],
                        torch.arange(vlm.n_heads)[None, None, :], got[("z", l)]) for l in range(vlm.n_layers)]
    with hooks.intervene(vlm, edits):
        assert torch.equal(vlm.logits(b), ref)
    zero_add = [hooks.Edit("q", 1, torch.arange(2), torch.tensor(b.last), torch.tensor(0),
                           torch.zeros(vlm.head_dim), mode="add")]
    with hooks.intervene(vlm, zero_add):
        assert torch.equal(vlm.logits(b), ref)


def test_corrupted_upstream_patch_reproduces_corrupted_run(vlm):
    """Run B negates v_proj at layer 1; patching all heads of layer 1 from B into the clean run gives B exactly."""
    b, layer = _batch(vlm), 1
    with hooks.hooked(vlm, "v", layer, lambda x: -x):
        with hooks.capture(vlm, [("z", layer)]) as got:
            corrupted = vlm.logits(b)
    clean = vlm.logits(b)
    assert not torch.allclose(clean, corrupted)
    z = got[("z", layer)]
    edit = hooks.Edit("z", layer, torch.arange(2)[:, None, None], torch.arange(b.length)[None, :, None],
                      torch.arange(vlm.n_heads)[None, None, :], z)
    with hooks.intervene(vlm, [edit]):
        patched = vlm.logits(b)
    assert torch.equal(patched, corrupted)


def test_single_head_patch_moves_only_that_head(vlm):
    b, layer, head = _batch(vlm), 1, 2
    with hooks.capture(vlm, [("z", layer), ("z", layer + 1)]) as before:
        ref = vlm.logits(b)
    value = torch.randn(vlm.head_dim)
    edit = hooks.Edit("z", layer, torch.tensor([0]), torch.tensor([b.last]), torch.tensor([head]), value[None])
    with hooks.intervene(vlm, [edit]):
        # capture is registered after the edit, so it sees the edited tensor
        with hooks.capture(vlm, [("z", layer), ("z", layer + 1)]) as after:
            edited = vlm.logits(b)
    d = (after[("z", layer)] - before[("z", layer)]).abs()
    assert torch.equal(after[("z", layer)][0, b.last, head], value)
    d[0, b.last, head] = 0
    assert d.max() == 0
    # the change propagates downstream only in the edited row: the next layer's heads and the logits of row 0
    # move, row 1 is bit-identical to the clean run
    nxt, was = after[("z", layer + 1)], before[("z", layer + 1)]
    assert not torch.equal(nxt[0, b.last], was[0, b.last]) and torch.equal(nxt[1], was[1])
    assert not torch.equal(edited[0], ref[0]) and torch.equal(edited[1], ref[1])


def test_no_hook_survives_its_context_even_after_an_exception(vlm):
    def count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vlm.model.modules())

    n0 = count()
    with pytest.raises(RuntimeError):
        with hooks.capture(vlm, [("z", 0), ("resid", 1)]):
            with hooks.intervene(vlm, [hooks.Edit("q", 0, torch.tensor(0), torch.tensor(0), torch.tensor(0),
                                                  torch.zeros(vlm.head_dim))]):
                assert count() == n0 + 3
                raise RuntimeError("boom")
    assert count() == n0


def test_bad_site_and_layer_are_clear_errors(vlm):
    with pytest.raises(ValueError, match="unknown hook site"):
        with hooks.capture(vlm, [("mlp_out", 0)]):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with hooks.capture(vlm, [("z", 99)]):
            pass


def test_kv_head_of_is_the_key_head_each_query_head_reads(vlm):
    """Scrambling key head j moves the outputs of exactly the query heads that kv_head_of maps to j."""
    b, layer = _batch(vlm), 1
    with hooks.capture(vlm, [("z", layer)]) as before:
        vlm.logits(b)
    gen = torch.Generator().manual_seed(0)
    for j in range(vlm.n_kv_heads):
        def scramble(k, j=j):
            k = k.clone()
            k[:, :, j] = 10 * torch.randn(k[:, :, j].shape, generator=gen, dtype=k.dtype)
            return k

        with hooks.hooked(vlm, "k", layer, scramble), hooks.capture(vlm, [("z", layer)]) as after:
            vlm.logits(b)
        moved = {h for h in range(vlm.n_heads)
                 if not torch.equal(after[("z", layer)][:, :, h], before[("z", layer)][:, :, h])}
        assert moved == {h for h in range(vlm.n_heads) if hooks.kv_head_of(vlm, h) == j}


class _ToyAttention(torch.nn.Module):
    """A query path with a per-head norm, applied on [batch, pos, heads, dim] (Qwen3's place) or on
    [batch, heads, pos, dim] (Gemma 3's); returns the normed queries in [batch, heads, pos, dim]."""

    def __init__(self, heads, dim, transposed_norm):
        super().__init__()
        self.heads, self.transposed_norm = heads, transposed_norm
        self.q_proj = torch.nn.Linear(heads * dim, heads * dim, bias=False)
        self.q_norm = torch.nn.LayerNorm(dim)

    def forward(self, x):
        q = self.q_proj(x).view(*x.shape[:-1], self.heads, -1)
        if self.transposed_norm:
            return self.q_norm(q.transpose(1, 2))
        return self.q_norm(q).transpose(1, 2)


@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_a_site_map_reads_and_writes_a_norm_in_either_layout(layout):
    """A family's site map points ``q`` at the query norm; callers see [batch, pos, heads, dim] whatever the
    hooked tensor's layout, and an edit of one (position, head) changes exactly that entry of the model's own
    normed queries."""
    from types import SimpleNamespace

    from vismech.models.families import DEFAULT_SITES, Site

    torch.manual_seed(0)
    layer = torch.nn.Module()
    layer.self_attn = _ToyAttention(3, 4, transposed_norm=layout == "bhtd")
    sites = {**DEFAULT_SITES, "q": Site("self_attn.q_norm", layout=layout)}
    vlm = SimpleNamespace(layers=[layer], n_layers=1, n_heads=3, n_kv_heads=3, name="toy",
                          family=SimpleNamespace(sites=sites))
    x = torch.randn(2, 5, 12)
    ref = layer.self_attn(x)  # [2, 3, 5, 4]
    with hooks.capture(vlm, [("q", 0)]) as got:
        assert torch.equal(layer.self_attn(x), ref)
    assert torch.equal(got[("q", 0)], ref.transpose(1, 2))
    value = torch.full((4,), 7.0)
    with hooks.intervene(vlm, [hooks.Edit("q", 0, torch.tensor([1]), torch.tensor([3]), torch.tensor([2]), value)]):
        out = layer.self_attn(x)
    want = ref.clone()
    want[1, 2, 3] = value
    assert torch.equal(out, want)


def test_merged_edits_equal_the_edits_one_by_one():
    """Consecutive edits of one mode join into one indexed write where no triple repeats among them; a repeated
    triple, or another mode, starts a new one; either way the result equals applying them in order."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, 6, generator=g)

    def e(rows, pos, heads, mode, shape=None):
        rows, pos, heads = (torch.as_tensor(t) for t in (rows, pos, heads))
        n = torch.broadcast_tensors(rows, pos, heads)[0].shape
        return hooks.Edit("z", 0, rows, pos, heads, torch.randn(*(shape or n), 6, generator=g), mode)

    edits = [e([0, 1], [2, 2], [0, 3], "set"), e([2], [4], [1], "set"),  # joined
             e([0], [2], [0], "set"),  # repeats (0, 2, 0): a new write, it wins
             e(torch.arange(3)[:, None], torch.tensor([[0, 1]]), 2, "add"),  # a grid of triples, other mode
             e([1], [1], [2], "add"),  # repeats (1, 1, 2): a new write, the two adds sum
             e([2], [3], [3], "add", shape=()),  # one value broadcast
             e([0, 0], [4, 4], [1, 1], "set")]  # a triple twice in one edit: kept as it is
    want = x
    for ed in edits:
        want = ed.apply(want)
    m = hooks.merged(edits)
    assert [len(ed.rows) for ed in m] == [3, 1, 6, 2, 2]
    got = x.clone()
    for ed in m:
        ed.apply_(got)
    assert torch.equal(got, want)
    assert not torch.equal(want, x)
    # many disjoint edits (an intervention experiment's stacked settings): one write, the same result
    x = torch.randn(40, 6, 8, 6, generator=g)
    many = [e([r], [p], [h], "add") for r in range(40) for p in (1, 4) for h in (r % 8, (r + 3) % 8)]
    want = x
    for ed in many:
        want = ed.apply(want)
    m = hooks.merged(many)
    assert len(m) == 1 and len(m[0].rows) == len(many)
    assert torch.equal(m[0].apply(x), want)


def test_on_device_moves_a_tensor_once_per_device_and_dtype():
    """A hook's host tensor is moved (and cast) once, then reused: the same tensor object for the same device and
    dtype, a new one for another dtype; ``cast=False`` keeps index tensors' dtype."""
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    get = hooks.on_device(t)
    x32, x64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    a = get(x32)
    assert get(x32) is a and a.dtype == torch.float32 and torch.equal(a, t)
    b = get(x64)
    assert b.dtype == torch.float64 and b is not a and get(x64) is b
    idx = hooks.on_device(torch.tensor([2, 0]), cast=False)
    assert idx(x32).dtype == torch.long and idx(x64) is idx(x32)
