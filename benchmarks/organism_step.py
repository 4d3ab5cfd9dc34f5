"""Benchmark: one training step of each organism, split into data wait, forward and backward, with and without the
packed vision attention, and the CUDA ops that take the time (torch.profiler); then the training loop as it runs
(data workers producing while the model trains) for each worker count of ``--loop-workers``, against the baseline
loop that received each batch and moved it to the device itself (``transfer``), and the loop over batches all moved
to the device beforehand (what no data path can beat). The step is timed
with the vision tower's tables cached (``cached_vision_tables``, as the trainer runs) and without, in one process.

    PYTHONPATH=src python benchmarks/organism_step.py --arch qwen2_5_vl --steps 12 --workers 12 --loop-workers 3 15

``--plant`` times a planting step instead (``organism.plant``: the clean and intervened forwards and their loss, the
vision tower frozen as ``train-organism --plant ids --freeze-vision`` runs it); ``--batch-size`` is then the number
of base trials (each brings three sources and four intervened rows).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import torch

from vismech.models.families import family_for_config
from vismech.organism import data, transfer
from vismech.organism.config import END_TOKEN, build_organism
from vismech.models.packed_attention import cached_vision_tables, packed_vision_attention
from vismech.organism.train import _autocast


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _cpu_max() -> str:
    try:
        return Path("/sys/fs/cgroup/cpu.max").read_text().strip()
    except OSError:
        return "n/a"


def _step(a, model, vlm, probe, b, dev):
    """The loss of one training step on device batch ``b``: the task loss, or planting's with ``--plant``."""
    if a.plant:
        from vismech.organism.plant import PlantSpec, plant_loss

        return plant_loss(vlm, PlantSpec(), probe, b, autocast=lambda: _autocast(dev))[0]
    with _autocast(dev):
        return model(**b, use_cache=False).loss


def _feeder(a, workers, seed, one_buffer=True):
    plant = None
    if a.plant:
        from vismech.organism.plant import PlantSpec

        plant = PlantSpec()
    return data.Feeder(a.arch, seed, a.batch_size, END_TOKEN[a.arch], workers=workers,
                       pixel_dtype=torch.bfloat16 if a.device == "cuda" else None, label_mentions=True, plant=plant,
                       one_buffer=one_buffer)


def loop(a, model, vlm, probe, opt, dev, workers: int, ahead: bool = True, moved: bool = False) -> float:
    """Steps per second of the training loop as ``train_organism`` runs it, with ``workers`` data workers; not
    ``ahead``: the baseline, each batch received from the workers tensor by tensor and moved to the device in the
    loop (as the trainer did until 2026-12-02); ``moved``: every batch on the device before the clock starts (the
    loop without its data, each batch still new to the model: the bound that faster data could reach)."""
    with _feeder(a, workers, 1, ahead) as feeder, feeder.on_device(dev, ahead) as batches, \
            packed_vision_attention(model, dev.type == "cuda"), cached_vision_tables(model):
        if moved:
            batches = iter([next(batches) for _ in range(5 + a.loop_steps)])
        for i in range(5 + a.loop_steps):
            if i == 5:
                sync(dev)
                t = time.perf_counter()
            b = next(batches)
            loss = _step(a, model, vlm, probe, b, dev)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(dev)
        return a.loop_steps / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="qwen2_5_vl")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--loop-workers", type=int, nargs="*", default=[], help="time the interleaved training loop "
                    "(batches drawn while the model trains) with each of these worker counts")
    ap.add_argument("--loop-steps", type=int, default=40)
    ap.add_argument("--plant", action="store_true", help="time planting steps (organism.plant) with the vision "
                    "tower frozen")
    a = ap.parse_args()
    import transformers

    dev = torch.device(a.device)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {dev}, "
          f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, {os.cpu_count()} cores, "
          f"{len(os.sched_getaffinity(0))} usable, cgroup cpu.max {_cpu_max()}")
    model, tok, proc = build_organism(a.arch, 0)
    model.to(dev).train()
    spec = family_for_config(model.config)
    print("family", spec.name)
    vlm, probe = None, None
    if a.plant:
        from vismech.models.vlm import VLM
        from vismech.organism.position_probe import make_probe
        from vismech.organism.stages import is_vision

        for n, p in model.named_parameters():
            p.requires_grad_(not is_vision(n, a.arch))
        vlm = VLM(model, tok, proc, spec, f"organism:{a.arch}", "chat")
        probe = make_probe(vlm).to(dev)
    params = [p for p in model.parameters() if p.requires_grad] + (list(probe.parameters()) if probe else [])
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
    with _feeder(a, a.workers, 0) as feeder:
        batches = [next(feeder) for _ in range(a.steps)]  # prefetch: data time measured apart
        t = time.perf_counter()
        for _ in range(a.steps):
            next(feeder)
        data_s = (time.perf_counter() - t) / a.steps
    print(f"data: {data_s * 1000:.0f} ms a batch with {a.workers} workers; shapes "
          + str({k: tuple(v.shape) if torch.is_tensor(v) else type(v).__name__ for k, v in batches[0].items()}))
    with packed_vision_attention(model, True), cached_vision_tables(model):  # every batch once, untimed: kernels,
        for b in batches:  # autotuning and the allocator see each batch's shapes before any configuration is timed
            b = transfer.to_device(b, dev)
            _step(a, model, vlm, probe, b, dev).backward()
            opt.zero_grad(set_to_none=True)
    for packed, tables in ((True, True), (True, False), (False, False), (True, True)):
        times = {"fwd": 0.0, "bwd": 0.0, "opt": 0.0}
        cached = cached_vision_tables(model) if tables else contextlib.nullcontext()
        with packed_vision_attention(model, packed), cached:
            for i, b in enumerate(batches):
                b = transfer.to_device(b, dev)
                sync(dev)
                t0 = time.perf_counter()
                loss = _step(a, model, vlm, probe, b, dev)
                sync(dev)
                t1 = time.perf_counter()
                loss.backward()
                sync(dev)
                t2 = time.perf_counter()
                opt.step()
                opt.zero_grad(set_to_none=True)
                sync(dev)
                t3 = time.perf_counter()
                if i >= 2:
                    times["fwd"] += t1 - t0
                    times["bwd"] += t2 - t1
                    times["opt"] += t3 - t2
        n = len(batches) - 2
        print(f"packed={packed} cached tables={tables}: "
              + ", ".join(f"{k} {v / n * 1000:.0f} ms" for k, v in times.items())
              + f"; {n / sum(times.values()):.2f} steps/s")
    for w in a.loop_workers:
        base, rate = loop(a, model, vlm, probe, opt, dev, w, ahead=False), loop(a, model, vlm, probe, opt, dev, w)
        print(f"training loop with {w} data workers: {rate:.2f} steps/s", flush=True)
        print(f"  baseline (batches received and moved in the loop): {base:.2f} steps/s; ratio {rate / base:.2f}x",
              flush=True)
        print(f"  every batch on the device beforehand: {loop(a, model, vlm, probe, opt, dev, w, moved=True):.2f} "
              "steps/s", flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with packed_vision_attention(model, True), cached_vision_tables(model), profile(activities=acts) as prof:
            for b in batches[:3]:
                b = transfer.to_device(b, dev)
                loss = _step(a, model, vlm, probe, b, dev)
                loss.backward()
                sync(dev)
        key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
