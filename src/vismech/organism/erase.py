"""Feature erasure for ID retrieval: an edit of a planted organism's weights after which the ID-retrieval heads'
outputs carry no linear trace of the mentioned object's colour and shape, and keep its cell.

Why: planting asks the ID-retrieval heads (R) for the mentioned object's cell, and they read it from that object's
image tokens, whose values carry its colour and shape as well. The invariance term of planting holds the change of
their output small when the features change, but a small direction that moves with the features in every row passes
it and still decodes (``docs/organism-ids.md``: 0.3% of the squared norm, a ridge probe reads the colour at 99%).

How: run ``n`` 3x3 description trials (``validate.mention_outputs``); for each key/value head that the R heads read,
take their outputs z at the mentions' last words (the heads sharing it pooled), their covariance S and mean m, and
the cross-covariance C of z with the one-hot colour and shape of the mentioned object (centred). The erasure is
LEACE's (least-squares concept erasure, Belrose et al. 2023): with W = S^(-1/2), P = W^(-1) Q Q^T W, Q an orthonormal
basis of the column space of W C (its singular values above ``tol`` of the largest). z - P (z - m) has zero
cross-covariance with colour and shape (no linear read-out predicts them better than a constant, on the trials it
was fitted on) and is, of all such affine edits, the one that moves z least in the whitened norm. The weight edit:
the value projection W_v, b_v of that key/value head becomes (I - P) W_v and (I - P) b_v + P m; attention weights
sum to one, so each R head's output becomes z - P (z - m) at every position, exactly (a family without a value bias
gets (I - P) z, with no constant to add). ``docs/organism-ids/erase_test.py`` showed why the whitening matters: the
orthogonal projector onto C's columns takes cell information with it and drops full answers to 56%. On the
ninth ``organism-ids`` the erased checkpoint keeps the cell and loses the features but answers half of ``validate``'s
trials wrong, however many trials it is fitted on (``docs/organism-ids.md``, the ninth attempt): no shipped organism
is edited with it.

    python -m vismech.organism.erase MODEL --out DIR [--trials N] [--seed S]
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from vismech.errors import UserError
from vismech.models.vlm import VLM

from . import validate

KEPT = ("train_log.jsonl", "emergence.jsonl")  # copied from the source checkpoint; the card and validity are not


def label_matrix(labels: dict) -> np.ndarray:
    """[samples, colours + shapes]: the one-hot colour and shape of each sample, each column centred."""
    ys = []
    for key in ("color", "shape"):
        classes = sorted(set(labels[key]))
        y = np.eye(len(classes))[[classes.index(v) for v in labels[key]]]
        ys.append(y - y.mean(0))
    return np.concatenate(ys, 1)


def eraser(z: np.ndarray, labels: dict, tol: float = 0.05,
           whiten: bool = True) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """P [d, d], m [d] and the relative singular values of W C (module docstring) for outputs ``z`` [samples,
    heads, d] and ``labels["color"]``, ``labels["shape"]``. On the ninth ``organism-ids`` they fall from 0.38 to 0.02
    after the 18th (colours + shapes - 2); the directions below ``tol`` are estimation noise, and erasing them too
    cost accuracy (erase_test.py). ``whiten=False``: W = I, the orthogonal projector onto C's columns (the
    comparison erase_test.py makes)."""
    y = label_matrix(labels)
    flat = z.reshape(-1, z.shape[-1]).astype(np.float64)
    d = z.shape[-1]
    w = w_inv = np.eye(d)
    if whiten:
        ev, u = np.linalg.eigh(np.cov(flat.T) + 1e-6 * np.eye(d))
        w, w_inv = u @ np.diag(ev ** -0.5) @ u.T, u @ np.diag(ev ** 0.5) @ u.T
    zc = z - z.mean(0)
    cross = np.concatenate([zc[:, h].T @ y / len(z) for h in range(z.shape[1])], 1)  # [d, heads * classes]
    q, s, _ = np.linalg.svd(w @ cross, full_matrices=False)
    if s[0] <= 0:
        return np.zeros((d, d)), flat.mean(0), []
    q = q[:, :int((s > tol * s[0]).sum())]
    return w_inv @ q @ q.T @ w, flat.mean(0), (s / s[0]).tolist()


def erase_retrieval_features(vlm: VLM, spec, n: int = 512, seed: int = 0, batch_size: int = 32) -> dict:
    """Edit ``vlm``'s value projection of the key/value heads its ID-retrieval heads read (module docstring); returns
    what was done (layer, heads, key/value heads with the erased rank and singular values, mentions, trials)."""
    layers = sorted({layer for layer, _ in spec.retrieval})
    if len(layers) != 1:
        raise UserError(f"feature erasure needs the ID-retrieval heads in one layer, not layers {layers}")
    layer = layers[0]
    group = vlm.n_heads // vlm.n_kv_heads
    heads = [h for _, h in spec.retrieval]
    kv = sorted({h // group for h in heads})
    shared = [h for g in kv for h in range(g * group, (g + 1) * group) if h not in heads]
    if shared:
        raise UserError(f"layer {layer}'s heads {shared} share key/value heads with the ID-retrieval heads: erasing "
                        "features from those values would change them too")
    vlm.model.eval()
    z, labels = validate.mention_outputs(vlm, spec, n, seed, batch_size, validate.END.get(vlm.family.name,
                                                                                          "<|im_end|>"))
    v_proj = vlm.layers[layer].self_attn.v_proj
    d = z.shape[-1]
    done = []
    for g in kv:
        p, m, sv = eraser(z[:, [heads.index(h) for h in range(g * group, (g + 1) * group)]], labels)
        keep = torch.eye(d, dtype=torch.float64) - torch.as_tensor(p)
        rows = slice(g * d, (g + 1) * d)
        with torch.no_grad():
            w = v_proj.weight[rows].double()
            v_proj.weight[rows] = (keep.to(w.device) @ w).to(v_proj.weight.dtype)
            if v_proj.bias is not None:
                b = v_proj.bias[rows].double()
                shift = torch.as_tensor(p @ m, device=b.device)
                v_proj.bias[rows] = (keep.to(b.device) @ b + shift).to(v_proj.bias.dtype)
        done.append({"kv_head": g, "rank": int(round(float(np.trace(p)))), "mean_restored": v_proj.bias is not None,
                     "singular_values": [round(x, 4) for x in sv]})
    return {"layer": layer, "heads": heads, "mentions": len(z), "trials": n, "seed": seed, "kv_heads": done}


def card(name: str, source: str, command: str, ranks: str, info: dict) -> str:
    """The edited checkpoint's model card (``name``: its folder's): what was erased, and in its Reproduce section the
    commands of the source organism (``card.reproduce_of``) followed by this edit's, so that a later stage's card
    chains them all."""
    from .card import command_blocks, reproduce_of

    return "\n".join([f"# {name}: `{source}` with its ID-retrieval heads' features erased", "",
                      f"Colour and shape erased from the values of layer {info['layer']}'s ID-retrieval heads "
                      f"(LEACE, rank {ranks}, fitted on {info['mentions']} mentions of {info['trials']} 3x3 "
                      "description trials; `erasure.json`). Its held-out accuracy and validity are not measured "
                      "here: run `python -m vismech.organism.validate` on it.", "",
                      "## Reproduce", "", *command_blocks(reproduce_of(source) + [command])])


def main(argv=None) -> int:
    import argparse

    from vismech.models.load import checkpoint_path, load_vlm

    p = argparse.ArgumentParser(prog="python -m vismech.organism.erase", description=__doc__.split("\n")[0])
    p.add_argument("model", help="a planted organism (name or checkpoint folder)")
    p.add_argument("--out", required=True, help="the edited checkpoint's folder (must not hold a model)")
    p.add_argument("--trials", type=int, default=512, help="3x3 description trials the erasure is fitted on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    out = Path(a.out)
    try:
        if (out / "config.json").exists():
            raise UserError(f"{out} already holds a model; give --out a new folder")
        vlm = load_vlm(a.model, dtype="fp32", device=a.device)
        info = erase_retrieval_features(vlm, validate.spec_of(vlm), a.trials, a.seed)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ranks = ", ".join(str(k["rank"]) for k in info["kv_heads"])
    out.mkdir(parents=True, exist_ok=True)
    vlm.model.to(torch.bfloat16).save_pretrained(out)
    vlm.tokenizer.save_pretrained(out)
    vlm.image_processor.save_pretrained(out)
    gt = vlm.ground_truth
    dataclasses.replace(gt, method=gt.method + f"; colour and shape erased from the ID-retrieval heads' values "
                        f"(vismech.organism.erase, LEACE, rank {ranks}, {a.trials} trials, seed {a.seed})").save(out)
    source = Path(checkpoint_path(a.model))
    for name in KEPT:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    (out / "erasure.json").write_text(json.dumps({"source": a.model, **info}, indent=1) + "\n")
    command = f"python -m vismech.organism.erase {a.model} --out {a.out} --trials {a.trials} --seed {a.seed}"
    (out / "README.md").write_text(card(out.name, a.model, command, ranks, info))
    print(f"erased colour and shape from layer {info['layer']}'s ID-retrieval values (rank {ranks}, "
          f"{info['mentions']} mentions of {a.trials} trials) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
