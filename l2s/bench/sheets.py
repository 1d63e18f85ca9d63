"""Contact sheets: a grid of a method's images for one task, detections drawn, verdict framed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from l2s.inversion.cache import atomic_write

TILE = 128  # tile side in pixels: toy images grow (nearest), large ones shrink


def contact_sheet(images: list[np.ndarray], records: list[dict], path: Path,
                  columns: int = 10) -> None:
    """A PNG grid: each image with its kept detections' boxes (GenEval's "details"), framed
    green when the image is correct, red when not."""
    if not images:
        return
    h, w = images[0].shape[:2]
    scale = TILE / max(h, w)
    tw, th = round(w * scale), round(h * scale)
    cw, ch = tw + 4, th + 4
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (min(columns, len(images)) * cw, rows * ch), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    resample = Image.NEAREST if scale >= 1 else Image.BILINEAR
    for i, (img, rec) in enumerate(zip(images, records, strict=True)):
        x0, y0 = (i % columns) * cw, (i // columns) * ch
        sheet.paste(Image.fromarray(img).resize((tw, th), resample), (x0 + 2, y0 + 2))
        frame = (0, 200, 0) if rec["correct"] else (220, 0, 0)
        draw.rectangle([x0, y0, x0 + cw - 1, y0 + ch - 1], outline=frame, width=2)
        for boxes in json.loads(rec["details"]).values():
            for bx1, by1, bx2, by2, _ in boxes:
                left, top = x0 + 2 + bx1 * scale, y0 + 2 + by1 * scale
                right, bottom = x0 + 1 + bx2 * scale, y0 + 1 + by2 * scale
                draw.rectangle([left, top, max(left, right), max(top, bottom)],
                               outline=(255, 255, 255))
    atomic_write(Path(path), lambda tmp: sheet.save(tmp, format="PNG"))
