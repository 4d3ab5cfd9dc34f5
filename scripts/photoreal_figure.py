"""Render 12 photoreal scenes at a model's patch-aligned size and tile them into one figure (docs/photoreal.png).

    python scripts/photoreal_figure.py --model qwen2_5_vl --out docs/photoreal.png

Prints the render time per image (renders already in the cache are not timed; set VISMECH_CACHE to an empty folder
to time them all). Each tile is captioned with the trial's prompt and answer (left object = ID 0, right = ID 1).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from PIL import Image, ImageDraw


def main() -> None:
    from vismech.models.load import geometry_for
    from vismech.scenes import photoreal

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2_5_vl")
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spp", type=int, default=photoreal.DEFAULT_SPP)
    ap.add_argument("--tile", type=int, default=300, help="pixels per tile in the figure")
    ap.add_argument("--out", default="docs/photoreal.png")
    args = ap.parse_args()
    size = photoreal.canvas_px(geometry_for(args.model))
    t0 = time.perf_counter()
    trials, seconds = photoreal.render_items(photoreal.photoreal_trials(args.n, args.seed), size, args.spp)
    wall = time.perf_counter() - t0
    if seconds:
        print(f"{len(seconds)} renders of {size}x{size} px at {args.spp} spp on {os.cpu_count()} CPU cores: "
              f"{np.mean(seconds):.2f} s per image (min {min(seconds):.2f}, max {max(seconds):.2f}); "
              f"{wall:.1f} s in all")
    cols, cap = 4, 30
    rows = -(-len(trials) // cols)
    fig = Image.new("RGB", (cols * args.tile, rows * (args.tile + cap)), "white")
    draw = ImageDraw.Draw(fig)
    for i, t in enumerate(trials):
        r, c = divmod(i, cols)
        with Image.open(t.picture.path) as im:
            tile = im.convert("RGB").resize((args.tile, args.tile), Image.LANCZOS)
        fig.paste(tile, (c * args.tile, r * (args.tile + cap)))
        y = r * (args.tile + cap) + args.tile + 3
        draw.text((c * args.tile + 6, y), f"{t.meta['environment']}: ...a {t.mentioned[0].name} and a", fill="black")
        draw.text((c * args.tile + 6, y + 12), f"-> {t.answer}", fill=(40, 40, 160))
    fig.save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
