"""Which vision patches each image token of a pixel-shuffling family carries, read off the model itself: the vision
tower's patch features are replaced by codes (image or tile, patch row, patch col) and the projector by a copy of
the codes of the merged patches, so the language model's input at any position names the patches behind it."""

from __future__ import annotations

import torch

from conftest import two_object_trials


def code_patches(vlm, batch, n_sub, vision, projector, merge, width, cls=0):
    """Run ``batch`` (``n_sub`` tiles per row) with ``vision``'s output patches (after ``cls`` leading tokens)
    coded and ``projector`` (whose input holds each token's ``merge`` x ``merge`` patches, ``width`` channels each)
    copying the codes; returns ``got(row, pos)``: the set of (tile of the row, patch row, patch col) at ``pos``."""
    k = merge * merge

    def codes(mod, args, out):
        h = out.last_hidden_state
        n, p = h.shape[0], int((h.shape[1] - cls) ** 0.5)
        c = torch.zeros_like(h)
        c[:, cls:, 0] = torch.arange(n)[:, None].float()
        c[:, cls:, 1] = torch.arange(p).repeat_interleave(p)[None].float()
        c[:, cls:, 2] = torch.arange(p).repeat(p)[None].float()
        out.last_hidden_state = c
        return out

    def project(mod, args, out):
        x = args[0].reshape(*args[0].shape[:2], k, width)[..., :3]
        y = torch.zeros_like(out)
        y[..., : 3 * k] = x.reshape(*x.shape[:2], -1)
        return y

    seen = {}
    hooks = [vision.register_forward_hook(codes), projector.register_forward_hook(project),
             vlm.layers[0].register_forward_pre_hook(
                 lambda mod, a, kw: seen.update(x=a[0] if a else kw["hidden_states"]), with_kwargs=True)]
    try:
        vlm.logits(batch)
    finally:
        for h in hooks:
            h.remove()
    x = seen["x"][..., : 3 * k].reshape(*seen["x"].shape[:2], k, 3).round().long()
    return lambda row, pos: {(i - row * n_sub, r, c) for i, r, c in x[row, pos].tolist()}


def patches_of_box(box, subs, tile, patch):
    """(tile, patch row, patch col) of every patch whose whole area lies in ``box`` (image px); ``subs`` lists
    each tile's (x0, y0, side) in image px, each seen at ``tile`` px in patches of ``patch`` px."""
    out = set()
    for i, (x0, y0, side) in enumerate(subs):
        k = side / tile * patch  # image px per patch of this tile
        for r in range(tile // patch):
            for c in range(tile // patch):
                px, py = x0 + c * k, y0 + r * k
                if box[0] <= px and px + k <= box[2] and box[1] <= py and py + k <= box[3]:
                    out.add((i, r, c))
    return out


def check_object_patches(vlm, subs, tile, patch, **where):
    """On two drawn scenes: every patch of every tile reaches the language model exactly once, the image tokens
    vismech records for each object carry exactly the patches inside the object's box (in every tile, the whole
    image's last), and the whole image's ones are the layout's own tokens, in its order."""
    trials = two_object_trials()
    b = vlm.encode(trials)
    got = code_patches(vlm, b, len(subs), **where)
    p, g = tile // patch, vlm.layout(trials[0].scene.grid).grid_tokens
    last = {(len(subs) - 1, r, c) for r in range(p) for c in range(p)}
    for row, t in enumerate(trials):
        layout = vlm.layout(t.scene.grid)
        run = b.image_tokens[row]
        assert len(run) == g * g * len(subs)
        assert sorted(x for pos in run for x in got(row, pos)) == sorted(
            (i, r, c) for i in range(len(subs)) for r in range(p) for c in range(p))
        for o in t.scene.objects:
            pos = b.objects[row][o.cell]
            assert set().union(*(got(row, q) for q in pos)) == patches_of_box(layout.cell_box(o.cell), subs, tile,
                                                                             patch)
            whole = [run.index(q) - g * g * (len(subs) - 1) for q in pos if got(row, q) <= last]
            assert whole == layout.cell_tokens(o.cell)
