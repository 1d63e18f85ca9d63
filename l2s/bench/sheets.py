"""Contact sheets: every image of a method per task with its prompt, detections and verdict,
paged; and one side-by-side sheet of the images on which the methods disagree."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from l2s.bench import store
from l2s.grids import Cell, grid

COLUMNS = 8  # tiles a row of a method's sheet
PAGE_ROWS = 6  # rows a page of a method's sheet: 48 images
DISAGREE_ROWS = 10  # (prompt, image) rows a page of the disagreement sheet


def _cell(out: Path, rec: dict, caption: Sequence[str]) -> Cell:
    image = store.load_image(out / rec["filename"])[0]
    boxes = [b for found in json.loads(rec["details"]).values() for b in found]
    return Cell(image, caption, rec["correct"], boxes)


def _pages(prefix: Path, count: int) -> list[Path]:
    """Page paths ``prefix.png``, ``prefix-2.png``, ...; pages beyond ``count`` left from an
    earlier, larger summary are removed."""
    paths = [prefix.with_name(prefix.name + (f"-{i + 1}" if i else "") + ".png")
             for i in range(count)]
    for old in prefix.parent.glob(prefix.name + "-*.png"):
        if old not in paths and old.stem[len(prefix.name) + 1:].isdigit():
            old.unlink()
    return paths


def method_sheets(out: Path, method: str, records: list[dict]) -> list[Path]:
    """``contact_<method>_<task>.png`` (then ``-2``, ``-3``, ...): every image of the method,
    per task, in pages of COLUMNS x PAGE_ROWS."""
    by_task: dict[str, list[dict]] = {}
    for r in records:
        by_task.setdefault(r["tag"], []).append(r)
    written = []
    per_page = COLUMNS * PAGE_ROWS
    for task, recs in by_task.items():
        # Another shard's image damaged since it was scored is left out (that shard's rerun
        # makes it again).
        recs = [r for r in recs if store.image_readable(out / r["filename"])]
        correct = sum(r["correct"] for r in recs)
        pages = _pages(out / f"contact_{store.method_folder(method)}_{task}",
                       -(-len(recs) // per_page))
        for p, path in enumerate(pages):
            page = recs[p * per_page:(p + 1) * per_page]
            cells = [_cell(out, r, [r["prompt"], f"seed {r['seed']}"]) for r in page]
            written.append(grid([cells[i:i + COLUMNS] for i in range(0, len(cells), COLUMNS)],
                                path, title=f"{method}, {task}: {correct} of {len(recs)} "
                                            f"correct (page {p + 1} of {len(pages)})",
                                caption_lines=4))
    return written


def disagreement_sheet(out: Path, by_method: dict[str, list[dict]]) -> list[Path]:
    """``disagreements.png`` (then ``-2``, ...): a row per (prompt, image) that some methods
    get right and others wrong, a column per method, from the same seed; none with fewer than
    two methods."""
    methods = [m for m, recs in by_method.items() if recs]
    if len(methods) < 2:
        return _pages(out / "disagreements", 0)
    keyed = {m: {(r["prompt_index"], r["image_index"]): r for r in by_method[m]}
             for m in methods}
    shared = sorted(set.intersection(*(set(k) for k in keyed.values())))
    rows = [k for k in shared if len({keyed[m][k]["correct"] for m in methods}) > 1
            and all(store.image_readable(out / keyed[m][k]["filename"]) for m in methods)]
    pages = _pages(out / "disagreements", -(-len(rows) // DISAGREE_ROWS))
    written = []
    for p, path in enumerate(pages):
        keys = rows[p * DISAGREE_ROWS:(p + 1) * DISAGREE_ROWS]
        first = keyed[methods[0]]
        written.append(grid(
            [[_cell(out, keyed[m][k], []) for m in methods] for k in keys], path,
            title=f"where the methods disagree: {len(rows)} of {len(shared)} images "
                  f"(page {p + 1} of {len(pages)})",
            row_labels=[f"{first[k]['prompt']} (seed {first[k]['seed']})" for k in keys],
            col_labels=methods, label_width=160))
    return written
