"""The toy world's detector: finds each shape by its colour and scores how shape-like it looks.

Each pixel takes the nearest of the six category colours or black, and counts as background
when it is black or farther than MAX_COLOR_DISTANCE from every colour; per category, the largest
4-connected component of at least `min_area` pixels is the detection, its box the tight box.

Failure modes, by design of the toy world (scenes hold each category at most once):
- two objects of the same colour: only the larger component is returned;
- same-colour pieces that touch merge into one blob, so its box spans both (`oversized` flags a
  blob bigger than any single object a scene draws);
- differently coloured objects that touch stay separate detections (`objects_touch` flags them);
  GenEval-style relations between them are still computed, but the image is not a clean layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from l2s.toy.scenes import CATEGORIES, CATEGORY_NAMES, category, shape_mask, side_range

if TYPE_CHECKING:
    from l2s.relations import Triplet

# RGB distance within which a pixel takes a category's colour. Category colours are corners of
# the RGB cube, >= 255 apart, so 120 leaves each a wide ball (a red of (180, 40, 30) is 90 away)
# while dull greys stay background ((128, 128, 128) is >= 220 from every colour) and uniform RGB
# noise lands in one ball only ~5% of the time, too sparse to form large components.
MAX_COLOR_DISTANCE = 120.0
# Smallest component kept, at 32 x 32 px; scaled with the image area. The smallest object a
# 32 px scene draws (a 7 px cross) covers 24 px, so 12 keeps objects that lost half their pixels
# in a poor generation, yet sits far above the largest same-colour blob uniform RGB noise makes
# (7 px over 2000 noise images of 32 px; tests/test_detector.py checks noise gives nothing).
MIN_AREA_32 = 12
_FILL_TOLERANCE = 0.2  # fill-fraction error that costs a factor e in confidence

_PALETTE = np.array([c.color for c in CATEGORIES] + [(0, 0, 0)], np.float32)  # (7, 3), black last


@dataclass(frozen=True)
class Detection:
    category: str  # a name from CATEGORY_NAMES
    box: tuple[int, int, int, int]  # (x1, y1, x2, y2) pixels, x2/y2 exclusive, tight
    confidence: float  # in (0, 1]: colour purity x shape match, see detect()
    area: int  # pixels in the component


def default_min_area(height: int, width: int) -> int:
    """MIN_AREA_32 scaled from 32 x 32 to the image's area."""
    return max(4, round(MIN_AREA_32 * height * width / (32 * 32)))


def _as_rgb255(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"detect() needs an (H, W, 3) RGB image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.floating):
        return np.clip(image, 0.0, 1.0).astype(np.float32) * 255
    raise TypeError(f"detect() needs uint8 in [0, 255] or floats in [0, 1], got {image.dtype}")


def _classify(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: category index or -1 for background (H, W), and distance to that colour."""
    dist = np.sqrt(((rgb[:, :, None, :] - _PALETTE) ** 2).sum(-1))  # (H, W, 7)
    nearest = dist.argmin(-1)  # (H, W)
    best = np.take_along_axis(dist, nearest[..., None], -1)[..., 0]  # (H, W)
    background = (nearest == len(CATEGORIES)) | (best > MAX_COLOR_DISTANCE)
    return np.where(background, -1, nearest), best


def _components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative class: (H, W) labels, -1 on background.

    A label is the smallest flat index in its component: labels spread to the minimum over
    same-class neighbours, with pointer jumping (a label is itself a pixel index, whose own label
    is no larger), until nothing changes. Pure numpy: the toy world needs nothing beyond it
    (scipy is a dependency only for Mask2Former).
    """
    h, w = classes.shape
    big = h * w
    fg = classes >= 0
    labels = np.where(fg, np.arange(big).reshape(h, w), big)
    padded_cls = np.pad(classes, 1, constant_values=-1)
    # 4-neighbours: every rendered shape is 4-connected, while diagonal links let sparse noise
    # chain into blobs ~1.5x larger (largest over 2000 uniform-noise 32 px images: 7 px vs 10).
    shifts = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    same = [  # (H, W) each: the neighbour at (dy, dx) has this pixel's class
        fg & (padded_cls[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] == classes) for dy, dx in shifts
    ]
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        new = labels
        for (dy, dx), ok in zip(shifts, same, strict=True):
            new = np.minimum(
                new, np.where(ok, padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w], big)
            )
        flat = np.append(new.ravel(), big)  # index `big` maps to itself
        new = np.where(fg, flat[new], big)  # pointer jumping
        if np.array_equal(new, labels):
            return np.where(fg, labels, -1)
        labels = new


def _shape_score(name: str, mask: np.ndarray) -> float:
    """How well a component (its tight-box crop, (h, w) bool) fits shape `name`, in (0, 1]."""
    h, w = mask.shape
    expected = shape_mask(name, max(h, w)).mean()  # every shape fills a square box
    aspect = min(h, w) / max(h, w)
    return aspect * float(np.exp(-abs(mask.mean() - expected) / _FILL_TOLERANCE))


def detect(
    image: np.ndarray, categories: Sequence[str] | None = None, min_area: int | None = None
) -> dict[str, Detection]:
    """Detect each category's largest colour component in an (H, W, 3) image.

    `image` is uint8 in [0, 255] or float in [0, 1]; `categories` limits the search (default all);
    `min_area` defaults to default_min_area(H, W). Confidence = purity x shape, where purity =
    1 - mean colour distance / (2 * MAX_COLOR_DISTANCE), in (0.5, 1], and shape = aspect ratio of
    the box x exp(-|fill - expected fill| / 0.2), the fill being the component's share of its box
    and the expected fill that of the category's shape drawn at the box's side.
    """
    rgb = _as_rgb255(image)  # (H, W, 3) float32
    h, w = rgb.shape[:2]
    names = CATEGORY_NAMES if categories is None else tuple(category(c).name for c in categories)
    min_area = default_min_area(h, w) if min_area is None else min_area
    classes, distance = _classify(rgb)
    labels = _components(classes)
    found, counts = np.unique(labels[labels >= 0], return_counts=True)
    detections = {}
    for name in names:
        index = CATEGORY_NAMES.index(name)
        mine = classes.ravel()[found] == index  # the label is a pixel of its own component
        if not mine.any():
            continue
        # Largest component; ties go to the first in raster order (np.unique sorts labels).
        label, area = found[mine][counts[mine].argmax()], int(counts[mine].max())
        if area < min_area:
            continue
        component = labels == label
        rows, cols = np.flatnonzero(component.any(1)), np.flatnonzero(component.any(0))
        y1, y2, x1, x2 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        purity = 1.0 - float(distance[component].mean()) / (2 * MAX_COLOR_DISTANCE)
        confidence = purity * _shape_score(name, component[y1:y2, x1:x2])
        detections[name] = Detection(name, (x1, y1, x2, y2), confidence, area)
    return detections


def objects_touch(a: Detection, b: Detection, margin: int = 1) -> bool:
    """Whether two boxes overlap or lie within `margin` empty pixels of each other.

    Scenes keep at least 2 empty pixels between objects, so anything closer than the training
    data ever shows (default margin 1) counts as touching: a fused pair, not a clean layout.
    """
    ax1, ay1, ax2, ay2 = a.box
    bx1, by1, bx2, by2 = b.box
    gap_x = max(bx1 - ax2, ax1 - bx2)  # empty columns between the boxes; < 0 when they overlap
    gap_y = max(by1 - ay2, ay1 - by2)
    return gap_x <= margin and gap_y <= margin


def oversized(detection: Detection, size: int) -> bool:
    """Whether a detection is larger than any single object a size-px scene draws: likely a
    merged blob of same-colour pieces (or a colour flood), not one object."""
    x1, y1, x2, y2 = detection.box
    return max(x2 - x1, y2 - y1) > side_range(size)[1] + 1


@dataclass(frozen=True)
class PairScore:
    """A toy image scored against "a SUBJECT REL an OBJECT" (GenEval's position rule)."""

    found: dict[str, Detection]  # category -> best detection, of the two asked for
    both_present: bool  # both objects detected
    correct: bool  # both present and the relation holds for their boxes
    fused: bool  # both present but touching or oversized (one blob: a chimera)


def score_pair(image: np.ndarray, subject: str, relation: str, obj: str) -> PairScore:
    """Detect the two objects and apply GenEval's rule; the one scorer of the toy world
    (benchmark, generated-source verification, toy-model evaluation). Missing = wrong."""
    from l2s.relations import geneval_relations

    found = detect(image, categories=[subject, obj])
    a, b = found.get(subject), found.get(obj)
    both = a is not None and b is not None
    correct = both and relation in geneval_relations(a.box, b.box)
    size = max(image.shape[:2])
    fused = both and (objects_touch(a, b) or oversized(a, size) or oversized(b, size))
    return PairScore(found, both, bool(correct), bool(fused))


def draws_toy_world(known_objects: Sequence[str] | None) -> bool:
    """Whether a backbone that knows these objects (``Denoiser.known_objects``) draws the toy
    world, so that its detector can judge the images."""
    return known_objects is not None and set(known_objects) <= set(CATEGORY_NAMES)


def relations_hold(images: np.ndarray, triplets: Sequence[Sequence[Triplet]]) -> list[bool]:
    """Per image (N, H, W, 3) uint8: whether every one of its triplets holds (score_pair); the
    toy world's verdict for steer's 'achieved' and --verify."""
    return [all(score_pair(img, t.subject, t.relation, t.object).correct for t in ts)
            for img, ts in zip(images, triplets, strict=True)]
