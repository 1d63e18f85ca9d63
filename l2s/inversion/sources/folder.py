"""The folder source: images with an annotations.jsonl (format in l2s.inversion.sources)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from l2s.inversion.sources.base import (
    SPLITS,
    Sample,
    SourceError,
    SourceOptions,
    SourceReport,
    _normalise,
    _Quota,
    _strongest,
    _unit,
    per_relation,
)
from l2s.relations import RELATIONS, canonical_relation, geneval_relations

# ---------------------------------------------------------------------------------------------
# Folder


ANNOTATIONS = "annotations.jsonl"


def _line_box(value, key: str, where: str) -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        box = ()
    if len(box) != 4 or not all(np.isfinite(box)) or box[2] < box[0] or box[3] < box[1] \
            or box[0] < 0 or box[1] < 0:
        raise SourceError(
            f"{where}: {key} must be [x1, y1, x2, y2] in pixels with 0 <= x1 <= x2 and "
            f"0 <= y1 <= y2, got {value!r}"
        )
    return box


def _folder_line(line: str, where: str, report: SourceReport) -> dict | None:
    """One annotation line checked and normalised; None when dropped (counted in report)."""
    try:
        entry = json.loads(line)
    except ValueError as err:
        raise SourceError(
            f"{where}: not valid JSON ({err}); write one JSON object per line"
        ) from None
    if not isinstance(entry, dict):
        raise SourceError(f"{where}: expected a JSON object, got {type(entry).__name__}")
    required = ("image", "subject", "object", "subject_box", "object_box")
    missing = [k for k in required if k not in entry]
    if missing:
        raise SourceError(
            f"{where}: missing {', '.join(missing)}; every line needs {', '.join(required)} "
            "(relation and split are optional)"
        )
    for key in ("image", "subject", "object"):
        if not isinstance(entry[key], str) or not entry[key].strip():
            raise SourceError(f"{where}: {key} must be a non-empty string, got {entry[key]!r}")
    if _normalise(entry["subject"]) == _normalise(entry["object"]):
        raise SourceError(f"{where}: subject and object are both {entry['subject']!r}: a "
                          "relation needs two different objects (their maps would come from "
                          "the same word)")
    box_a = _line_box(entry["subject_box"], "subject_box", where)
    box_b = _line_box(entry["object_box"], "object_box", where)
    split = entry.get("split")
    if split is not None and split not in SPLITS:
        raise SourceError(f"{where}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    held = geneval_relations(box_a, box_b)
    phrase = entry.get("relation")
    if phrase is not None:
        if not isinstance(phrase, str):
            raise SourceError(f"{where}: relation must be a string, got {phrase!r}")
        try:
            relation = canonical_relation(phrase)
        except ValueError as err:
            raise SourceError(f"{where}: {err}") from None
        if relation not in RELATIONS:
            report.dropped["non-directional relation"] += 1
            return None
        if relation not in held:
            report.dropped["relation disagrees with boxes"] += 1
            return None
    elif not held:
        report.dropped["no relation holds"] += 1
        return None
    else:
        relation = _strongest(held, box_a, box_b)
    return {
        "image": entry["image"], "subject": _normalise(entry["subject"]),
        "object": _normalise(entry["object"]), "relation": relation,
        "subject_box": box_a, "object_box": box_b, "split": split,
    }


def folder_source(options: SourceOptions, report: SourceReport, denoiser=None
                  ) -> Iterator[Sample]:
    if options.folder is None:
        raise SourceError(
            f"the folder source needs --folder: a folder with your images and an {ANNOTATIONS} "
            "(format in docs, or help(l2s.inversion.sources))"
        )
    folder = Path(options.folder).expanduser()
    if not folder.is_dir():
        raise SourceError(f"--folder {options.folder} is not a folder: pass the folder that "
                          f"holds your images and their {ANNOTATIONS}")
    path = folder / ANNOTATIONS
    if not path.is_file():
        raise SourceError(
            f"{ANNOTATIONS} not found in {folder}: write one JSON line per image pair, e.g. "
            '{"image": "a.jpg", "subject": "dog", "object": "cat", "relation": "left of", '
            '"subject_box": [x1, y1, x2, y2], "object_box": [x1, y1, x2, y2]}'
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise SourceError(f"cannot read {path} ({err}): save it as UTF-8 text") from err
    if not any(line.strip() for line in lines):  # was: "wrote 0 entries", exit 0
        raise SourceError(f"{path} is empty: write one JSON line per image pair, e.g. "
                          '{"image": "a.jpg", "subject": "dog", "object": "cat", "relation": '
                          '"left of", "subject_box": [x1, y1, x2, y2], "object_box": [x1, y1, '
                          'x2, y2]}')
    entries = []  # (line number, normalised entry)
    # A closed-vocabulary model (the toy) cannot tokenize other words: steer refuses them, so
    # their maps would teach the classifier nothing it can use.
    known = getattr(denoiser, "known_objects", None)
    for number, line in enumerate(lines, 1):
        if line.strip():
            entry = _folder_line(line, f"{path} line {number}", report)
            if entry is not None and known is not None and not {
                    entry["subject"], entry["object"]} <= set(known):
                report.dropped["object the model does not know"] += 1
                entry = None
            if entry is not None:
                entries.append((number, entry))
    return _folder_samples(folder, entries, per_relation("folder", options), options.seed,
                           report)


def _folder_samples(folder: Path, entries, counts, seed: int, report: SourceReport
                    ) -> Iterator[Sample]:
    def split_of(entry: dict) -> str:
        if entry["split"] is not None:
            return entry["split"]
        u = _unit(seed, "split", entry["image"])  # by image: its lines never straddle splits
        return "train" if u < 0.8 else "val" if u < 0.9 else "test"

    quota = _Quota(counts) if counts is not None else None
    if quota is not None:
        entries = sorted(entries, key=lambda ne: _unit(seed, "rank", ne[0], ne[1]["image"]))
    for number, e in entries:
        split = split_of(e)
        if quota is not None:
            if not quota.open(split, e["relation"]):
                continue
            quota.take(split, e["relation"])
        yield report.keep(
            Sample(
                "folder", f"folder:{number}:{e['image']}", e["subject"], e["object"],
                e["relation"], e["subject_box"], e["object_box"], split,
                image_path=str(folder / e["image"]),
            )
        )
    if quota is not None:
        quota.report_short(report)
