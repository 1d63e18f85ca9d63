"""Draw docs/figures/leakage.png: one toy scene's attention maps under its true caption and a
caption with the opposite relation, at a noisy and a clean timestep (docs/classifier.md).

    python scripts/leakage_figure.py --model toy --out docs/figures/leakage.png
    python scripts/leakage_figure.py --weights runs/literate/model   # a toy UNet export

Each map is the recorded word's cross-attention averaged over every layer and head (the
classifier's input, before it weighs them), on the image forward-noised to each timestep (as
``l2s invert --inversion noise`` records it). A model whose maps leak moves the object word's
map at the noisy step to where the caption says the object is, whatever the image shows; the
toy's maps are the same under both captions. The script prints each map's centroid (x, y in map
cells).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image, ImageDraw

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CELL = 6  # pixels per map cell in the figure


def _scene(seed: int, index: int):
    """The index-th two-shape scene of the shapes source with a relation, and that relation."""
    from l2s.relations import geneval_relations
    from l2s.toy.scenes import random_scene

    i = index
    while True:
        scene = random_scene(np.random.default_rng([seed, i]), size=32, n_objects=2)
        a, b = scene.objects
        held = sorted(geneval_relations(a.box, b.box))
        if held:
            return scene, held[0]
        i += 1


def _heat(m: np.ndarray) -> Image.Image:
    m = (m - m.min()) / max(float(m.max() - m.min()), 1e-9)
    rgb = np.stack([m, m ** 2, 0.25 * (1 - m)], -1)  # dark blue -> orange -> yellow
    img = Image.fromarray((rgb * 255).astype(np.uint8))
    return img.resize((img.width * CELL, img.height * CELL), Image.NEAREST)


def _centroid(m: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[: m.shape[0], : m.shape[1]]
    w = m / m.sum()
    return float((xs * w).sum()), float((ys * w).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="toy", help="a preset of the toy world")
    p.add_argument("--weights", help="instead of --model: a toy UNet export folder")
    p.add_argument("--out", default="docs/figures/leakage.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--index", type=int, default=3, help="which scene of the seed")
    p.add_argument("--steps", default="2,49", help="noisy,clean step of a 50-step schedule")
    args = p.parse_args()
    torch.set_num_threads(1)

    from l2s.engine.loading import load_backbone
    from l2s.engine.tokens import pair_tokens
    from l2s.inversion.loop import noised_latents, record_maps
    from l2s.relations import Triplet, format_prompt

    if args.weights:
        from l2s.families.unet import UNetDenoiser
        from l2s.toy.model import load_toy_components

        den = UNetDenoiser(*load_toy_components(args.weights), name="toy")
    else:
        den = load_backbone(args.model, device="cpu")
    scene, rel = _scene(args.seed, args.index)
    a, b = (o.category for o in scene.objects)
    wrong = OPPOSITE[rel]
    prompts = [format_prompt([Triplet(a, r, b)], style="plain") for r in (rel, wrong)]
    groups = [[list(g.indices) for g in pair_tokens(den.tokenizer, q, a, b)] for q in prompts]
    steps = [int(s) for s in args.steps.split(",")]
    img = torch.from_numpy(scene.image.copy()).float().div(255).unsqueeze(0)
    x0 = den.encode_image(img)
    lat = noised_latents(den, x0, 50, torch.Generator().manual_seed(args.seed))
    maps = record_maps(den, lat.repeat(1, 2, 1, 1, 1), prompts, groups, steps, 50)
    maps = maps.float().mean(3).numpy()  # (2 prompts, T, 2 words, S, S)
    ts = den.timesteps(50)

    tiles = maps.shape[-1] * CELL
    pad, top, left = 6, 34, 190
    cols = 1 + 2 * len(steps)
    fig = Image.new("RGB", (left + cols * (tiles + pad), top + 2 * (tiles + pad)), "white")
    draw = ImageDraw.Draw(fig)
    picture = Image.fromarray(scene.image).resize((tiles, tiles), Image.NEAREST)
    for j, s in enumerate(steps):
        for w, word in enumerate((a, b)):
            x = left + (1 + 2 * j + w) * (tiles + pad)
            draw.text((x, 4), f"'{word}', t={int(ts[s])}", fill="black")
    draw.text((left, 4), "image", fill="black")
    for i, q in enumerate(prompts):
        y = top + i * (tiles + pad)
        draw.text((4, y + tiles // 2 - 12), ("true: " if i == 0 else "wrong: ") + q,
                  fill="black")
        fig.paste(picture, (left, y))
        for j, s in enumerate(steps):
            for w in range(2):
                fig.paste(_heat(maps[i, j, w]), (left + (1 + 2 * j + w) * (tiles + pad), y))
                cx, cy = _centroid(maps[i, j, w])
                print(f"{'true ' if i == 0 else 'wrong'} t={int(ts[s]):4d} "
                      f"{(a, b)[w]:>8}: centroid x={cx:.2f} y={cy:.2f}   ({q})")
    fig.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
