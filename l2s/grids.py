"""Labelled image grids drawn with PIL: tiles with captions, verdict frames and detection boxes,
under a title, with row and column labels (steer's plain-vs-steered grid, bench's sheets)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from l2s.inversion.cache import atomic_write

TILE = 128  # tile side in pixels: toy images grow (nearest), large ones shrink
FONT_SIZE = 11
GAP = 4  # pixels between tiles (the verdict frame is drawn in it)
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
VERDICT_COLOURS = {True: (0, 150, 0), False: (200, 0, 0), None: (150, 150, 150)}


@dataclass
class Cell:
    """One tile: the image (H, W, 3) uint8, caption lines under it, its verdict (framed green
    when True, red when False, grey when unjudged) and boxes (x1, y1, x2, y2) in its pixels."""

    image: np.ndarray
    caption: Sequence[str] = ()
    verdict: bool | None = None
    boxes: Sequence[Sequence[float]] = field(default_factory=list)


def font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    """PIL's bundled font at ``size`` (a bitmap one where Pillow lacks FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError):  # Pillow < 10.1 or no FreeType: fixed size
        return ImageFont.load_default()


def wrap(text: str, width: float, fnt: ImageFont.ImageFont, max_lines: int) -> list[str]:
    """``text`` in lines of at most ``width`` pixels, greedily by words; past ``max_lines``
    the last line ends in an ellipsis."""
    lines: list[str] = []
    for word in text.split():
        if lines and fnt.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
        else:
            while fnt.getlength(word) > width and len(word) > 1:  # a word wider than the tile
                cut = max(1, int(len(word) * width / fnt.getlength(word)))
                lines.append(word[:cut])
                word = word[cut:]
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and fnt.getlength(last + "…") > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def _tile(image: np.ndarray, side: int) -> tuple[Image.Image, float]:
    """The image scaled so its longer side is ``side`` (nearest when growing), and the scale."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    resample = Image.NEAREST if scale >= 1 else Image.BILINEAR
    return Image.fromarray(image).resize((round(w * scale), round(h * scale)), resample), scale


def grid(cells: Sequence[Sequence[Cell | None]], path: str | Path, title: str = "",
         row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
         side: int = TILE, caption_lines: int = 3, label_width: int = 0,
         verdict_words: tuple[str, str] = ("correct", "wrong")) -> Path:
    """Write a PNG of ``cells`` (rows of tiles; None leaves a gap): the title wrapped across
    the top, column labels over the tiles, row labels in a left column ``label_width`` pixels
    wide (wrapped), each tile framed by its verdict with its caption (wrapped, at most
    ``caption_lines`` lines) under it, then the verdict in its colour (``verdict_words``: for
    True, for False)."""
    fnt, bold = font(), font(FONT_SIZE + 2)
    line_h = FONT_SIZE + 3
    columns = max((len(r) for r in cells), default=0)
    if row_labels and not label_width:
        label_width = side
    cw = side + 2 * GAP
    width = label_width + max(columns, 1) * cw + GAP
    title_lines = wrap(title, width - 2 * GAP, bold, 3) if title else []
    top = GAP + len(title_lines) * (line_h + 2) + (line_h if col_labels else 0) + GAP
    def caption(cell: Cell | None) -> list[str]:
        if cell is None:
            return []
        lines = sum((wrap(c, side, fnt, caption_lines) for c in cell.caption), [])
        lines = lines[:caption_lines]
        return lines if cell.verdict is None else \
            [*lines, verdict_words[0] if cell.verdict else verdict_words[1]]

    captions = [[caption(cell) for cell in row] for row in cells]
    rows_h = [side + 2 * GAP + line_h * max((len(c) for c in caps), default=0) + GAP
              for caps in captions]
    sheet = Image.new("RGB", (width, top + sum(rows_h)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title_lines):
        draw.text((GAP, GAP + i * (line_h + 2)), line, fill=INK, font=bold)
    for c, label in enumerate(col_labels or []):
        text = wrap(label, side, fnt, 1)[0] if label else ""
        draw.text((label_width + c * cw + GAP, top - line_h - GAP), text, fill=INK, font=fnt)
    y = top
    for r, (row, caps) in enumerate(zip(cells, captions, strict=True)):
        if row_labels:
            for i, line in enumerate(wrap(row_labels[r], label_width - 2 * GAP, fnt,
                                          max(1, rows_h[r] // line_h - 1))):
                draw.text((GAP, y + GAP + i * line_h), line, fill=INK, font=fnt)
        for c, (cell, cap) in enumerate(zip(row, caps, strict=True)):
            if cell is None:
                continue
            x = label_width + c * cw
            img, scale = _tile(cell.image, side)
            sheet.paste(img, (x + GAP, y + GAP))
            colour = VERDICT_COLOURS[None if cell.verdict is None else bool(cell.verdict)]
            draw.rectangle([x + 1, y + 1, x + GAP + img.width + GAP - 2,
                            y + GAP + img.height + GAP - 2], outline=colour, width=GAP - 1)
            for x1, y1, x2, y2, *_ in cell.boxes:
                left, upper = x + GAP + x1 * scale, y + GAP + y1 * scale
                right, lower = x + GAP + x2 * scale - 1, y + GAP + y2 * scale - 1
                draw.rectangle([left, upper, max(left, right), max(upper, lower)],
                               outline=(255, 255, 255))
            for i, line in enumerate(cap):
                draw.text((x + GAP, y + side + 2 * GAP + i * line_h), line,
                          fill=colour if i == len(cap) - 1 and cell.verdict is not None
                          else INK, font=fnt)
        y += rows_h[r]
    path = Path(path)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))  # never a 0-byte PNG
    return path
