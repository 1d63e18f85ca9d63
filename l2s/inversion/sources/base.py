"""Data-source plumbing: Sample, options, reports, quotas, and the source registry.

The sources themselves (and the format each reads) are described in ``l2s.inversion.sources``'s
docstring; each lives in its own module: ``gqa`` and ``folder`` here; a family's world
registers its own (``register_source``), and other packages list theirs under the
``l2s.sources`` entry-point group.
"""

from __future__ import annotations

import hashlib
import importlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from l2s.engine.registry import Registry
from l2s.errors import L2SError
from l2s.relations import RELATIONS

SPLITS = ("train", "val", "test")


class SourceError(L2SError, ValueError):
    """A data source cannot be read as asked; the message says what was wrong and what to do."""


@dataclass(frozen=True)
class Sample:
    """One image with a subject, an object and the true relation between them."""

    source: str  # the registered source's name, e.g. "gqa"
    source_id: str  # stable and unique within the source, e.g. "gqa:2354786:1232-1233"
    subject: str
    object: str
    relation: str  # the TRUE relation of subject to object, one of RELATIONS
    subject_box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the image
    object_box: tuple[float, float, float, float]
    split: str  # "train" | "val" | "test"
    image_path: str | None = None  # file read lazily by load_image, or
    image_array: np.ndarray | None = field(default=None, compare=False, repr=False)  # (H, W, 3)

    def __post_init__(self) -> None:
        if self.relation not in RELATIONS:
            raise ValueError(f"sample relation {self.relation!r} is not one of {RELATIONS}")
        if self.split not in SPLITS:
            raise ValueError(f"sample split {self.split!r} is not one of {SPLITS}")
        if (self.image_path is None) == (self.image_array is None):
            raise ValueError("a sample needs exactly one of image_path and image_array")

    def load_image(self) -> np.ndarray:
        """The image as (H, W, 3) uint8 RGB; SourceError naming the file when it is unreadable."""
        if self.image_array is not None:
            return self.image_array
        from PIL import Image

        if not Path(self.image_path).is_file():  # a FIFO or device would block or never end
            raise SourceError(
                f"cannot read image {self.image_path} of sample {self.source_id} (missing, or "
                "not a regular file): replace it with a JPEG or PNG, or remove the sample")
        try:
            with Image.open(self.image_path) as image:
                if image.mode == "I" or image.mode.startswith("I;16"):
                    # 16-bit grey: PIL's convert("RGB") clips at 255 (a white image); scale
                    gray = np.asarray(image, dtype=np.float64) / 257.0
                    array = np.repeat(gray.clip(0, 255).round().astype(np.uint8)[..., None],
                                      3, axis=-1)
                else:
                    array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise SourceError(
                f"cannot read image {self.image_path} of sample {self.source_id} ({err}): "
                "replace the file with a readable JPEG or PNG, or remove the sample"
            ) from err
        # Boxes a user wrote (the folder source) must lie in the image; a dataset's are taken
        # as published.
        height, width = array.shape[:2]
        for name, box in (("subject_box", self.subject_box), ("object_box", self.object_box)):
            if self.source == "folder" and (box[2] > width or box[3] > height):
                raise SourceError(
                    f"{name} {list(box)} of sample {self.source_id} lies outside its image "
                    f"{self.image_path} ({width}x{height} pixels): fix the box in pixels of "
                    "that image, or remove the sample")
        return array


@dataclass
class SourceReport:
    """What one source kept, dropped and why; quality drops only, not samples over quota."""

    kept: Counter = field(default_factory=Counter)  # "split/relation" -> samples yielded
    dropped: Counter = field(default_factory=Counter)  # reason -> candidates dropped
    short: Counter = field(default_factory=Counter)  # "split/relation" -> quota left unfilled

    def keep(self, s: Sample) -> Sample:
        self.kept[f"{s.split}/{s.relation}"] += 1
        return s

    def to_dict(self) -> dict:
        return {
            "kept": dict(sorted(self.kept.items())),
            "kept_total": sum(self.kept.values()),
            "dropped": dict(sorted(self.dropped.items())),
            "short": dict(sorted(self.short.items())),
        }


@dataclass(frozen=True)
class SourceOptions:
    """Where each source reads from and how many samples it yields."""

    gqa_root: str | None = None  # gqa: folder with images/ and {train,val}_sceneGraphs.json
    folder: str | None = None  # folder: folder with annotations.jsonl and its images
    # Samples per relation for (train, val, test); None: the source's default (Source.per_relation).
    per_relation: tuple[int, int, int] | None = None
    seed: int = 0  # fixes every choice and the order; same seed, same samples
    shapes_size: int = 32  # shapes: image side in pixels (match the model's image size)
    # generated: preset whose steps/guidance are the defaults (None: the generating model's)
    generated_model: str | None = None
    generated_steps: int | None = None  # generated: sampling steps (None: the preset's)
    generated_guidance: float | None = None  # generated: CFG scale (None: the preset's)
    generated_candidates: int = 8000  # generated: most images generated per relation
    generated_batch: int = 64  # generated: images per sampling batch

    def __post_init__(self) -> None:
        if self.per_relation is not None:
            counts = tuple(self.per_relation)  # YAML gives lists
            if len(counts) != 3 or not all(isinstance(c, int) and c >= 0 for c in counts):
                raise SourceError(
                    f"per_relation must be three counts (train, val, test) >= 0, got "
                    f"{self.per_relation!r}"
                )
            object.__setattr__(self, "per_relation", tuple(int(c) for c in counts))
        if self.generated_batch < 1 or self.generated_candidates < 0:
            raise SourceError("generated_batch must be >= 1 and generated_candidates >= 0")


@dataclass(frozen=True)
class Source:
    """A registered data source: its samples, and how many it yields by default."""

    name: str  # what --data names
    # (options, report, denoiser or None) -> samples in seeded order; SourceError before the
    # first one when an input is missing
    samples: Callable[[SourceOptions, SourceReport, object], Iterator[Sample]]
    # (train, val, test) samples per relation when options.per_relation is None; None: no cap
    per_relation: tuple[int, int, int] | None = None


SOURCE_REGISTRY: Registry[Source] = Registry("data source", "l2s.sources")


def register_source(source: Source) -> None:
    """Make a data source known to `l2s invert --data` (a module calls this at import)."""
    SOURCE_REGISTRY.register(source.name, source)


def sources() -> tuple[str, ...]:
    """Every registered source's name."""
    return SOURCE_REGISTRY.names()


def _in_module(module: str, function: str) -> Callable:
    """A source function imported on first call (its module imports this one)."""
    def samples(options, report, denoiser=None):
        return getattr(importlib.import_module(module), function)(options, report, denoiser)
    return samples


# gqa: method.md's real-image counts for SD (Flux used 2000/400/200); folder: every line.
register_source(Source("gqa", _in_module("l2s.inversion.sources.gqa", "gqa_source"),
                       (800, 200, 100)))
register_source(Source("folder", _in_module("l2s.inversion.sources.folder", "folder_source")))


def __getattr__(name: str):
    if name == "SOURCES":  # the names, once every source has registered
        return sources()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _source(name: str) -> Source:
    found = SOURCE_REGISTRY.get(name)
    if found is None:
        raise SourceError(f"unknown data source {name!r}: use one of {', '.join(sources())}")
    return found


def per_relation(source: str, options: SourceOptions) -> tuple[int, int, int] | None:
    """(train, val, test) samples per relation for `source`; None: no cap (folder default)."""
    if options.per_relation is not None:
        return options.per_relation
    return _source(source).per_relation


def expected_samples(source: str, options: SourceOptions, limit: int | None = None
                     ) -> int | None:
    """At most how many samples `source` yields (None: unknown until read, e.g. folder)."""
    counts = per_relation(source, options)
    n = None if counts is None else sum(counts) * len(RELATIONS)
    if limit is not None:
        n = limit if n is None else min(n, limit)
    return n


def iter_samples(
    source: str, options: SourceOptions, report: SourceReport, denoiser=None
) -> Iterator[Sample]:
    """The samples of `source` in seeded order; counts go to `report` as they happen.

    Missing inputs raise SourceError here, before the first sample. `denoiser` is the model
    of a source that generates its images (a world's "generated"); the folder source drops
    objects a closed-vocabulary denoiser does not know; the others ignore it.
    """
    return _source(source).samples(options, report, denoiser)


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _unit(*parts: object) -> float:
    """A stable uniform number in [0, 1) from the parts (Python's hash() is salted per run)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _normalise(name: str) -> str:
    return " ".join(str(name).lower().split())


def _strongest(relations: set[str], box_a: Sequence[float], box_b: Sequence[float]) -> str:
    """The one relation of `relations` along the axis where the centres lie farther apart."""
    dx = abs((box_a[0] + box_a[2]) - (box_b[0] + box_b[2]))
    dy = abs((box_a[1] + box_a[3]) - (box_b[1] + box_b[3]))
    held = [r for r in RELATIONS if r in relations]
    return max(held, key=lambda r: dx if r in ("left of", "right of") else dy)


class _Quota:
    """Remaining (split, relation) quotas; `split_for` picks the least-full open split."""

    def __init__(self, counts: tuple[int, int, int]):
        self.target = dict(zip(SPLITS, counts, strict=True))
        self.filled = Counter()

    def open(self, split: str, relation: str) -> bool:
        return self.filled[split, relation] < self.target[split]

    def split_for(self, relation: str) -> str | None:
        open_splits = [s for s in SPLITS if self.open(s, relation)]
        if not open_splits:
            return None
        return min(open_splits, key=lambda s: self.filled[s, relation] / self.target[s])

    def relation_open(self, relation: str) -> bool:
        return any(self.open(s, relation) for s in SPLITS)

    def done(self) -> bool:
        return not any(self.relation_open(r) for r in RELATIONS)

    def take(self, split: str, relation: str) -> None:
        self.filled[split, relation] += 1

    def report_short(self, report: SourceReport, splits: Sequence[str] = SPLITS) -> None:
        for split in splits:
            for relation in RELATIONS:
                missing = self.target[split] - self.filled[split, relation]
                if missing > 0:
                    report.short[f"{split}/{relation}"] += missing
