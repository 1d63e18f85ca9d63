"""Synthetic shape scenes and web-like captions: the training data and layouts of the toy world.

Captions mimic web alt-text, which names the objects in a picture but seldom says where they are:
only `relation_rate` (default 15%) of captions state one spatial relation, the rest just list the
objects. A model trained on such data learns what each word looks like far better than where the
words put things, so, like web-trained text-to-image models, it is weak at placing objects on
request. That weakness is what Learn-to-Steer has to fix, so the toy world must reproduce it.

Scenes are drawn with hard edges and pure colours on black (no anti-aliasing), so the colour
detector in `l2s.toy.detector` recovers every rendered box exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from l2s.relations import RELATIONS, geneval_relations


@dataclass(frozen=True)
class Category:
    name: str  # the shape word used in captions and prompts
    color: tuple[int, int, int]  # pure RGB colour the shape is painted in


# Saturated corners of the RGB cube: at least 255 apart from each other and from black, so the
# detector can classify pixels by nearest colour with a wide margin for imperfect generations.
CATEGORIES = (
    Category("circle", (255, 0, 0)),
    Category("square", (0, 0, 255)),
    Category("triangle", (0, 255, 0)),
    Category("diamond", (255, 255, 0)),
    Category("cross", (255, 0, 255)),
    Category("ring", (0, 255, 255)),
)
CATEGORY_NAMES = tuple(c.name for c in CATEGORIES)
WORLD_NAME = "toy"  # the name of the world these shapes make (l2s.toy.world.WORLD)
_BY_NAME = {c.name: c for c in CATEGORIES}

# How captions may phrase each GenEval relation (subject REL object).
CAPTION_PHRASES = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below",),
}

# Every token of captions and of benchmark/steering prompts ("a photo of a circle to the left of a
# square", "a ring on the top of a cross", "a cross next to a diamond", "a square on side of a
# ring"); the toy model's word-level tokenizer is built from it.
VOCABULARY = tuple(
    sorted(
        {",", "a", "an", "and", "the", "of", "to", "on", "photo"}
        | {"left", "right", "above", "below", "top", "bottom", "next", "near", "side"}
        | set(CATEGORY_NAMES)
    )
)

_GAP = 2  # min empty pixels between two boxes, so objects never touch nor merge in detection
_ATTEMPTS = 16  # layout attempts before shrinking (then dropping) objects


def category(name: str) -> Category:
    """The category called `name`; ValueError naming the known ones otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        known = ", ".join(CATEGORY_NAMES)
        raise ValueError(f"unknown toy category {name!r}: known shapes are {known}") from None


@dataclass(frozen=True)
class SceneObject:
    category: str  # a name from CATEGORY_NAMES
    # (x1, y1, x2, y2) pixels, x2/y2 EXCLUSIVE: the tight box of the painted pixels,
    # x1 = min column, x2 = max column + 1 (same for rows), so width = x2 - x1.
    box: tuple[int, int, int, int]


@dataclass(frozen=True, eq=False)  # eq=False: ndarray fields have no truth value
class Scene:
    image: np.ndarray  # (H, W, 3) uint8, shapes on black
    objects: tuple[SceneObject, ...]  # distinct categories

    def relations(self) -> list[tuple[str, str, str]]:
        """(subject, relation, object) for every ordered pair that GenEval's rule relates."""
        facts = []
        for a in self.objects:
            for b in self.objects:
                if a is b:
                    continue
                rels = geneval_relations(a.box, b.box)
                facts += [(a.category, r, b.category) for r in RELATIONS if r in rels]
        return facts


def side_range(size: int) -> tuple[int, int]:
    """Inclusive (min, max) bounding side of a random object in a size x size image."""
    # Anchors 7..11 px at 32 and 12..20 px at 64: five objects still fit with gaps, and each spans
    # several latent cells. Other sizes follow the straight line through the two anchors.
    if size < 16:
        raise ValueError(f"toy scenes need images of at least 16 px, got {size}")
    return int(7 + (size - 32) * 5 / 32 + 0.5), int(11 + (size - 32) * 9 / 32 + 0.5)


def _bar(length: int) -> int:
    """Cross bar thickness near length / 3 with the parity of length, so the bar is centred."""
    t = max(1, round(length / 3))
    if (length - t) % 2:
        t = t - 1 if t > 1 and abs(t - 1 - length / 3) <= abs(t + 1 - length / 3) else t + 1
    return t


@functools.cache
def _mask(name: str, width: int, height: int) -> np.ndarray:
    # Pixel (x, y) is painted when its centre lies inside the shape, in coordinates where the box
    # spans [-1, 1] on both axes.
    u = ((np.arange(width) + 0.5) * 2 / width - 1)[None, :]  # (1, W)
    v = ((np.arange(height) + 0.5) * 2 / height - 1)[:, None]  # (H, 1)
    if name == "circle":
        mask = u**2 + v**2 <= 1
    elif name == "square":
        mask = np.ones((height, width), bool)
    elif name == "triangle":  # apex up; a row is judged at its lower edge so the apex row is drawn
        mask = np.abs(u) <= (np.arange(1, height + 1) / height)[:, None] + 1e-9
    elif name == "diamond":
        mask = np.abs(u) + np.abs(v) <= 1 + 1e-9
    elif name == "cross":
        tw, th = _bar(width), _bar(height)
        mask = np.zeros((height, width), bool)
        mask[:, (width - tw) // 2 : (width - tw) // 2 + tw] = True
        mask[(height - th) // 2 : (height - th) // 2 + th, :] = True
    elif name == "ring":
        thick = max(2, int(min(width, height) / 8 + 0.5))  # ~1/4 of the radius, >= 2 px
        px = (np.arange(width) + 0.5 - width / 2)[None, :]
        py = (np.arange(height) + 0.5 - height / 2)[:, None]
        ax, ay = width / 2 - thick, height / 2 - thick
        hole = (px / ax) ** 2 + (py / ay) ** 2 < 1 if ax > 0 and ay > 0 else np.zeros((1, 1), bool)
        mask = (u**2 + v**2 <= 1) & ~hole
    else:
        category(name)  # raises with the list of known names
    mask = np.broadcast_to(mask, (height, width)).copy()
    mask.flags.writeable = False
    return mask


def shape_mask(name: str, width: int, height: int | None = None) -> np.ndarray:
    """Cached read-only (height, width) bool mask of shape `name` drawn to fill its box."""
    if width < 1 or (height is not None and height < 1):
        raise ValueError(f"shape boxes need positive sides, got {width} x {height}")
    return _mask(category(name).name, width, width if height is None else height)


@functools.cache
def _painted_extent(name: str, width: int, height: int) -> tuple[int, int, int, int]:
    """Tight (x1, y1, x2, y2) of shape_mask(name, width, height) inside its own box."""
    mask = shape_mask(name, width, height)
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _tight_box(name: str, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """The painted pixels' tight box when `name` is drawn into `box` (equal for square boxes)."""
    x1, y1, x2, y2 = box
    dx1, dy1, dx2, dy2 = _painted_extent(name, x2 - x1, y2 - y1)
    return x1 + dx1, y1 + dy1, x1 + dx2, y1 + dy2


def render_scene(objects: Sequence[SceneObject], size: int) -> np.ndarray:
    """(size, size, 3) uint8 image of each object's shape filling its box, on black."""
    image = np.zeros((size, size, 3), np.uint8)
    for obj in objects:
        x1, y1, x2, y2 = (int(v) for v in obj.box)
        if not (0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size):
            raise ValueError(f"box {obj.box} of the {obj.category} is not inside a {size} px image")
        colour = category(obj.category).color
        image[y1:y2, x1:x2][shape_mask(obj.category, x2 - x1, y2 - y1)] = colour
    return image


def layout_scene(specs: Sequence[tuple[str, tuple[int, int, int, int]]], size: int = 32) -> Scene:
    """Render the given (category, box) objects; stored boxes are re-measured from the pixels.

    Square boxes come back unchanged; a very elongated box may shrink by a pixel where the
    shape's tip falls between pixel centres. Later objects paint over earlier ones.
    """
    names = [category(name).name for name, _ in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"toy scenes name objects by shape, so categories must differ: {names}")
    boxes = [tuple(int(v) for v in box) for _, box in specs]
    image = render_scene([SceneObject(n, b) for n, b in zip(names, boxes, strict=True)], size)
    objects = tuple(SceneObject(n, _tight_box(n, b)) for n, b in zip(names, boxes, strict=True))
    return Scene(image, objects)


def _place(rng: np.random.Generator, sides: list[int], size: int) -> list | None:
    """Boxes for squares of the given sides, each `_GAP` apart, placed one by one (largest first,
    which rarely gets stuck) uniformly among the spots left free; None when one finds no room."""
    picks = rng.random(len(sides)).tolist()  # one draw per layout keeps sampling cheap
    boxes: list = [None] * len(sides)
    for i in sorted(range(len(sides)), key=lambda i: -sides[i]):
        side = sides[i]
        free = np.ones((size - side + 1, size - side + 1), bool)  # (y, x) of the top-left corner
        for box in boxes:  # corners that would come closer than _GAP to a placed box
            if box is not None:
                x1, y1, x2, y2 = box
                free[
                    max(0, y1 - side - _GAP + 1) : y2 + _GAP,
                    max(0, x1 - side - _GAP + 1) : x2 + _GAP,
                ] = False
        spots = np.flatnonzero(free)
        if spots.size == 0:
            return None
        y, x = divmod(int(spots[int(picks[i] * spots.size)]), size - side + 1)
        boxes[i] = (x, y, x + side, y + side)
    return boxes


def random_scene(
    rng: np.random.Generator,
    size: int = 32,
    n_objects: int | None = None,
    categories: Sequence[str] | None = None,
) -> Scene:
    """A scene of distinct shapes, fully inside the image and at least 2 px apart.

    `n_objects` defaults to uniform in 2..5; `categories` fixes exactly which shapes appear.
    When objects do not fit, sides shrink, then (only for a random count) objects are dropped.
    """
    lo, hi = side_range(size)
    if categories is not None:
        names = [category(c).name for c in categories]
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"categories must be distinct and non-empty, got {list(categories)}")
        if n_objects is not None and n_objects != len(names):
            raise ValueError(f"n_objects={n_objects} but {len(names)} categories were given")
    else:
        n = int(rng.integers(2, 6)) if n_objects is None else n_objects
        if not 1 <= n <= len(CATEGORIES):
            raise ValueError(f"n_objects must be in 1..{len(CATEGORIES)}, got {n}")
        names = [CATEGORY_NAMES[i] for i in rng.permutation(len(CATEGORIES))[:n]]
    sides = rng.integers(lo, hi + 1, size=len(names)).tolist()
    may_drop = categories is None and n_objects is None
    while True:  # ends: every round shrinks a side or drops an object, else raises
        for _ in range(_ATTEMPTS):
            boxes = _place(rng, sides, size)
            if boxes is not None:
                return layout_scene(list(zip(names, boxes, strict=True)), size)
        if max(sides) > lo:
            sides = [max(lo, s - 1) for s in sides]
        elif may_drop and len(names) > 2:
            names, sides = names[:-1], sides[:-1]
        else:
            raise ValueError(f"could not fit {names} with {_GAP} px gaps into {size} px")


def _join(parts: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene, rng: np.random.Generator, relation_rate: float = 0.15) -> str:
    """A web-like caption: with probability `relation_rate` one TRUE relation, else a list.

    "a circle, a square and a ring" or "a circle to the left of a square and a ring". A relation
    is drawn from scene.relations(); scenes without any related pair fall back to a list.
    """
    names = [o.category for o in scene.objects]
    if not names:
        raise ValueError("cannot caption a scene without objects")
    if rng.random() < relation_rate:
        facts = scene.relations()
        if facts:
            subject, relation, obj = facts[int(rng.integers(len(facts)))]
            phrases = CAPTION_PHRASES[relation]
            phrase = phrases[int(rng.integers(len(phrases)))]
            rest = [n for n in names if n not in (subject, obj)]
            rest = [rest[i] for i in rng.permutation(len(rest))]
            return _join([f"a {subject} {phrase} a {obj}"] + [f"a {n}" for n in rest])
    return _join([f"a {names[i]}" for i in rng.permutation(len(names))])


def scene_batch(
    rng: np.random.Generator, n: int, size: int = 32, relation_rate: float = 0.15
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """n random scenes with captions: images (n, size, size, 3) uint8, captions, scenes."""
    scenes, captions = [], []
    for _ in range(n):
        scene = random_scene(rng, size)
        scenes.append(scene)
        captions.append(caption(scene, rng, relation_rate))
    images = (
        np.stack([s.image for s in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)
    )
    return images, captions, scenes
