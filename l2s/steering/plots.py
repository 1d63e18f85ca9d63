"""PNG figures with PIL only: one steered image's attention maps before/after steering, and
its loss and p(target) over the steered steps on labelled axes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from l2s.grids import INK, font, wrap
from l2s.inversion.cache import atomic_write

CELL = 128  # pixel side of one overlay tile
BEFORE, AFTER = (230, 120, 0), (0, 90, 200)  # the two series of a chart


@dataclass(frozen=True)
class StepValues:
    """One image at one steered step: its loss and p(target) at the step's first forward
    (before the step's updates) and at its last (after them)."""

    step: int
    loss_before: float
    loss_after: float
    p_before: float
    p_after: float


def image_curves(curves: Sequence[tuple], image: int) -> list[StepValues]:
    """Image ``image``'s values (its index in the steered batch) from ``SteerStats.curves``,
    at the steps that steered it."""
    out = []
    for step, images, l0, l1, p0, p1 in curves:
        if image in images:
            a = images.index(image)
            out.append(StepValues(step, l0[a], l1[a], p0[a], p1[a]))
    return out


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


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float], tuple]], title: str,
               xlabel: str, ylabel: str, width: int, height: int = 200) -> Image.Image:
    """A chart on labelled axes: ``series`` maps a legend entry to (xs, ys, colour); the y
    axis spans the values' range (ticks at its ends and middle), the x axis the xs."""
    fnt = font()
    panel = Image.new("RGB", (width, height), (255, 255, 255))
    d = ImageDraw.Draw(panel)
    left, right, top, bottom = 56, 10, 34, 40  # plot area margins
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    d.text((left, 2), title, fill=INK, font=font(12))
    d.text((4, top - 14), ylabel, fill=INK, font=fnt)
    xs_all = [x for xs, _, _ in series.values() for x in xs]
    ys_all = [y for _, ys, _ in series.values() for y in ys if y is not None and np.isfinite(y)]
    if not xs_all or not ys_all:
        return panel
    lo, hi = min(ys_all), max(ys_all)
    pad = (hi - lo) * 0.05 or max(abs(hi) * 0.05, 1e-3)
    lo, hi = lo - pad, hi + pad
    xlo, xhi = min(xs_all), max(xs_all)
    xspan = (xhi - xlo) or 1.0

    def px(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xlo) / xspan * (x1 - x0), y1 - (y - lo) / (hi - lo) * (y1 - y0)

    d.line([(x0, y0), (x0, y1), (x1, y1)], fill=INK)
    for y in (lo + pad, (lo + hi) / 2, hi - pad):
        _, py = px(xlo, y)
        d.line([(x0 - 3, py), (x0, py)], fill=INK)
        d.text((2, py - 6), f"{y:.3g}", fill=INK, font=fnt)
    ticks = sorted(set(xs_all))
    every = max(1, len(ticks) // 10)
    for x in ticks[::every]:
        qx, _ = px(x, lo)
        d.line([(qx, y1), (qx, y1 + 3)], fill=INK)
        d.text((qx - 4, y1 + 4), f"{x:g}", fill=INK, font=fnt)
    d.text(((x0 + x1) / 2 - fnt.getlength(xlabel) / 2, height - 16), xlabel, fill=INK, font=fnt)
    lx = left + fnt.getlength(title) * 1.1 + 10
    for k, (name, (xs, ys, colour)) in enumerate(series.items()):
        pts = [px(x, y) for x, y in zip(xs, ys, strict=True) if y is not None and np.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        r = 2.5 if k else 5  # the first series' rings stay visible under an equal second
        for qx, qy in pts:
            d.ellipse([qx - r, qy - r, qx + r, qy + r], outline=colour,
                      fill=colour if k else None, width=2)
        d.line([(lx, 22), (lx + 14, 22)], fill=colour, width=2)
        d.text((lx + 18, 16), name, fill=INK, font=fnt)
        lx += 26 + fnt.getlength(name)
    return panel


def attention_figure(image: np.ndarray, attention: Sequence[tuple[int, np.ndarray, np.ndarray]],
                     values: Sequence[StepValues], names: tuple[str, str], path: str | Path,
                     title: str = "", max_rows: int = 6) -> Path:
    """One image's subject/object maps before and after steering at (up to max_rows) steered
    steps, overlaid on the final image, under ``title``; below them this image's loss and
    p(target) at each steered step before its updates (the first point: before any update)
    and after them.

    ``attention`` items are (step, before (2, S, S), after (2, S, S)).
    """
    rows = list(attention)
    if len(rows) > max_rows:
        keep = np.linspace(0, len(rows) - 1, max_rows).round().astype(int)
        rows = [rows[i] for i in keep]
    width = 4 * CELL + 60
    fnt = font()
    title_lines = wrap(title, width - 8, font(12), 2) if title else []
    header = 6 + 16 * len(title_lines) + 18
    charts = []
    if values:
        steps = [v.step for v in values]
        for label, before, after in (
                ("loss", [v.loss_before for v in values], [v.loss_after for v in values]),
                ("p(target)", [v.p_before for v in values], [v.p_after for v in values])):
            charts.append(line_chart(
                {"before the step's updates": (steps, before, BEFORE),
                 "after them": (steps, after, AFTER)},
                f"{label} of this image", "denoising step", label, width))
    fig = Image.new("RGB", (width, header + len(rows) * CELL + sum(c.height for c in charts)),
                    (255, 255, 255))
    d = ImageDraw.Draw(fig)
    for i, line in enumerate(title_lines):
        d.text((4, 4 + 16 * i), line, fill=INK, font=font(12))
    for c, col in enumerate((f"{names[0]} before", f"{names[0]} after", f"{names[1]} before",
                             f"{names[1]} after")):
        d.text((60 + c * CELL + 4, header - 16), col, fill=INK, font=fnt)
    for r, (step, before, after) in enumerate(rows):
        y = header + r * CELL
        d.text((4, y + CELL // 2 - 6), f"step {step}", fill=INK, font=fnt)
        for c, m in enumerate((before[0], after[0], before[1], after[1])):
            fig.paste(overlay(image, np.asarray(m)), (60 + c * CELL, y))
    y = header + len(rows) * CELL
    for chart in charts:
        fig.paste(chart, (0, y))
        y += chart.height
    path = Path(path)
    atomic_write(path, lambda tmp: fig.save(tmp, format="PNG"))  # never a 0-byte PNG
    return path
