"""The cost-accuracy frontier of a benchmark run: position accuracy against seconds per image,
one point per method with its 95% interval, drawn as a PNG with PIL only."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from l2s.inversion.cache import atomic_write

SIZE = (820, 520)  # pixels of the figure
MARGIN = (100, 40, 230, 60)  # left, top, right (labels), bottom
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")


def frontier_points(methods: dict[str, dict], clock: str = "seconds"
                    ) -> list[tuple[str, float, float, list[float]]]:
    """(method, seconds per image, position accuracy, its 95% interval) of each method that
    has both, in the run's order; ``clock``: "seconds" (wall) or "cpu_seconds"."""
    points = []
    for name, m in methods.items():
        sec, acc = m.get(f"{clock}_per_image"), m.get("position_accuracy")
        if sec is None or acc is None or not sec > 0:
            continue
        points.append((name, float(sec), float(acc), list(m.get("position_ci95") or [acc, acc])))
    return points


def _ticks(low: float, high: float) -> list[float]:
    """1-2-3-5 ticks covering [low, high] on a log axis."""
    ticks = []
    for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        ticks += [f * 10.0 ** e for f in (1, 2, 3, 5) if low <= f * 10.0 ** e <= high]
    return ticks or [low, high]


def frontier_plot(methods: dict[str, dict], path: Path, title: str = "",
                  clock: str = "seconds") -> Path | None:
    """Write the frontier of ``methods`` (a bench summary: seconds_per_image,
    position_accuracy, position_ci95 per method) to ``path``; None when no method has a
    position accuracy and a time. The x axis is logarithmic (best-of-N costs ~N plain
    generations); ``clock="cpu_seconds"`` plots CPU time, the fair cost of a one-thread run
    on a shared CPU. The legend gives each accuracy and its time's ratio to plain."""
    points = frontier_points(methods, clock)
    if not points:
        return None
    w, h = SIZE
    left, top, right, bottom = MARGIN
    x0, x1, y0, y1 = left, w - right, h - bottom, top  # plot box, y grows downwards
    secs = [p[1] for p in points]
    lo, hi = math.log10(min(secs) / 1.5), math.log10(max(secs) * 1.5)
    img = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=13)

    def px(sec: float) -> float:
        return x0 + (math.log10(sec) - lo) / (hi - lo) * (x1 - x0)

    def py(acc: float) -> float:
        return y0 + acc * (y1 - y0)

    for tick in _ticks(10 ** lo, 10 ** hi):
        x = px(tick)
        draw.line([(x, y0), (x, y1)], fill="#e6e6e6")
        draw.text((x, y0 + 6), f"{tick:g}", fill="black", font=font, anchor="ma")
    for i in range(11):
        y = py(i / 10)
        draw.line([(x0, y), (x1, y)], fill="#e6e6e6")
        draw.text((x0 - 6, y), f"{i / 10:.1f}", fill="black", font=font, anchor="rm")
    draw.rectangle([x0, y1, x1, y0], outline="black")
    label = "CPU seconds" if clock == "cpu_seconds" else "seconds"
    draw.text(((x0 + x1) / 2, h - 22), f"{label} per image (log scale)", fill="black",
              font=font, anchor="ma")
    draw.text((12, (y0 + y1) / 2), "position\naccuracy\n(95% CI)", fill="black", font=font,
              anchor="lm")
    if title:
        draw.text(((x0 + x1) / 2, 12), title, fill="black", font=font, anchor="ma")
    plain = next((sec for name, sec, _, _ in points if name == "plain"), None)
    for i, (name, sec, acc, (low, high)) in enumerate(points):
        color = COLORS[i % len(COLORS)]
        x, y = px(sec), py(acc)
        draw.line([(x, py(low)), (x, py(high))], fill=color, width=2)
        for end in (low, high):
            draw.line([(x - 5, py(end)), (x + 5, py(end))], fill=color, width=2)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=color)
        ly = y1 + 14 + 20 * i
        draw.ellipse([x1 + 14, ly - 5, x1 + 24, ly + 5], fill=color)
        ratio = f", x{sec / plain:.2f}" if plain and name != "plain" else ""
        draw.text((x1 + 30, ly), f"{name} {acc:.3f}{ratio}", fill="black", font=font,
                  anchor="lm")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return path
