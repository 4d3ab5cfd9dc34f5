"""The model card (README.md) written beside a trained organism's checkpoint.

It says what the organism is (class, sizes, token geometry, parameter count and bytes in bf16), what it was trained
on (the mixture with its weights), how (steps, batch, schedule, seed, device, time), how well it does (held-out
first-token accuracy per task, grid and entropy condition, with Wilson 95% intervals and n), how to load it, and
the exact command that reproduces it. ``info`` is the dict ``train._finish`` assembles.
"""

from __future__ import annotations

from pathlib import Path

from vismech.models.families import family_for_config

from .data import MIXTURE, TARGET_GROUPS

VISION_KEYS = ("depth", "num_hidden_layers", "hidden_size", "intermediate_size", "num_heads", "num_attention_heads",
               "image_size", "patch_size", "spatial_merge_size", "window_size", "fullatt_block_indexes")


def _param_split(model) -> dict[str, int]:
    split: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = parts[1] if parts[0] == "model" and len(parts) > 1 else parts[0]
        split[key] = split.get(key, 0) + p.numel()
    return split


def reproduce_command(info: dict) -> str:
    """The ``vismech train-organism`` command line that retrains this organism."""
    if info.get("command"):
        return info["command"]
    cmd = (f"vismech train-organism --arch {info['arch']} --out {info['out']} --steps {info['planned_steps']} "
           f"--seed {info['seed']} --batch-size {info['batch_size']} --lr {info['lr']}")
    if info.get("label_mentions"):
        cmd += " --label-mentions"
    if info.get("plant") is not None:
        from . import plant_flags
        from .plant import COMPONENTS, PlantSpec

        cmd += " --plant ids"
        default = dict(PlantSpec().weights)
        for term, w in info["plant"].weights:
            if default.get(term) != w:
                cmd += f" --plant-weight {term}={w:g}"
        cmd += "".join(" " + w for w in plant_flags.command_words(info["plant"], PlantSpec()))
        for stage in COMPONENTS:
            heads = getattr(info["plant"], stage)
            if heads != getattr(PlantSpec(), stage):
                cmd += f" --plant-heads {stage}=" + ",".join(f"{layer}:{head}" for layer, head in heads)
    if info.get("stopped_early") and info.get("max_minutes"):
        cmd += f" --max-minutes {info['max_minutes']}"
    used = {c.name: c.weight for c in info.get("mixture", MIXTURE)} if info.get("plant") is None else {}
    for c in MIXTURE if info.get("plant") is None else ():
        if used.get(c.name, 0.0) != c.weight:
            cmd += f" --weight {c.name}={used.get(c.name, 0.0):g}"
    if info.get("early"):
        steps, early = info["early"]
        cmd += f" --early-steps {steps}"
        first = {c.name: c.weight for c in early}
        for name, weight in used.items():
            if first.get(name, 0.0) != weight:
                cmd += f" --early-weight {name}={first.get(name, 0.0):g}"
    for flag in ("vision_from", "init_from"):
        if info.get(flag):
            cmd += f" --{flag.replace('_', '-')} {_source_out(info)}"
    if info.get("freeze_through") is not None:  # it implies --freeze-vision
        cmd += f" --freeze-through {info['freeze_through']}"
    elif info.get("freeze_vision"):
        cmd += " --freeze-vision"
    if info.get("sizes") not in (None, "{}", {}):
        cmd += f" --sizes '{info['sizes']}'"
    return cmd + (" --device cuda" if str(info.get("device", "")).startswith("cuda") else " --device cpu")


def reproduce_of(source: str) -> list[str]:
    """The training commands in the model card of organism ``source`` (name or folder), earlier stages first: the
    code blocks of the Reproduce section ``card_text`` writes."""
    from vismech.models.load import checkpoint_path

    card = Path(checkpoint_path(source)) / "README.md"
    if not card.exists() or "## Reproduce" not in (text := card.read_text()):
        return []
    blocks = text.split("## Reproduce", 1)[1].split("```")
    return [b.strip() for b in blocks[1:-1:2] if b.strip()]


def command_blocks(commands: list[str]) -> list[str]:
    """Card lines that hold each of ``commands`` in a code block of its own, as ``reproduce_of`` reads them."""
    return [x for c in commands for x in ("```", c, "```", "")]


def _source_out(info: dict) -> str:
    """Where the organism this one started from is written by its own command (else its name as given)."""
    words = ((info.get("source_commands") or [""])[-1]).split()
    given = info.get("vision_from") or info.get("init_from")
    return words[words.index("--out") + 1] if "--out" in words[:-1] else str(given)


def _planting(spec, gt=None) -> list[str]:
    """The planting sections; ``gt``: the ground truth the run saved (with the prior stages' method), else the spec's."""
    from .plant import ground_truth

    gt = ground_truth(spec) if gt is None else gt
    heads = lambda hs: ", ".join(f"L{layer}H{head}" for layer, head in hs)  # noqa: E731
    lines = ["## Ground truth (planted)", "",
             "This organism is a positive control: declared heads were trained to carry the paper's three stages "
             "(`vismech.organism.plant`; the high-level causal model is `vismech.organism.causal_model`), and "
             "`ground_truth.json` declares them (`VLM.ground_truth` after `load_vlm`; `vismech run recovery` "
             "checks vismech's analyses against it).", "",
             "| stage | heads | positions | variable |", "|---|---|---|---|"]
    for name, d in list(gt.stages.items()) + [(f"helper: {k}", v) for k, v in gt.helpers.items()]:
        lines.append(f"| {name} | {heads(d.heads)} | {d.positions} | {d.variable} |")
    lines += ["", f"Method: {gt.method}. Position probe after layer {spec.probe_layer}; strict resampling "
              f"probability {spec.strict_p}; loss weights " + ", ".join(f"{k} {w:g}" for k, w in spec.weights) + ".",
              "", "## Training data", "",
              "Planting trials (`causal_model.planting_trial`), colours and shapes from the whole vocabulary: "
              + ", ".join(f"{k} {w:g}" for k, w in spec.kinds) + "; grids "
              + ", ".join(f"{g[0]}x{g[1]} {w:g}" for g, w in spec.grids) + "; entropy "
              + ", ".join(f"{k} {w:g}" for k, w in spec.entropies) + ". Each base trial comes with a swap source, a "
              "feature source and a resample source of the same layout; a step holds the bases and sources (clean "
              "rows) and one R, S, F and strict row per base (intervened rows). It is not trained on spatial "
              "relations or counting.", ""]
    return lines


def _validity(v: dict) -> list[str]:
    """The positive-control measures of ``validate.validity`` as tables."""
    pct = lambda r: "n/a (n=0)" if r["rate"] is None else (  # noqa: E731
        f"{100 * r['rate']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}] (n={r['n']})")
    lines = ["## Validity as a positive control (`python -m vismech.organism.validate`)", "",
             "Fresh held-out draws; intervals are Wilson 95%. Full-answer accuracy: every answer token is the arg-max "
             "given the ones before (the same as greedy generation).", "", "| measure | value |", "|---|---|"]
    for g, r in v["accuracy"].items():
        lines.append(f"| full-answer accuracy, {g} | {pct(r)} |")
    for k, r in v["interchange"].items():
        lines.append(f"| interchange accuracy, {k} (3x3, 3-9 objects) | {pct(r)}; where the answer changes: "
                     f"{pct(r['changed_answers'])} |")
    a = v["ablation"]
    lines += [f"| clean accuracy before ablation | {pct(a['clean'])} |",
              f"| largest change from resampling one undeclared head | {a['largest_drop_undeclared']['change']:+.3f} "
              f"(head {a['largest_drop_undeclared']['head']}) |",
              f"| accuracy with every declared head resampled | {pct(a['declared_resampled'])}; chance "
              f"{a['chance']:.3f} |"]
    for k, r in v["probes"].items():
        lines.append(f"| linear probe on the ID-retrieval heads' outputs: {k} | {pct(r)}; chance {r['chance']:.3f} |")
    return lines + [""]


def _mixture(info: dict) -> list[str]:
    lines = ["## Training data", "",
              "Drawn on the fly by `vismech.scenes.sets` (the generator every analysis uses), rendered on this "
              "model's token grid and framed by its chat format through `VLM.encode`; the answer (the target's "
              "\"colour shape\", a colour, or the count) and the end token are labelled"
              + (", and so are the described objects' words of scene-description prompts." if info.get("label_mentions")
                 else " (no other token)."), "",
              "| component | task | grid | entropy | objects | weight |", "|---|---|---|---|---|---|"]
    for c in info.get("mixture", MIXTURE):
        obj = f"{c.objects[0]}-{c.objects[1]}" if c.objects else "all cells"
        lines.append(f"| {c.name} | {c.task} | {c.grid[0]}x{c.grid[1]} | {c.entropy or '-'} | {obj} | {c.weight} |")
    return lines + [""]


def card_text(info: dict, model=None) -> str:
    arch = info["arch"]
    lines = [f"# vismech model organism: {arch}", "",
             "A tiny vision-language model of a real Hugging Face architecture, trained from scratch by vismech on "
             "its own synthetic scenes (coloured shapes on a grid) to do the four tasks of Assouel et al. "
             "(arXiv 2506.15871): scene description, colour retrieval, spatial relation and counting. It exists to "
             "study how binding mechanisms (position IDs) emerge; it knows nothing but these scenes and prompts.", ""]
    if info.get("plant") is not None:
        lines[2] = ("A tiny vision-language model of a real Hugging Face architecture in which vismech planted the "
                    "position-ID mechanism of Assouel et al. (arXiv 2506.15871) in declared heads, on its own "
                    "synthetic scenes (coloured shapes on a grid): scene description and colour retrieval. It is a "
                    "positive control with known ground truth for vismech's analyses; it knows nothing but these "
                    "scenes and prompts.")
    lines += ["## Architecture", ""]
    if model is not None:
        cfg = model.config
        t, v = cfg.get_text_config(), cfg.vision_config
        lines += [f"- class: `{cfg.architectures[0]}` (model_type `{cfg.model_type}`)",
                  f"- language model: {t.num_hidden_layers} layers, {t.num_attention_heads} heads of head_dim "
                  f"{getattr(t, 'head_dim', t.hidden_size // t.num_attention_heads)}, {t.num_key_value_heads} "
                  f"key/value heads, hidden {t.hidden_size}, MLP {t.intermediate_size}, vocabulary {t.vocab_size} "
                  f"(vismech's word-level tokenizer), rope {t.rope_parameters}",
                  "- vision tower: " + ", ".join(f"{k} {getattr(v, k)}" for k in VISION_KEYS if hasattr(v, k))]
        spec = family_for_config(cfg)
        geo = spec.geometry(cfg, spec.image_processor_for(cfg))
        lines.append(f"- image tokens of {geo.token_px} px; objects of {geo.layout(2, 2).obj_tokens}x"
                     f"{geo.layout(2, 2).obj_tokens} tokens; canvas {geo.layout(2, 2).canvas_px} px (2x2 grid), "
                     f"{geo.layout(3, 3).canvas_px} px (3x3 grid)")
        split = _param_split(model)
        lines.append("- parameters: " + ", ".join(f"{k} {n:,}" for k, n in split.items()))
    lines += [f"- total parameters: {info['params']:,} ({2 * info['params'] / 1e6:.2f} MB in bf16); weights, configs "
              f"and tokenizer on disk: {info.get('bytes', 0) / 1e6:.2f} MB", ""]
    lines += (_planting(info["plant"], info.get("ground_truth")) if info.get("plant") is not None
              else _mixture(info))
    lines += ["## Training", "",
              f"- steps: {info['steps']} of {info['planned_steps']} planned"
              + (" (stopped early by the time limit)" if info.get("stopped_early") else ""),
              *([f"- curriculum: before step {info['early'][0]} the mixture's weights were "
                 + ", ".join(f"{c.name} {c.weight:g}" for c in info["early"][1])] if info.get("early") else []),
              *([(f"- vision tower and projector: started from the trained organism `{info['vision_from']}`"
                  if info.get("vision_from") else
                  f"- every weight: started from the trained organism `{info['init_from']}`")
                 + (f"; vision tower, projector, text embeddings and layers 0-{info['freeze_through']} frozen "
                    "(only the later layers trained)" if info.get("freeze_through") is not None else
                    "; vision tower and projector frozen (only the language model trained)"
                    if info.get("freeze_vision") else "")]
                if info.get("vision_from") or info.get("init_from") else []),
              f"- batch {info['batch_size']}, AdamW (0.9, 0.95), peak lr {info['lr']}, warmup {info['warmup']} "
              f"steps, cosine to {info['min_lr_ratio']} x peak, weight decay {info['weight_decay']} (matrices), "
              f"gradient clip {info['grad_clip']}, seed {info['seed']}",
              "- labelled tokens: the answer and the end token"
              + (", and the described objects' words in scene-description prompts" if info.get("label_mentions")
                 else "")
              + (" (and in planting, the described objects' words of reading-order descriptions)"
                 if info.get("plant") is not None else ""),
              f"- device {info['device']}; training loop {info['train_seconds'] / 60:.1f} min (all sessions), "
              f"wall time of the last session {info['seconds'] / 60:.1f} min; final training loss "
              f"{info['loss'] if info['loss'] is None else round(info['loss'], 4)}", ""]
    lines += ["## Held-out accuracy (first token, saved bf16 checkpoint)", "",
              "An independent draw (seed offset from training); the scene-description groups are the paper's "
              "entropy sets. Accuracy = the arg-max next token equals the answer's first token. "
              f"Target groups (>= 95% wanted): {', '.join(TARGET_GROUPS)}.", "",
              "| group | accuracy | 95% CI | n |", "|---|---|---|---|"]
    for g, a in info["final_accuracy"].items():
        lines.append(f"| {g} | {a['value']:.3f} | [{a['ci_low']:.3f}, {a['ci_high']:.3f}] | {a['n']} |")
    lines += [""] + (_validity(info["validity"]) if info.get("validity") else [])
    lines += ["## Use", "", "```python", "from vismech.models.load import load_vlm",
              f"vlm = load_vlm({info['out']!r})  # offline, through the same adapter as any real model", "```", "",
              "## Reproduce", "",
              *(["First the organism this one starts from, as its card gives it,", ""]
                + command_blocks(info["source_commands"]) + ["then this one:", ""]
                if info.get("source_commands") else []),
              "```", reproduce_command(info), "```", "",
              "The training log is `train_log.jsonl`; per-step emergence snapshots are in `emergence.jsonl`.", ""]
    return "\n".join(lines)


def write_card(out: str | Path, info: dict, model=None) -> Path:
    """Write ``README.md`` into ``out``; ``model`` (optional) adds the per-module parameter split."""
    if model is None:
        from vismech.models.load import load_vlm

        model = load_vlm(str(out), dtype="bf16", device="cpu").model
    path = Path(out) / "README.md"
    path.write_text(card_text(info, model))
    return path
