"""Scoring a toy model while it trains: generate two-object prompts, detect, GenEval's rule.

``evaluate`` samples either toy through its engine adapter and the one sampling loop (the UNet
toy with guided DDIM, the toy-mmdit with Euler flow matching) and scores the images with
``score_generations`` (the toy detector: both objects present, GenEval position accuracy, clean
layouts). ``l2s bench`` is the full benchmark; this is the trainer's quick check.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class ToyEval:
    """Detector scores of one batch of two-object generations (GenEval-style)."""

    n: int  # prompts generated
    both_present: float  # share of images where both requested shapes are detected
    position_accuracy: float  # share where, in addition, GenEval's rule finds the relation
    clean: float  # share with both present, not touching and not oversized blobs
    seconds: float  # wall time of generation + detection
    grid: str | None = None  # PNG of the generated images, when saved


def two_object_prompts(n: int, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """n prompts "a A REL a B" over distinct shape pairs: (prompt, A, relation, B), seeded.

    Cycles through all ordered pairs x relations in a shuffled order, so 120 prompts cover
    each (A, B, relation) once.
    """
    from l2s.toy.scenes import CAPTION_PHRASES, CATEGORY_NAMES

    combos = [(a, rel, b) for a in CATEGORY_NAMES for b in CATEGORY_NAMES if a != b
              for rel in CAPTION_PHRASES]
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        for i in rng.permutation(len(combos)):
            a, rel, b = combos[i]
            phrases = CAPTION_PHRASES[rel]
            phrase = phrases[int(rng.integers(len(phrases)))]
            out.append((f"a {a} {phrase} a {b}", a, rel, b))
    return out[:n]


def save_grid(images: np.ndarray, path: Path, columns: int = 16) -> Path:
    """Tile (N, H, W, 3) images in [0, 1] into one PNG, 1 px grey gutters."""
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    grid = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1, 3), 64, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        grid[1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + c * (w + 1): 1 + c * (w + 1) + w] = (
            np.clip(im * 255 + 0.5, 0, 255).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)
    return path


def score_generations(images: np.ndarray, items, start: float, grid: str | Path | None = None
                      ) -> ToyEval:
    """Score (N, H, W, 3) images in [0, 1] generated for ``two_object_prompts`` items.

    Each image goes through the toy world's one scorer, ``l2s.toy.detector.score_pair``: it
    counts when both objects are detected and GenEval's relative-position rule finds the
    requested relation; clean = both present and not fused.
    """
    from l2s.toy.detector import score_pair

    both = correct = clean = 0
    for im, (_, a, rel, b) in zip(images, items, strict=True):
        sc = score_pair(im, a, rel, b)
        both += sc.both_present
        correct += sc.correct
        clean += sc.both_present and not sc.fused
    path = save_grid(images, Path(grid)) if grid is not None else None
    n = len(items)
    return ToyEval(n, both / n, correct / n, clean / n, time.perf_counter() - start,
                   None if path is None else str(path))


@torch.no_grad()
def evaluate(denoiser, *, prompts: int = 200, steps: int = 20, guidance: float = 3.0,
             seed: int = 0, batch: int = 100, grid: str | Path | None = None) -> ToyEval:
    """Generate two-object prompts with a toy's ``Denoiser`` and score them; the noise of all
    chunks comes from one generator seeded with ``seed``."""
    from l2s.engine.sampling import sample

    start = time.perf_counter()
    items = two_object_prompts(prompts, seed)
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for i in range(0, len(items), batch):
        chunk = [p for p, *_ in items[i:i + batch]]
        chunks.append(sample(denoiser, chunk, steps=steps, guidance=guidance,
                             generator=gen).float().cpu().numpy())
    return score_generations(np.concatenate(chunks), items, start, grid)
