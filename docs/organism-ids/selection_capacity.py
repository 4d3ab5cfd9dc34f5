"""Can the selection heads' keys single out the target at all? The best query against the model's own keys.

    PYTHONPATH=src python docs/organism-ids/selection_capacity.py [MODEL] [TRIALS]

For random-vocabulary scene descriptions with every object but one described, this records each declared
ID-selection head's query and keys (after rotary positions) at its supervised naming positions, and compares the
attention mass on the target object's image tokens under the model's query with the most any query of the same
norm (or 2x, 4x the norm) can put there against the same keys: per row, a query optimised by gradient ascent on the
log target mass. If the best same-norm query reaches ~1 where the model's reaches ~0.55, the keys can separate the
target and what is missing is in the query (the gathering, or its use); if the best query is no better, the keys
(the image tokens' position code at that layer) or the gain are the limit. A query chosen per row may also read
the target's colour and shape in the keys, which the model's query cannot know; the "one query per cell" columns
allow only what a content-independent query can do: one direction per target cell (before rotary positions, each
row's own rotation and norm applied), shared by every trial with the target in that cell. Runs on the CPU.
"""
import sys

import torch

from vismech.engine import hooks
from vismech.models.load import load_vlm
from vismech.organism import plant
from vismech.organism import plant_batch as pb
from vismech.organism import validate
from vismech.scenes.sets import scene_description_set


def rows(vlm, spec, trials, batch_size=16):
    """Per supervised selection position and head: (query [D], keys [T, D], allowed keys [T], target keys [T],
    scale, the query before rotary positions [D], the target's cell index)."""
    layer = spec.selection[0][0]
    heads = [h for l, h in spec.selection if l == layer]
    groups = vlm.n_heads // vlm.n_kv_heads
    out = []
    for s in range(0, len(trials), batch_size):
        b = pb.batch_of(vlm, spec, validate._plan(trials[s:s + batch_size]),
                        validate.END.get(vlm.family.name, "<|im_end|>"))
        got = {}

        def record(lyr, inner, module, query, key, value, attention_mask, *args, **kwargs):
            if lyr == layer:
                got.update(q=query.detach(), k=key.detach(), scale=kwargs.get("scaling") or module.scaling)
            return inner(module, query, key, value, attention_mask, *args, **kwargs)

        proj = vlm.attention(layer).q_proj
        handle = proj.register_forward_hook(lambda m, a, o: got.__setitem__("pre", o.detach()))
        with torch.no_grad(), hooks.attention_function(vlm, record):
            vlm.model(**plant._inputs(b, "a_"), use_cache=False)
        handle.remove()
        pre = got["pre"].reshape(*got["pre"].shape[:2], vlm.n_heads, -1)
        chunk = trials[s:s + batch_size]
        where, keys = b["att_selection_where"], b["att_selection_keys"].bool()
        valid = b["a_attention_mask"].bool()
        for i, (r, c) in enumerate(where.tolist()):
            qpos = int(b["att_qpos"][r, c])
            allowed = valid[r].clone()
            allowed[qpos + 1:] = False
            for h in heads:
                cell = tuple(chunk[r].target.cell)
                out.append((got["q"][r, h, qpos], got["k"][r, h // groups], allowed, keys[i, :allowed.shape[0]],
                            got["scale"], pre[r, qpos, h], cell[0] * 3 + cell[1] + 9 * heads.index(h)))
    return out


def rotation(pre, post):
    """The rotary angles (cos, sin per dimension pair, HF's half-split layout) that took ``pre`` to ``post``."""
    h = pre.shape[-1] // 2
    a, b, c, d = pre[..., :h], pre[..., h:], post[..., :h], post[..., h:]
    n = a * a + b * b
    cos, sin = (a * c + b * d) / n, (a * d - b * c) / n
    return cos, sin


def rotate(x, cos, sin):
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)


def best_shared_mass(data, gain, steps=400):
    """Mean target mass when each (head, target cell) has one query direction before rotary positions, shared by
    its rows (each row's own rotation and ``gain`` x its own query norm)."""
    q = torch.stack([d[0] for d in data]).float()
    k = torch.stack([d[1] for d in data]).float()
    allowed = torch.stack([d[2] for d in data])
    target = torch.stack([d[3] for d in data]).float()
    pre = torch.stack([d[5] for d in data]).float()
    group = torch.tensor([d[6] for d in data])
    cos, sin = rotation(pre, q)
    assert torch.allclose(rotate(pre, cos, sin), q, atol=1e-3), "not a half-split rotary rotation"
    scale = data[0][4]
    norm = q.norm(dim=-1, keepdim=True) * gain
    u = torch.zeros(int(group.max()) + 1, q.shape[-1])
    u.index_add_(0, group, pre / pre.norm(dim=-1, keepdim=True))  # start: the mean of the model's directions
    u.requires_grad_(True)
    opt = torch.optim.Adam([u], lr=0.05)

    def mass():
        d = u[group] / u[group].norm(dim=-1, keepdim=True)
        return target_mass(norm * rotate(d, cos, sin), k, allowed, target, scale)

    for _ in range(steps):
        loss = -torch.log(mass() + 1e-9).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return mass()


def target_mass(q, k, allowed, target, scale):
    logits = (k @ q.unsqueeze(-1)).squeeze(-1) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    return (logits.softmax(-1) * target).sum(-1)


def best_mass(data, gain, steps=400):
    """Per row, the largest target mass a query of ``gain`` times the model's query norm reaches (Adam on the
    direction, from the model's own query)."""
    q = torch.stack([d[0] for d in data]).float()
    k = torch.stack([d[1] for d in data]).float()
    allowed = torch.stack([d[2] for d in data])
    target = torch.stack([d[3] for d in data]).float()
    scale = data[0][4]
    norm = q.norm(dim=-1, keepdim=True) * gain
    u = q.clone().requires_grad_(True)
    opt = torch.optim.Adam([u], lr=0.05)
    for _ in range(steps):
        m = target_mass(norm * u / u.norm(dim=-1, keepdim=True), k, allowed, target, scale)
        loss = -torch.log(m + 1e-9).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return target_mass(norm * u / u.norm(dim=-1, keepdim=True), k, allowed, target, scale)


def main(model="organism-ids", n=64):
    torch.manual_seed(0)
    vlm = load_vlm(model, dtype="fp32", device="cpu")
    spec = validate.spec_of(vlm)
    print("| scene | described | model's query | model's query 2x | 4x | best query per row: same norm | 2x | 4x | "
          "one query per cell: same norm | 2x | 4x | query norm |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for grid, objects in (((2, 2), 4), ((3, 3), 4), ((3, 3), 9)):
        trials = scene_description_set(n, grid, n_objects=objects, seed=5)
        for t in trials:
            t.meta.setdefault("kind", "describe")
        data = rows(vlm, spec, trials)
        own = torch.stack([target_mass(*d[:5]) for d in data])
        scaled = [torch.stack([target_mass(g * d[0], *d[1:5]) for d in data]).mean().item() for g in (2, 4)]
        best = [best_mass(data, g).mean().item() for g in (1, 2, 4)]
        best += [best_shared_mass(data, g).mean().item() for g in (1, 2, 4)]
        qn = torch.stack([d[0] for d in data]).norm(dim=-1).mean().item()
        print(f"| {grid[0]}x{grid[1]}, {objects} objects | {objects - 1} | {own.mean():.2f} | "
              + " | ".join(f"{x:.2f}" for x in scaled + best) + f" | {qn:.1f} |")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["organism-ids"]), *(int(a) for a in sys.argv[2:3]))
