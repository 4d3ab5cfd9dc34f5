"""Train a model organism from scratch on vismech's scenes and save it as an ordinary HF checkpoint.

``train_organism`` builds the ``arch`` organism (``config``), feeds it the task mixture (``data``) and trains it:
AdamW (betas 0.9/0.95, weight decay on matrices only), linear warmup then cosine decay to ``min_lr_ratio`` x lr,
gradient clipping, bf16 autocast on CUDA with fp32 master weights, fixed seeds (python, numpy, torch). Every
``eval_every`` steps, and at the emergence snapshots, it measures first-token accuracy on a fixed held-out draw per
task, grid and entropy condition (``data.heldout_sets``; the same computation as ``experiments.behaviour``: the
arg-max of the last-token logits equals the first token of the answer), with Wilson 95% intervals.

Files written in ``out``: ``train_log.jsonl`` (step, loss, lr, grad norm, seconds, accuracies), ``emergence.jsonl``
(the held-out accuracies, plus what the ``snapshot(vlm, step) -> dict`` callback returns, e.g.
``snapshot.AnalysisSnapshot``'s RSA peaks and CMA head counts, at >= ``snapshots`` log-spaced steps, step 0
included), ``train_state.pt`` (weights, optimizer and RNG states, step; every
``save_every`` steps; ``resume=True`` continues from it and truncates the logs to its step), and at the end the
checkpoint in bf16 (config, safetensors, tokenizer, image processor) plus ``README.md`` (``card``). The final
accuracies are measured on the checkpoint as ``load_vlm(out)`` loads it, through the same adapter as any model.

Choices the paper leaves open (it trains nothing): every hyper-parameter here; the data for step s depends only on
(seed, s), so resuming sees the same data. Speed: on CUDA the Qwen2.5-VL vision tower uses
``models.packed_attention.packed_vision_attention`` during training (all windows of one length in one SDPA call
instead of HF's one call per window; same numbers, tested) with its per-image tables built once per image size
(``cached_vision_tables``), and batches are built by worker processes (``data.Feeder``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vismech.analysis.stats import rate
from vismech.errors import UserError
from vismech.models.families import family_for_config
from vismech.models.vlm import VLM

from . import data
from .card import reproduce_of
from .config import END_TOKEN, MAX_BYTES, build_organism, check_arch
from vismech.models.packed_attention import cached_vision_tables, packed_vision_attention
from .resume import STATE, load_state, save_state, truncate_log
from .stages import is_frozen_through, is_vision, load_weights

LOG = "train_log.jsonl"
EMERGENCE = "emergence.jsonl"
DEFAULTS = dict(steps=8000, batch_size=128, lr=1e-3, seed=0)
WEIGHT_FILES = ("config.json", "chat_template.jinja", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json", "README.md",
                "ground_truth.json", "validity.json")


# -- schedule, seeds, evaluation --------------------------------------------------------------------------------
def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``peak`` to ``min_ratio * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def snapshot_steps(total: int, n: int = 16) -> list[int]:
    """Step 0 and at least ``n - 1`` distinct log-spaced steps in [1, total] (fewer only if total is smaller)."""
    k, out = n - 1, set()
    while len(out) < min(n - 1, total) and k <= 4 * total + n:
        out = {int(round(x)) for x in np.geomspace(1, max(total, 1), k)}
        k += 1
    return sorted({0} | out)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class HeldOut:
    """The held-out draw, encoded once through ``vlm.encode`` (groups mixed in batches of ``batch_size``);
    ``accuracy(vlm)`` gives first-token accuracy per group. Pixels are kept in bf16 when ``compact`` (lossless for
    a bf16 model or under bf16 autocast)."""

    def __init__(self, vlm: VLM, n: int, seed: int, batch_size: int, compact: bool = False):
        self.sets = data.heldout_sets(n, seed)
        rows = [(g, t) for g, trials in self.sets.items() for t in trials]
        self.batches = []
        for s in range(0, len(rows), batch_size):
            groups, chunk = zip(*rows[s:s + batch_size])
            b = vlm.encode(list(chunk))
            want = vlm.answer_ids(b, [t.answer for t in chunk])
            inputs = {k: v.bfloat16() if compact and v.is_floating_point() else v for k, v in b.inputs.items()}
            self.batches.append((groups, inputs, want))

    @torch.no_grad()
    def accuracy(self, vlm: VLM) -> dict[str, dict]:
        hits: dict[str, list[int]] = {g: [0, 0] for g in self.sets}
        with _autocast(vlm.device):
            for groups, inputs, want in self.batches:
                right = (vlm.logits(inputs).argmax(-1).cpu() == want).tolist()
                for g, r in zip(groups, right):
                    hits[g][0] += int(r)
                    hits[g][1] += 1
        out = {}
        for g, (k, n) in hits.items():
            out[g] = rate(k, n)
        return out


def _flat(acc: dict[str, dict]) -> dict[str, float]:
    return {g: round(a["value"], 4) for g, a in acc.items()}


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def organism_files_bytes(out: str | Path) -> int:
    """Bytes of the saved organism itself (weights, configs, tokenizer, card), without logs and train state."""
    out = Path(out)
    return sum(f.stat().st_size for f in out.iterdir() if f.name in WEIGHT_FILES)


# -- training -------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out: Path
    vlm: VLM  # the in-memory model (fp32 weights), eval mode
    summary: dict = field(default_factory=dict)


def train_organism(arch: str, out: str | Path, steps: int = DEFAULTS["steps"], seed: int = DEFAULTS["seed"],
                   device: str | None = None, batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
                   *, warmup: int | None = None, min_lr_ratio: float = 0.1, weight_decay: float = 0.05,
                   grad_clip: float = 1.0, eval_every: int = 500, eval_n: int = 128, log_every: int = 25,
                   save_every: int = 500, snapshots: int = 16,
                   snapshot: Callable[[VLM, int], dict] | None = None, workers: int | None = None,
                   resume: bool = False, stop_at: int | None = None, max_minutes: float | None = None,
                   progress: bool = True, sizes: dict | None = None, packed_attention: bool | None = None,
                   mixture: tuple = data.MIXTURE, label_mentions: bool = False,
                   early: tuple[int, tuple] | None = None, vision_from: str | None = None,
                   init_from: str | None = None, freeze_vision: bool = False, freeze_through: int | None = None,
                   command: str | None = None, plant=None) -> TrainResult:
    """Train the ``arch`` organism for ``steps`` steps into ``out`` (see the module docstring).

    ``stop_at`` ends the run after that step as if interrupted (state saved, no checkpoint); ``max_minutes`` ends
    it early but still saves the checkpoint and card. ``label_mentions``: see ``data.teacher_forcing``.
    ``early`` = (steps, mixture): train on that mixture before that step, on ``mixture`` from then on (a curriculum).
    ``workers`` defaults to 0 on CPU and to 4 (fewer on small hosts) on CUDA: on lent H200 hosts the Qwen organism
    trained at 7 steps/s with 3 workers and at 2 steps/s with 15 (one run a GPU, the cause not isolated; see
    ``benchmarks/organism_step.py --loop-workers``); 4 workers draw about 10 Qwen batches (of 128) a second on
    the development CPU (0.41 s a batch a worker), more than the fastest run used. ``sizes`` (``text=``/
    ``vision=`` overrides) changes the architecture; ``command`` goes into the card. ``vision_from`` (an organism
    name or folder) starts the vision tower and projector from that trained organism's, and ``freeze_vision`` keeps
    them fixed: a second stage that trains a fresh language model on a tower trained before, as real VLMs are built
    on a pretrained image encoder. ``init_from`` starts every weight from that organism's (a continuation with a
    fresh optimizer and schedule); ``freeze_through`` (with ``init_from``) keeps the vision tower, the projector,
    the text embeddings and the language model's layers up to it fixed: a repair of the later layers after an edit
    of that layer (``erase``). ``plant`` (a ``plant.PlantSpec``) trains by planting instead of the task mixture:
    declared heads are trained to carry ``causal_model``'s variables, and the checkpoint declares them in
    ``ground_truth.json``."""
    check_arch(arch)
    t_start = time.time()
    out = Path(out)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state_path = out / STATE
    if (state_path.exists() or (out / "config.json").exists()) and not resume:
        raise UserError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    sizes = sizes or {}
    run = {"arch": arch, "seed": seed, "batch_size": batch_size, "lr": lr, "sizes": json.dumps(sizes, sort_keys=True),
           "steps": steps, "label_mentions": label_mentions,
           "mixture": json.dumps({c.name: c.weight for c in mixture}, sort_keys=True)}
    if vision_from is not None and init_from is not None:
        raise UserError("give --vision-from (the vision tower) or --init-from (every weight), not both")
    source = vision_from if vision_from is not None else init_from
    if vision_from is not None:
        run["vision_from"] = str(vision_from)
    if init_from is not None:
        run["init_from"] = str(init_from)
    if freeze_vision:
        if source is None:
            raise UserError("--freeze-vision needs --vision-from or --init-from: freezing a random vision tower "
                            "trains nothing useful")
        run["freeze_vision"] = True
    if freeze_through is not None:
        if init_from is None:
            raise UserError("--freeze-through needs --init-from: it keeps the early layers of a trained organism")
        freeze_vision = True
        run["freeze_vision"], run["freeze_through"] = True, freeze_through
    if plant is not None:
        run["plant"] = plant.to_json()
    if early:
        run["early"] = json.dumps({"steps": early[0], "mixture": {c.name: c.weight for c in early[1]}}, sort_keys=True)
    warmup = min(500, max(1, steps // 20)) if warmup is None else warmup
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    seed_everything(seed)
    model, tok, proc = build_organism(arch, seed, **sizes)
    if source is not None:
        load_weights(model, arch, str(source), everything=init_from is not None)
    source_commands = reproduce_of(str(source)) if source is not None else []
    for n, p in model.named_parameters():
        p.requires_grad_(not (freeze_vision and is_vision(n, arch))
                         and not (freeze_through is not None and is_frozen_through(n, freeze_through)))
    model.to(dev)
    spec = family_for_config(model.config)
    vlm = VLM(model, tok, proc, spec, f"organism:{arch}", "chat")
    probe = None
    if plant is not None:
        from .plant import drop_mlps
        from .position_probe import make_probe

        plant.check(vlm.n_layers, vlm.n_heads)
        drop_mlps(vlm, plant)  # before the optimizer is built: it leaves them out
        probe = make_probe(vlm, plant).to(dev)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trained += [(f"probe.{n}", p) for n, p in probe.named_parameters()] if probe is not None else []
    decay = [p for n, p in trained if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in trained if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=dev.type == "cuda")
    start, before = 0, 0.0
    if resume and state_path.exists():
        start, before = load_state(state_path, model, opt, run, probe)
        for f in (LOG, EMERGENCE):
            truncate_log(out / f, start)
    elif resume:
        print(f"vismech: no {STATE} in {out}; starting from step 0")
    heldout = HeldOut(vlm, eval_n, seed, max(batch_size, 32), compact=dev.type == "cuda")
    snaps = set(snapshot_steps(steps, snapshots))
    packed = dev.type == "cuda" if packed_attention is None else packed_attention
    workers = (0 if dev.type == "cpu" else max(1, min(4, (os.cpu_count() or 4) - 2))) if workers is None else workers
    end = min(steps, stop_at) if stop_at is not None else steps
    t0, done, acc, last_loss = time.time() - before, start, None, None  # log seconds count earlier sessions
    logged_loss = torch.zeros((), device=dev)
    n_logged = 0

    def evaluate(step: int) -> dict:
        model.eval()
        with packed_vision_attention(model, packed):
            result = heldout.accuracy(vlm)
            if step in snaps:
                with _autocast(dev), torch.no_grad():
                    extra = snapshot(vlm, step) if snapshot is not None else {}
                _append(out / EMERGENCE, {"step": step, "accuracy": _flat(result), **extra})
        model.train()
        return result

    from tqdm import tqdm

    bar = tqdm(total=steps, initial=start, desc=f"train {arch}", unit="step", disable=not progress)
    if start == 0 and 0 in snaps:
        acc = evaluate(0)
        _append(out / LOG, {"step": 0, "loss": None, "lr": 0.0, "seconds": 0.0, "accuracy": _flat(acc)})
    feeder = data.Feeder(arch, seed, batch_size, END_TOKEN[arch], start=start, workers=workers,
                         pixel_dtype=torch.bfloat16 if dev.type == "cuda" else None, sizes=sizes, mixture=mixture,
                         label_mentions=label_mentions, early=early, plant=plant)
    metrics: dict = {}
    model.train()
    stopped_early = False
    try:
        with feeder, feeder.on_device(dev) as batches, packed_vision_attention(model, packed), \
                cached_vision_tables(model):
            for step in range(start, end):
                cur_lr = lr_at(step, steps, lr, warmup, min_lr_ratio)
                for g in opt.param_groups:
                    g["lr"] = cur_lr
                batch = next(batches)
                if plant is not None:
                    from .plant import plant_loss

                    loss, metrics = plant_loss(vlm, plant, probe, batch, autocast=lambda: _autocast(dev))
                else:
                    with _autocast(dev):
                        loss = model(**batch, use_cache=False).loss
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in trained], grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                logged_loss += loss.detach()
                n_logged += 1
                done = step + 1
                is_eval = done in snaps or done % eval_every == 0 or done == steps
                if done % log_every == 0 or is_eval or done == end:
                    last_loss = float(logged_loss) / n_logged
                    row = {"step": done, "loss": round(last_loss, 5), "lr": cur_lr, "grad_norm": round(float(gnorm), 4),
                           "seconds": round(time.time() - t0, 2)}
                    if metrics:
                        row["plant"] = {k: round(float(v), 4) for k, v in metrics.items()}  # this step's
                    logged_loss.zero_()
                    n_logged = 0
                    if is_eval:
                        acc = evaluate(done)
                        row["accuracy"] = _flat(acc)
                    _append(out / LOG, row)
                    bar.set_postfix(loss=f"{last_loss:.3f}")
                bar.update(1)
                if done % save_every == 0 or done == end:
                    save_state(state_path, model, opt, done, run, time.time() - t0, probe)
                if max_minutes is not None and time.time() - t_start > 60 * max_minutes and done < end:
                    stopped_early = True
                    save_state(state_path, model, opt, done, run, time.time() - t0, probe)
                    break
    finally:
        bar.close()
    model.eval()
    summary = {"arch": arch, "out": str(out), "steps": done, "planned_steps": steps,
               "train_seconds": time.time() - t0, "seconds": time.time() - t_start,
               "params": sum(p.numel() for p in model.parameters()), "loss": last_loss, "device": str(dev)}
    if done < steps and not stopped_early:
        summary["stopped_at"] = done
        return TrainResult(out, vlm, summary)
    summary.update(_finish(vlm, out, dev, heldout, summary, run, dict(
        warmup=warmup, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, grad_clip=grad_clip,
        eval_n=eval_n, mixture=mixture, early=early, command=command, vision_from=vision_from,
        init_from=init_from, freeze_vision=freeze_vision, freeze_through=freeze_through,
        source_commands=source_commands, stopped_early=stopped_early, max_minutes=max_minutes, plant=plant)))
    return TrainResult(out, vlm, summary)


def _finish(vlm: VLM, out: Path, dev: torch.device, heldout: HeldOut, summary: dict, run: dict, extra: dict) -> dict:
    """Save the bf16 checkpoint, reload it as any model is loaded, measure it and write the model card."""
    from vismech.models.load import load_vlm

    from .card import write_card

    model = copy.deepcopy(vlm.model).to(torch.bfloat16)
    model.save_pretrained(out)
    if extra.get("plant") is not None:
        from vismech.models.ground_truth import find_ground_truth
        from vismech.models.load import checkpoint_path

        from .plant import ground_truth

        prior = find_ground_truth(checkpoint_path(run["init_from"])) if run.get("init_from") else None
        extra["ground_truth"] = ground_truth(extra["plant"], prior, run.get("freeze_through"))
        extra["ground_truth"].save(out)
    vlm.tokenizer.save_pretrained(out)
    vlm.image_processor.save_pretrained(out)
    del model
    loaded = load_vlm(str(out), dtype="bf16", device=str(dev))
    acc = heldout.accuracy(loaded)
    if extra.get("plant") is not None:  # a planted organism: measure it as a positive control
        from .validate import validity

        with _autocast(dev):
            extra["validity"] = validity(loaded, extra["plant"], n=extra["eval_n"])
        (out / "validity.json").write_text(json.dumps(extra["validity"], indent=1) + "\n")
    size = organism_files_bytes(out)
    write_card(out, {**run, **summary, **extra, "final_accuracy": acc, "bytes": size}, loaded.model)
    size = organism_files_bytes(out)
    if size > MAX_BYTES:
        raise UserError(f"the saved organism takes {size / 1e6:.2f} MB, over the {MAX_BYTES / 1e6:.0f} MB budget; "
                        "choose smaller sizes")
    return {"final_accuracy": acc, "bytes": size}
