"""PNG figures with PIL only: attention overlays before/after steering, loss curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from l2s.inversion.cache import atomic_write

CELL = 128  # pixel side of one overlay tile


def _heat(m: np.ndarray) -> np.ndarray:
    """(S, S) map -> (CELL, CELL, 3) uint8 heat colours (black -> red -> yellow)."""
    m = m / max(float(m.max()), 1e-12)
    img = Image.fromarray((m * 255).astype(np.uint8)).resize((CELL, CELL), Image.BILINEAR)
    v = np.asarray(img).astype(np.float32) / 255
    return (np.stack([np.clip(2 * v, 0, 1), np.clip(2 * v - 1, 0, 1), 0 * v], -1) * 255
            ).astype(np.uint8)


def overlay(image: np.ndarray, m: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """The image (H, W, 3) uint8 with an attention map (S, S) blended over it."""
    base = np.asarray(Image.fromarray(image).resize((CELL, CELL), Image.NEAREST), np.float32)
    return Image.fromarray((base * (1 - alpha) + _heat(m) * alpha).astype(np.uint8))


def curve_panel(values: dict[str, Sequence[float]], width: int, height: int = 140
                ) -> Image.Image:
    """Line chart of named series over steered steps, each scaled to its own range."""
    panel = Image.new("RGB", (width, height), (20, 20, 20))
    d = ImageDraw.Draw(panel)
    colours = [(255, 90, 90), (90, 220, 90), (120, 160, 255)]
    for k, (name, ys) in enumerate(values.items()):
        ys = [y for y in ys if y is not None]
        if not ys:
            continue
        lo, hi = min(ys), max(ys)
        span = hi - lo or 1.0
        pts = [(10 + i * (width - 20) / max(len(ys) - 1, 1),
                height - 15 - (y - lo) / span * (height - 40)) for i, y in enumerate(ys)]
        if len(pts) > 1:
            d.line(pts, fill=colours[k % 3], width=2)
        d.text((10 + 170 * k, 4), f"{name}: {ys[0]:.3g} -> {ys[-1]:.3g}", fill=colours[k % 3])
    return panel


def attention_figure(image: np.ndarray, attention: Sequence[tuple[int, np.ndarray, np.ndarray]],
                     records: Sequence[dict], names: tuple[str, str], path: str | Path,
                     max_rows: int = 6) -> Path:
    """One image's subject/object maps before and after steering at (up to max_rows) steered
    steps, overlaid on the final image, with the loss and p(target) curves below.

    ``attention`` items are (step, before (2, S, S), after (2, S, S)).
    """
    rows = list(attention)
    if len(rows) > max_rows:
        keep = np.linspace(0, len(rows) - 1, max_rows).round().astype(int)
        rows = [rows[i] for i in keep]
    header = 18
    width = 4 * CELL + 60
    fig = Image.new("RGB", (width, header + len(rows) * CELL + 140), (0, 0, 0))
    d = ImageDraw.Draw(fig)
    for c, title in enumerate((f"{names[0]} before", f"{names[0]} after", f"{names[1]} before",
                               f"{names[1]} after")):
        d.text((60 + c * CELL + 4, 3), title, fill=(230, 230, 230))
    for r, (step, before, after) in enumerate(rows):
        y = header + r * CELL
        d.text((4, y + CELL // 2 - 6), f"step {step}", fill=(230, 230, 230))
        for c, m in enumerate((before[0], after[0], before[1], after[1])):
            fig.paste(overlay(image, np.asarray(m)), (60 + c * CELL, y))
    fig.paste(curve_panel({"loss": [r["loss_after"] for r in records],
                           "p(target)": [r["p_target"] for r in records]}, width),
              (0, header + len(rows) * CELL))
    path = Path(path)
    atomic_write(path, lambda tmp: fig.save(tmp, format="PNG"))  # never a 0-byte PNG
    return path
