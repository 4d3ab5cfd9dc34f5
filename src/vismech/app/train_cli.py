"""``vismech train-organism``: train a tiny VLM of a real architecture from scratch on vismech's scenes (the
command's arguments and its call into ``vismech.organism.train``)."""

from __future__ import annotations

import argparse

from vismech.app.arguments import DEVICE_HELP
from vismech.errors import UserError
from vismech.experiments.options import BATCH, COUNT, SEED, TRIALS, Opt, arg_type
from vismech.organism import plant_flags
from vismech.store.rundir import output_dir


def cmd_train_organism(args) -> int:
    import json

    from vismech.organism.config import SMALL_SIZES
    from vismech.models.load import resolve_device
    from vismech.organism.train import train_organism

    output_dir(args.out)
    resolve_device(args.device)
    if args.sizes is None:
        sizes = None
    elif args.sizes == "small":
        sizes = SMALL_SIZES[args.arch]
    else:
        try:
            sizes = json.loads(args.sizes)
        except json.JSONDecodeError:
            raise UserError("--sizes takes small or a JSON object like '{\"text\": {\"num_hidden_layers\": 4}}', "
                            f"not {args.sizes!r}") from None
    kw = {k: getattr(args, k) for k in ("eval_every", "eval_n", "workers", "max_minutes")
          if getattr(args, k) is not None}
    from vismech.organism.data import reweighted

    def weights(items, flag):
        out = {}
        for item in items or []:
            name, _, value = item.partition("=")
            try:
                out[name] = float(value)
            except ValueError:
                raise UserError(f"{flag} takes COMPONENT=NUMBER, e.g. color_2x2=0.3, not {item!r}") from None
        return out

    kw["mixture"] = reweighted(weights(args.weight, "--weight"))
    if args.early_weight and not args.early_steps:
        raise UserError("--early-weight needs --early-steps N: the step before which those weights apply")
    if args.early_steps:
        kw["early"] = (args.early_steps, reweighted(weights(args.early_weight, "--early-weight"), kw["mixture"]))
    extra = plant_flags.given(args) + [f for f, v in (("--plant-weight", args.plant_weight),
                                                     ("--plant-heads", args.plant_heads)) if v]
    if extra and not args.plant:
        raise UserError(f"{', '.join(extra)}: {'an option' if len(extra) == 1 else 'options'} of planting; give "
                        f"--plant ids too")
    if args.plant:
        from vismech.organism.plant import PlantSpec

        w = dict(PlantSpec().weights)
        w.update(weights(args.plant_weight, "--plant-weight"))
        kw["plant"] = PlantSpec(weights=tuple(w.items()), **plant_flags.spec_fields(args),
                                **plant_heads(args.plant_heads))
    if args.snapshots == "analysis":
        from vismech.organism.snapshot import AnalysisSnapshot

        kw["snapshot"] = AnalysisSnapshot()
    res = train_organism(args.arch, args.out, steps=args.steps, seed=args.seed, device=args.device,
                         batch_size=args.batch_size, lr=args.lr, resume=args.resume, sizes=sizes,
                         label_mentions=args.label_mentions, vision_from=args.vision_from,
                         init_from=args.init_from, freeze_vision=args.freeze_vision,
                         freeze_through=args.freeze_through,
                         packed_attention=False if args.no_packed_attention else None, **kw)
    s = res.summary
    accs = " ".join(f"{g}={a['value']:.3f}" for g, a in s.get("final_accuracy", {}).items())
    print(f"organism {s['arch']}: {s['steps']}/{s['planned_steps']} steps in {s['seconds'] / 60:.1f} min on "
          f"{s['device']}, {s['params']:,} params ({s.get('bytes', 0) / 1e6:.2f} MB), final loss "
          f"{s['loss'] if s['loss'] is None else round(s['loss'], 4)}; held-out first-token accuracy: {accs} "
          f"-> {s['out']}")
    return 0


def plant_heads(items) -> dict:
    """``--plant-heads STAGE=L:H,L:H`` (repeatable) as PlantSpec fields: {stage: ((L, H), ...)}."""
    from vismech.organism.plant import COMPONENTS

    out = {}
    for item in items or []:
        stage, _, heads = item.partition("=")
        try:
            if stage not in COMPONENTS:
                raise ValueError
            out[stage] = tuple(tuple(int(x) for x in h.split(":", 1)) for h in heads.split(","))
            if not out[stage] or any(len(h) != 2 for h in out[stage]):
                raise ValueError
        except ValueError:
            raise UserError(f"--plant-heads takes STAGE=LAYER:HEAD[,LAYER:HEAD...] with STAGE one of "
                            f"{', '.join(COMPONENTS)}, e.g. gathering=3:0,3:1,3:2,3:3; not {item!r}") from None
    return out


def add_train_parser(sub) -> argparse.ArgumentParser:
    s = sub.add_parser("train-organism", help="train a tiny VLM of a real architecture from scratch on vismech's "
                       "scenes and save it as a checkpoint (see vismech.organism)")
    s.add_argument("--arch", required=True, choices=["qwen2_5_vl", "llava"])
    s.add_argument("--out", required=True, help="output directory (checkpoint, model card, logs, train state)")
    s.add_argument("--steps", type=arg_type(COUNT, "--steps"), default=8000)
    s.add_argument("--seed", type=arg_type(SEED, "--seed"), default=0)
    s.add_argument("--device", default=None, help=DEVICE_HELP)
    s.add_argument("--batch-size", type=arg_type(BATCH, "--batch-size"), default=128)
    s.add_argument("--lr", type=arg_type(Opt("float", 0, 10, open=True), "--lr"), default=1e-3, help="peak learning rate (warmup, then cosine decay)")
    s.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    s.add_argument("--workers", type=arg_type(Opt("int", 0, 256), "--workers"), default=None, help="data worker processes (default: 0 on CPU, "
                   "4 on CUDA)")
    s.add_argument("--label-mentions", action="store_true", help="also train on the described objects' words of "
                   "scene-description prompts (denser supervision; default: the answer only)")
    s.add_argument("--eval-every", type=arg_type(COUNT, "--eval-every"), default=None, help="steps between held-out evaluations (500)")
    s.add_argument("--eval-n", type=arg_type(TRIALS, "--eval-n"), default=None, help="held-out trials per group (128)")
    s.add_argument("--max-minutes", type=arg_type(Opt("float", 0, open=True), "--max-minutes"), default=None, help="stop early after this long, still saving")
    s.add_argument("--early-steps", type=arg_type(COUNT, "--early-steps"), default=None, help="a curriculum: before this step, train on the "
                   "mixture changed by --early-weight")
    s.add_argument("--early-weight", action="append", metavar="COMPONENT=W", help="a mixture weight before "
                   "--early-steps (on top of --weight), e.g. sd_3x3_high=0; repeat for several")
    s.add_argument("--vision-from", default=None, metavar="ORGANISM", help="start the vision tower and projector "
                   "from this trained organism (name or folder) of the same --arch and --sizes")
    s.add_argument("--init-from", default=None, metavar="ORGANISM", help="start every weight from this trained "
                   "organism (a continuation with a fresh optimizer and schedule)")
    s.add_argument("--freeze-vision", action="store_true", help="with --vision-from or --init-from: train the "
                   "language model only (a second stage on a tower trained before)")
    s.add_argument("--freeze-through", type=arg_type(Opt("int", 0), "--freeze-through"), default=None, metavar="LAYER",
                   help="with --init-from: keep the vision tower, the projector, the text embeddings and the language "
                   "model's layers 0 to LAYER fixed, and train the later layers (a repair after an edit of that "
                   "layer, such as python -m vismech.organism.erase)")
    s.add_argument("--no-packed-attention", action="store_true", help="on CUDA, run the Qwen2.5-VL vision "
                   "tower with HF's own attention instead of vismech's packed one (slower; a check)")
    s.add_argument("--plant", choices=["ids"], default=None, help="ids: plant the paper's three stages in declared "
                   "heads by interchange intervention training (vismech.organism.plant) and declare them in "
                   "ground_truth.json, instead of training on the task mixture")
    s.add_argument("--plant-weight", action="append", metavar="TERM=W", help="a loss weight of planting (terms: "
                   f"{', '.join(plant_flags.LOSS_TERMS)}; 0 drops a term); repeatable")
    for f in plant_flags.FLAGS:
        if f.rule is None:
            s.add_argument(f.name, action="store_true", help="with --plant ids: " + f.help)
        else:
            s.add_argument(f.name, type=arg_type(f.rule, f.name), default=None, metavar=f.metavar,
                           help="with --plant ids: " + f.help)
    s.add_argument("--plant-heads", action="append", metavar="STAGE=L:H,...", help="with --plant ids: the heads "
                   "declared for one stage (binding, retrieval, gathering, selection, features) instead of the "
                   "default, e.g. gathering=3:0,3:1,3:2,3:3; repeatable")
    s.add_argument("--weight", action="append", metavar="COMPONENT=W", help="change a training-mixture weight "
                   "(vismech.organism.data.MIXTURE names, e.g. color_2x2=0.3; 0 drops it); repeatable")
    s.add_argument("--snapshots", choices=["analysis", "accuracy"], default="analysis",
                   help="what the emergence snapshots hold besides held-out accuracy: 'analysis' adds the RSA "
                   "peaks and CMA significant-head counts (vismech.organism.snapshot; default), 'accuracy' nothing")
    s.add_argument("--sizes", default=None, help="'small' (a toy organism for checks) or JSON overrides of "
                   "vismech.organism.config sizes, e.g. '{\"text\": {\"num_hidden_layers\": 4}}'")
    s.set_defaults(fn=cmd_train_organism)
    return s
