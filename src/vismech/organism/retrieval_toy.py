"""Can a fresh language model learn colour retrieval from given image-token features? A diagnostic for organisms.

Trained jointly, the Qwen-style organism learns scene description but answers "what is the color of the {SHAPE}"
at chance (the colour of a random object of the scene; docs/organism-colour-retrieval.md). This separates the
language model from the vision tower: a freshly initialised language model of the organism's architecture is
trained on colour retrieval alone (``grid``: 2x2 by default, 1 object to every cell filled; held out: 2 objects)
with image-token features that are either

- ``"frozen"``: what a trained organism's vision tower (and projector) gives, computed once and not trained; or
- ``"synthetic"``: clean, learned ones, a vector for the object's colour plus one for its shape on each of the
  object's tokens, one background vector elsewhere, plus noise of 0.1 x their RMS.

Options: the positions the language model sees (``"own"``: the organism's own, M-RoPE for Qwen2.5-VL and the
sequence index for LLaVA; ``"1d"``: the sequence index in every M-RoPE component, i.e. plain RoPE), a learned
absolute position vector per image token added to the features (``abs_pos``: what LLaVA's CLIP tower has and
Qwen2.5-VL's lacks), and the fresh model's text settings (``text``: e.g. ``{"rope_theta": 1000}``).

Run: ``python -m vismech.organism.retrieval_toy --model organism --features frozen --device cuda``. The loss is
cross-entropy of the answer's first token at the last position; accuracy is first-token accuracy on the held-out
draw (the organisms' own measure), with the share of answers that name another object's colour.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from vismech.engine import hooks
from vismech.models.vlm import VLM
from vismech.scenes import sets

from . import data
from .config import build_organism, check_arch

FEATURES = ("frozen", "synthetic")
POSITIONS = ("own", "1d")


@dataclass
class Pool:
    """Colour-retrieval trials ready for the toy: token ids [N, L], positions ([3, N, L] for M-RoPE, else [N, L]),
    the image tokens' indices [n_img], their frozen features [N, n_img, d] (or None), the colour and shape index of
    each image token's object [N, n_img] (-1: background), first answer tokens [N] and the first tokens of the
    other objects' colours (for the distractor share)."""

    ids: torch.Tensor
    positions: torch.Tensor
    image: torch.Tensor
    feats: torch.Tensor | None
    color: torch.Tensor
    shape: torch.Tensor
    answer: torch.Tensor
    others: list[list[int]]

    def to(self, device) -> "Pool":
        move = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.__dict__.items()}
        return Pool(**move)

    def __len__(self) -> int:
        return self.ids.shape[0]


def build_pool(vlm: VLM, trials, frozen: bool, chunk: int = 64) -> Pool:
    """Encode ``trials`` (all one grid, so one prompt length) through ``vlm``; ``frozen``: also keep the image-token
    features its language model receives."""
    colors, shapes = list(data.ALL_COLORS), list(data.ALL_SHAPES)
    parts = []
    for s in range(0, len(trials), chunk):
        tr = trials[s:s + chunk]
        b = vlm.encode(tr)
        if not bool(b.inputs["attention_mask"].all()) or len(set(map(tuple, b.image_tokens))) != 1:
            raise ValueError("the toy needs trials of one grid and one prompt length (no padding)")
        image = torch.tensor(b.image_tokens[0])
        pos = data.rope_positions(vlm.model, b.inputs).get("position_ids")
        if pos is None:
            pos = torch.arange(b.length).expand(len(tr), -1)
        feats = None
        if frozen:
            with torch.no_grad(), hooks.capture_lm_inputs(vlm) as lm_in:
                vlm.model(**{k: v.to(vlm.device) for k, v in b.inputs.items()})
            feats = lm_in["inputs_embeds"][:, image].float().cpu()
        color = torch.full((len(tr), len(image)), -1)
        shape = torch.full_like(color, -1)
        where = {int(p): k for k, p in enumerate(image)}
        first = {c: int(vlm.answer_ids(b, [c])[0]) for c in colors}  # a colour's first token (one prompt text)
        others = []
        for j, t in enumerate(tr):
            for o in t.scene.objects:
                cols = [where[p] for p in b.objects[j][o.cell]]
                color[j, cols] = colors.index(o.color)
                shape[j, cols] = shapes.index(o.shape)
            others.append([first[o.color] for o in t.scene.objects if o.color != t.answer])
        parts.append(dict(ids=b.inputs["input_ids"], positions=pos, image=image, feats=feats, color=color,
                          shape=shape, answer=vlm.answer_ids(b, [t.answer for t in tr]), others=others))
    if len({p["ids"].shape[1] for p in parts}) != 1:
        raise ValueError("the toy needs trials of one grid and one prompt length (no padding)")
    cat = lambda k, dim=0: torch.cat([p[k] for p in parts], dim)  # noqa: E731
    return Pool(ids=cat("ids"), positions=cat("positions", parts[0]["positions"].dim() - 2), image=parts[0]["image"],
                feats=cat("feats") if frozen else None, color=cat("color"), shape=cat("shape"), answer=cat("answer"),
                others=[o for p in parts for o in p["others"]])


class ToyLM(nn.Module):
    """A fresh language model and output head of ``arch`` (``text``: config overrides) reading ``Pool`` rows;
    image tokens get the pool's frozen features or the learned synthetic ones, plus learned absolute position
    vectors when ``abs_pos``."""

    def __init__(self, arch: str, n_image: int, features: str, abs_pos: bool, positions: str,
                 text: dict | None = None, seed: int = 0):
        super().__init__()
        if features not in FEATURES or positions not in POSITIONS:
            raise ValueError(f"features must be one of {FEATURES} and positions one of {POSITIONS}")
        model, _, _ = build_organism(arch, seed, text=text)
        self.lm, self.head = model.model.language_model, model.lm_head
        d = self.head.in_features
        g = torch.Generator().manual_seed(seed)
        table = lambda n: nn.Parameter(0.02 * torch.randn(n, d, generator=g))  # noqa: E731
        self.color, self.shape, self.background = table(len(data.ALL_COLORS)), table(len(data.ALL_SHAPES)), table(1)
        self.where = table(n_image) if abs_pos else None
        self.features, self.one_d = features, positions == "1d"

    def forward(self, pool: Pool, rows: torch.Tensor, noise: bool = True) -> torch.Tensor:
        ids = pool.ids[rows]
        x = self.lm.embed_tokens(ids)
        if self.features == "frozen":
            feats = pool.feats[rows].to(x.dtype)
        else:
            c, s = pool.color[rows], pool.shape[rows]
            obj = self.color[c.clamp(min=0)] + self.shape[s.clamp(min=0)]
            feats = torch.where((c >= 0)[..., None], obj, self.background[0].expand_as(obj))
            if noise:
                rms = feats.detach().pow(2).mean(-1, keepdim=True).sqrt()
                feats = feats + 0.1 * rms * torch.randn_like(feats)
        if self.where is not None:
            feats = feats + self.where
        x = x.clone()
        x[:, pool.image] = feats
        pos = pool.positions[..., rows, :]
        if self.one_d:
            seq = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            pos = seq.expand(3, -1, -1) if pos.dim() == 3 else seq
        hidden = self.lm(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state
        return self.head(hidden[:, -1]).float()


class SingleHead(nn.Module):
    """The smallest reader of frozen features: one attention head whose query is a learned vector per shape word
    and whose keys and values are linear maps of the (RMS-normalised) image-token features, then a colour
    classifier. If it names the target's colour, one attention head can pick the object by its shape from these
    features."""

    def __init__(self, d: int, k: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.query, self.key = nn.Embedding(len(data.ALL_SHAPES), k), nn.Linear(d, k)
        self.value, self.out = nn.Linear(d, k), nn.Linear(k, len(data.ALL_COLORS))

    def forward(self, feats: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        f = feats / feats.pow(2).mean(-1, keepdim=True).sqrt()
        k = self.key(f)
        weights = torch.einsum("bk,bnk->bn", self.query(shape), k).div(k.shape[-1] ** 0.5).softmax(-1)
        return self.out(torch.einsum("bn,bnk->bk", weights, self.value(f)))


def _targets(trials) -> tuple[torch.Tensor, torch.Tensor]:
    """(shape index of each trial's target, colour index of its answer)."""
    shapes, colors = list(data.ALL_SHAPES), list(data.ALL_COLORS)
    return (torch.tensor([shapes.index(t.target.shape) for t in trials]),
            torch.tensor([colors.index(t.answer) for t in trials]))


def single_head(train: Pool, train_trials, held: Pool, held_trials, steps: int = 500, batch: int = 128,
                lr: float = 3e-3, eval_every: int = 100, seed: int = 0) -> list[dict]:
    """Train ``SingleHead`` on ``train``'s frozen features (Adam); held-out accuracy every ``eval_every`` steps."""
    (q, a), (qh, ah) = _targets(train_trials), _targets(held_trials)
    head = SingleHead(train.feats.shape[-1], seed=seed)
    opt = torch.optim.Adam(head.parameters(), lr)
    g = torch.Generator().manual_seed(seed + 1)
    evals = []
    for step in range(1, steps + 1):
        rows = torch.randint(len(a), (batch,), generator=g)
        loss = F.cross_entropy(head(train.feats[rows], q[rows]), a[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                acc = (head(held.feats, qh).argmax(-1) == ah).float().mean().item()
            evals.append(dict(step=step, loss=round(loss.item(), 4), accuracy=acc))
    return evals


@torch.no_grad()
def evaluate(model: ToyLM, pool: Pool, batch: int = 128) -> tuple[float, float]:
    """(accuracy, share naming another object's colour) of ``model`` on ``pool``."""
    was = model.training
    model.eval()
    right = other = 0
    for s in range(0, len(pool), batch):
        rows = torch.arange(s, min(len(pool), s + batch), device=pool.ids.device)
        pred = model(pool, rows).argmax(-1).cpu()
        right += int((pred == pool.answer[rows].cpu()).sum())
        other += sum(int(p) in pool.others[int(r)] for p, r in zip(pred, rows.cpu()))
    model.train(was)
    return right / len(pool), other / len(pool)


def run(model: str = "organism", features: str = "synthetic", positions: str = "own", abs_pos: bool = False,
        text: dict | None = None, steps: int = 2000, batch: int = 128, lr: float = 1e-3, seed: int = 0,
        pool_size: int = 4000, heldout: int = 256, eval_every: int = 250, target: float = 0.95,
        device: str | None = None, progress: bool = True, grid: tuple[int, int] = (2, 2)) -> dict:
    """Train a fresh language model on colour retrieval with ``model``'s image features (see the module text);
    stops at ``steps`` or once held-out accuracy reaches ``target``. Returns the settings and the evaluations."""
    from vismech.models.load import load_vlm

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vlm = load_vlm(model, device=str(dev))
    arch = check_arch(vlm.model.config.model_type)
    frozen = features == "frozen"
    train, held = _trials(pool_size, heldout, seed, grid)
    start = time.time()
    tr, ho = build_pool(vlm, train, frozen).to(dev), build_pool(vlm, held, frozen).to(dev)
    built = time.time() - start
    del vlm
    toy = ToyLM(arch, len(tr.image), features, abs_pos, positions, text, seed).to(dev)
    decay = [p for p in toy.parameters() if p.ndim >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": [p for p in toy.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    warm = max(1, min(50, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    g = torch.Generator().manual_seed(seed + 1)
    out = dict(model=model, arch=arch, grid=list(grid), features=features, positions=positions, abs_pos=abs_pos,
               text=text or {}, batch=batch, lr=lr, seed=seed, pool=len(tr), build_seconds=round(built, 1), evals=[])
    start, step = time.time(), 0
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    for step in range(1, steps + 1):
        rows = torch.randint(len(tr), (batch,), generator=g).to(dev)
        with amp:
            loss = F.cross_entropy(toy(tr, rows), tr.answer[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(toy.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            with amp:
                acc, other = evaluate(toy, ho)
            out["evals"].append(dict(step=step, loss=round(loss.item(), 4), accuracy=acc, other_colour=other))
            if progress:
                print(f"{features}/{positions}{'+abs' if abs_pos else ''} step {step}: loss {loss.item():.3f}, "
                      f"held-out accuracy {acc:.3f} (another object's colour {other:.3f})", flush=True)
            if acc >= target:
                break
    out.update(steps=step, seconds_per_step=round((time.time() - start) / max(step, 1), 4))
    return out


def _trials(pool_size: int, heldout: int, seed: int, grid: tuple[int, int] = (2, 2)):
    """Training trials (``grid``, 1 to every cell filled, equally many of each count, ``pool_size`` in all) and
    held-out ones (2 objects)."""
    kw = dict(colors=data.ALL_COLORS, shapes=data.ALL_SHAPES)
    counts = range(1, grid[0] * grid[1] + 1)
    train = [t for k in counts for t in sets.color_retrieval_set(pool_size // len(counts), grid,
                                                                  seed=seed * 10 + k, n_objects=k, **kw)]
    return train, sets.color_retrieval_set(heldout, grid, seed=10_000 + seed, n_objects=2, **kw)


def run_single_head(model: str = "organism", steps: int = 1500, batch: int = 128, seed: int = 0,
                    pool_size: int = 2000, heldout: int = 256, eval_every: int = 250,
                    device: str | None = None) -> dict:
    """``single_head`` on ``model``'s frozen features (computed on ``device``, the head trained on the CPU)."""
    from vismech.models.load import load_vlm

    vlm = load_vlm(model, device=device)
    train, held = _trials(pool_size, heldout, seed)
    tr, ho = build_pool(vlm, train, True), build_pool(vlm, held, True)
    evals = single_head(tr, train, ho, held, steps, batch, eval_every=eval_every, seed=seed)
    return dict(model=model, reader="single_head", seed=seed, pool=len(tr), evals=evals)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m vismech.organism.retrieval_toy", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="organism", help="organism name, folder or hub id (its features, "
                    "tokenizer, positions and architecture)")
    ap.add_argument("--features", choices=FEATURES, default="synthetic")
    ap.add_argument("--positions", choices=POSITIONS, default="own")
    ap.add_argument("--abs-pos", action="store_true")
    ap.add_argument("--text", default=None, help="JSON overrides of the fresh model's text config, e.g. "
                    "'{\"rope_theta\": 1000}'")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=4000, help="training trials (cycled)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--device", default=None)
    ap.add_argument("--grid", default="2x2", choices=["2x2", "3x3"], help="the scenes' grid (default 2x2)")
    ap.add_argument("--out", default=None, help="append the result as one JSON line to this file")
    ap.add_argument("--single-head", action="store_true", help="instead: train one attention head (SingleHead) "
                    "on the model's frozen features (Adam, lr 3e-3; --steps, --batch-size, --pool, --eval-every)")
    a = ap.parse_args(argv)
    if a.single_head:
        res = run_single_head(a.model, a.steps, a.batch_size, a.seed, a.pool, eval_every=a.eval_every,
                              device=a.device)
    else:
        res = run(a.model, a.features, a.positions, a.abs_pos, json.loads(a.text) if a.text else None, a.steps,
                  a.batch_size, a.lr, a.seed, a.pool, eval_every=a.eval_every, device=a.device,
                  grid=tuple(int(x) for x in a.grid.split("x")))
    print(json.dumps(res))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
