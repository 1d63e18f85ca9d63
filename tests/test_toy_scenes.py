"""Toy scenes: layout invariants, exact boxes, reproducibility and the caption policy."""

import itertools
import re
from collections import deque

import numpy as np
import pytest

from l2s.relations import Triplet, format_prompt, geneval_relations
from l2s.toy.scenes import (
    CAPTION_PHRASES,
    CATEGORIES,
    CATEGORY_NAMES,
    VOCABULARY,
    Scene,
    caption,
    category,
    layout_scene,
    random_scene,
    scene_batch,
    shape_mask,
    side_range,
)

_PHRASE_TO_RELATION = {p: r for r, ps in CAPTION_PHRASES.items() for p in ps}


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+|,", text)


def _parse_caption(text: str) -> tuple[tuple[str, str, str] | None, list[str]]:
    """(stated relation or None, every shape named in order)."""
    parts = re.split(r", | and ", text)
    names = []
    for part in parts:
        assert part.startswith("a "), text
        names += [w for w in part.split() if w in CATEGORY_NAMES]
    words = parts[0].split()
    if len(words) == 2:
        return None, names
    assert words[-2] == "a", text
    phrase = " ".join(words[2:-2])
    return (words[1], _PHRASE_TO_RELATION[phrase], words[-1]), names


def _tight(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _separation(a, b) -> int:
    """Empty pixels between two exclusive boxes along the axis that separates them most."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _four_connected(mask: np.ndarray) -> bool:
    start = tuple(np.argwhere(mask)[0])
    seen, todo = {start}, deque([start])
    while todo:
        y, x = todo.popleft()
        for n in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            inside = 0 <= n[0] < mask.shape[0] and 0 <= n[1] < mask.shape[1]
            if inside and mask[n] and n not in seen:
                seen.add(n)
                todo.append(n)
    return len(seen) == int(mask.sum())


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(0)
    return [random_scene(rng, size) for size in (32, 64) for _ in range(150)]


def test_categories():
    assert CATEGORY_NAMES == ("circle", "square", "triangle", "diamond", "cross", "ring")
    colours = [c.color for c in CATEGORIES]
    assert len(set(colours)) == 6 and (0, 0, 0) not in colours
    assert category("ring").color == (0, 255, 255)
    with pytest.raises(ValueError, match="circle, square"):
        category("dog")


def test_side_range_anchors():
    assert side_range(32) == (7, 11)
    assert side_range(64) == (12, 20)
    with pytest.raises(ValueError):
        side_range(8)


@pytest.mark.parametrize("name", CATEGORY_NAMES)
def test_shape_masks_fill_their_box_and_are_one_piece(name):
    for side in range(5, 41):
        mask = shape_mask(name, side)
        assert mask.shape == (side, side) and mask.dtype == bool
        assert _tight(mask) == (0, 0, side, side), side
        assert _four_connected(mask), side
    assert not shape_mask(name, 9).flags.writeable


def test_fill_fractions_differ_by_shape():
    fill = {name: shape_mask(name, 20).mean() for name in CATEGORY_NAMES}
    assert fill["square"] == 1.0
    assert 0.74 < fill["circle"] < 0.83
    assert 0.45 < fill["triangle"] < 0.6 and 0.45 < fill["diamond"] < 0.6
    assert fill["ring"] < fill["circle"] - 0.2


def test_same_seed_same_scenes():
    a = scene_batch(np.random.default_rng(7), 20)
    b = scene_batch(np.random.default_rng(7), 20)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1]
    assert [s.objects for s in a[2]] == [s.objects for s in b[2]]
    c = scene_batch(np.random.default_rng(8), 20)
    assert not np.array_equal(a[0], c[0])


def test_layout_invariants(scenes):
    counts = set()
    for scene in scenes:
        size = scene.image.shape[0]
        lo, hi = side_range(size)
        names = [o.category for o in scene.objects]
        counts.add(len(names))
        assert 2 <= len(names) <= 5 and len(set(names)) == len(names)
        for obj in scene.objects:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= size and 0 <= y1 < y2 <= size
            assert lo <= x2 - x1 <= hi and x2 - x1 == y2 - y1
        for a, b in itertools.combinations(scene.objects, 2):
            assert _separation(a.box, b.box) >= 2
    assert counts == {2, 3, 4, 5}


def test_boxes_are_tight_boxes_of_each_object_alone(scenes):
    for scene in scenes:
        size = scene.image.shape[0]
        union = np.zeros(scene.image.shape[:2], bool)
        for obj in scene.objects:
            alone = layout_scene([(obj.category, obj.box)], size)
            painted = alone.image.any(-1)
            assert _tight(painted) == obj.box
            assert np.array_equal(scene.image[painted], alone.image[painted])
            assert (scene.image[painted] == category(obj.category).color).all()
            union |= painted
        assert np.array_equal(scene.image.any(-1), union)  # nothing else painted


def test_relations_follow_geneval(scenes):
    for scene in scenes[:50]:
        expected = {
            (a.category, r, b.category)
            for a, b in itertools.permutations(scene.objects, 2)
            for r in geneval_relations(a.box, b.box)
        }
        facts = scene.relations()
        assert set(facts) == expected and len(facts) == len(expected)


def test_requested_categories_and_counts():
    rng = np.random.default_rng(1)
    for _ in range(20):
        scene = random_scene(rng, categories=("circle", "square"))
        assert [o.category for o in scene.objects] == ["circle", "square"]
    for n in (1, 5, 6):
        assert len(random_scene(rng, n_objects=n).objects) == n
    with pytest.raises(ValueError, match="distinct"):
        random_scene(rng, categories=("ring", "ring"))
    with pytest.raises(ValueError, match="known shapes"):
        random_scene(rng, categories=("ring", "dog"))
    with pytest.raises(ValueError):
        random_scene(rng, n_objects=7)


def test_layout_scene_keeps_square_boxes():
    scene = layout_scene([("ring", (2, 3, 12, 13)), ("cross", (20, 18, 29, 27))], 32)
    assert [o.box for o in scene.objects] == [(2, 3, 12, 13), (20, 18, 29, 27)]
    assert scene.relations() == [
        ("ring", "left of", "cross"),
        ("ring", "above", "cross"),
        ("cross", "right of", "ring"),
        ("cross", "below", "ring"),
    ]
    with pytest.raises(ValueError, match="not inside"):
        layout_scene([("ring", (25, 3, 35, 13))], 32)


def test_caption_policy():
    rng = np.random.default_rng(2)
    stated = 0
    n = 2000
    for _ in range(n):
        scene = random_scene(rng)
        text = caption(scene, rng)
        assert set(_tokens(text)) <= set(VOCABULARY), text
        relation, names = _parse_caption(text)
        assert sorted(names) == sorted(o.category for o in scene.objects), text
        if relation is not None:
            stated += 1
            assert relation in scene.relations(), (text, scene.objects)
    assert abs(stated / n - 0.15) <= 0.03


def test_caption_forms():
    scene = layout_scene(
        [("circle", (2, 2, 10, 10)), ("square", (20, 2, 28, 10)), ("ring", (2, 20, 10, 28))], 32
    )
    texts = {caption(scene, np.random.default_rng(s), relation_rate=1.0) for s in range(200)}
    assert "a circle left of a square and a ring" in texts
    assert "a square to the right of a circle and a ring" in texts
    lists = {caption(scene, np.random.default_rng(s), relation_rate=0.0) for s in range(50)}
    assert "a circle, a square and a ring" in lists and len(lists) == 6
    pair = layout_scene([("circle", (2, 2, 10, 10)), ("square", (20, 2, 28, 10))], 32)
    assert caption(pair, np.random.default_rng(0), 0.0) in (
        "a circle and a square",
        "a square and a circle",
    )


def test_vocabulary_covers_prompts():
    vocab = set(VOCABULARY)
    assert list(VOCABULARY) == sorted(vocab)
    assert {"photo", "on", "top", "bottom", "next", "an", ","} <= vocab
    for a, b in itertools.permutations(CATEGORY_NAMES, 2):
        for relation in ("left of", "right of", "above", "below", "next to"):
            for style in ("geneval", "compbench", "plain"):
                prompt = format_prompt([Triplet(a, relation, b)], style)
                assert set(_tokens(prompt)) <= vocab, prompt
    assert set(_tokens("a circle on side of a square")) <= vocab


def test_scene_batch_shapes():
    images, captions, scenes = scene_batch(np.random.default_rng(3), 8, size=64)
    assert images.shape == (8, 64, 64, 3) and images.dtype == np.uint8
    assert len(captions) == len(scenes) == 8 and all(isinstance(c, str) for c in captions)
    assert np.array_equal(images[5], scenes[5].image)
    empty = scene_batch(np.random.default_rng(3), 0)
    assert empty[0].shape == (0, 32, 32, 3) and empty[1] == [] and empty[2] == []
