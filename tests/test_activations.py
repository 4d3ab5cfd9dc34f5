"""The activation capture keeps exactly what a plain hook sees, the same on disk as in memory, and is reused."""

import numpy as np
import pytest

from conftest import tiny
from vismech.engine import activations, hooks
from vismech.engine.activations import CaptureSpec
from vismech.analysis.pca import StreamingMoments
from vismech.engine.evaluate import batches
from vismech.experiments.common import Context
from vismech.scenes.sets import entropy_set


def _trials(n=7, grid=(2, 2)):
    return entropy_set(grid, "high", k=1, seed=3)[:n]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_capture_equals_direct_hooks_of_the_same_positions(family):
    vlm = tiny(family)
    trials = _trials()
    acts = activations.capture(vlm, trials, CaptureSpec(commas=True, z=True), batch_size=3)
    L, S, n = vlm.n_layers, 3, len(trials)
    assert acts.resid.shape == (L, 1 + S, n, vlm.text_config.hidden_size)
    assert acts.z.shape == (L, vlm.n_heads, 1 + S, n, vlm.head_dim)
    assert acts.forwards == 3 and acts.n_slots == S
    sites = [(s, l) for s in ("resid", "z") for l in range(L)]
    for idx in batches(trials, 3):
        b = vlm.encode([trials[i] for i in idx])
        with hooks.capture(vlm, sites, to_cpu=True) as got:  # whole sequences; positions picked by hand below
            logits = vlm.logits(b).cpu()
        want = vlm.answer_ids(b, [trials[i].answer for i in idx])
        assert np.array_equal(acts.correct[idx], (logits.argmax(-1) == want).numpy())
        assert np.array_equal(acts.answer_ids[idx], want.numpy())
        for j, i in enumerate(idx):
            for layer in range(L):
                r, z = got[("resid", layer)][j, :, 0], got[("z", layer)][j]
                assert np.array_equal(acts.last()[layer, i], r[b.last].numpy())
                assert np.array_equal(acts.last("z")[layer, :, i], z[b.last].numpy())
                for s, pos in enumerate(b.commas[j]):
                    assert np.array_equal(acts.commas()[s][layer, i], r[pos].numpy())
                    assert np.array_equal(acts.commas("z")[s][layer, :, i], z[pos].numpy())


def test_memmap_and_stream_equal_the_in_memory_capture(tmp_path):
    vlm = tiny("llava")
    trials = _trials()
    mem = activations.capture(vlm, trials, CaptureSpec(z=True), batch_size=4)
    disk = activations.capture(vlm, trials, CaptureSpec(z=True), batch_size=4, memmap_dir=tmp_path,
                               memmap_over_bytes=0, name="t")
    assert isinstance(disk.resid, np.memmap) and isinstance(disk.z, np.memmap)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t_resid.npy", "t_z.npy"]
    assert not isinstance(mem.resid, np.memmap) and mem.files == []
    assert np.array_equal(disk.resid, mem.resid) and np.array_equal(disk.z, mem.z)
    assert np.array_equal(np.load(tmp_path / "t_resid.npy"), mem.resid)  # a plain .npy file
    assert np.array_equal(disk.correct, mem.correct)
    # float16 storage is the float32 capture rounded
    half = activations.capture(vlm, trials, CaptureSpec(dtype="float16"), batch_size=4)
    assert half.resid.dtype == np.float16 and np.array_equal(half.resid, mem.resid.astype(np.float16))
    # streaming blocks put back together, and a per-layer reduction on the fly, give the same numbers
    moments = [StreamingMoments() for _ in range(vlm.n_layers)]
    seen = np.zeros_like(mem.resid)
    for idx, r, z, top, want, _ in activations.stream(vlm, trials, CaptureSpec(z=True), batch_size=4):
        seen[:, :, idx] = r
        for layer, m in enumerate(moments):
            m.update(r[layer, 0])
    assert np.array_equal(seen, mem.resid)
    # the next batch encoded on a worker thread (the default on CUDA) gives the same batches in the same order
    ahead = list(activations.stream(vlm, trials, CaptureSpec(z=True), batch_size=4, prefetch=True))
    plain = list(activations.stream(vlm, trials, CaptureSpec(z=True), batch_size=4, prefetch=False))
    assert len(ahead) == len(plain) == 2
    for a, b in zip(ahead, plain):
        assert a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1:], b[1:]))
    for layer, m in enumerate(moments):
        assert np.allclose(m.covariance(), np.cov(mem.last()[layer].astype(np.float64), rowvar=False), atol=1e-8)


def test_grids_are_batched_apart_and_order_is_kept():
    vlm = tiny("llava")
    a, b = _trials(3, (2, 2)), _trials(4, (3, 3))
    mixed = [b[0], a[0], b[1], a[1], a[2], b[2], b[3]]
    spec = CaptureSpec(commas=False)
    got = activations.capture(vlm, mixed, spec, batch_size=16)
    assert got.forwards == 2  # one batch per grid
    sep_a = activations.capture(vlm, a, spec, batch_size=16).last()
    sep_b = activations.capture(vlm, b, spec, batch_size=16).last()
    order = [("b", 0), ("a", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3)]
    for i, (which, j) in enumerate(order):
        ref = (sep_a if which == "a" else sep_b)[:, j]
        assert np.array_equal(got.last()[:, i], ref)  # same batches, so bit-identical
    with pytest.raises(ValueError, match="same number of objects"):
        activations.capture(vlm, mixed, CaptureSpec(commas=True))


def test_for_context_reuses_and_widens_the_capture(tmp_path, monkeypatch):
    vlm = tiny("llava")
    calls = []
    real = vlm.logits
    monkeypatch.setattr(vlm, "logits", lambda b: calls.append(len(b)) or real(b))
    ctx = Context(vlm, tmp_path, {}, batch_size=4, show_progress=False)
    trials = _trials()
    first = activations.for_context(ctx, trials, commas=True, z=False)
    assert len(calls) == 2
    assert activations.for_context(ctx, list(trials), commas=False) is first  # a subset: no forward
    assert activations.for_context(ctx, [t for t in trials], commas=True) is first
    assert len(calls) == 2
    wider = activations.for_context(ctx, trials, commas=False, z=True)  # needs z: recapture with the union
    assert len(calls) == 4 and wider.spec == CaptureSpec(commas=True, z=True)
    assert np.array_equal(wider.resid, first.resid)
    activations.for_context(ctx, trials[:6], commas=True)  # a different trial set is a different capture
    assert len(calls) == 6
    assert ctx.shared["activations_stats"] == {"captures": 3, "forwards": 6, "reused": 2}
