"""GenEval's decision rules (l2s.bench.geneval.score) on hand-made detections, task by task."""

import json
from pathlib import Path

import numpy as np
import pytest

from l2s.bench.geneval import Detection, GenevalScore, Rules, kept, position_metadata, score
from l2s.relations import Triplet, geneval_relations

D = Detection
META = [json.loads(x) for x in
        (Path(__file__).parents[1] / "l2s/data/geneval/evaluation_metadata.jsonl")
        .read_text().splitlines()]


def _first(tag):
    return next(m for m in META if m["tag"] == tag)


def test_single_object():
    meta = _first("single_object")  # a bench
    assert score(meta, [D("bench", (0, 0, 10, 10), 0.5)]) == GenevalScore(True, "")
    # GenEval keeps scores strictly above 0.3.
    verdict = score(meta, [D("bench", (0, 0, 10, 10), 0.3), D("cow", (0, 0, 9, 9), 0.99)])
    assert verdict == GenevalScore(False, "expected bench>=1, found 0")


def test_two_objects_need_both():
    meta = _first("two_object")  # a bench and a sports ball
    assert score(meta, [D("bench", (0, 0, 5, 5), 0.8), D("sports ball", (6, 6, 9, 9), 0.4)]).correct
    verdict = score(meta, [D("bench", (0, 0, 5, 5), 0.8)])
    assert not verdict.correct and verdict.reason == "expected sports ball>=1, found 0"


def test_counting_uses_the_high_threshold_and_the_exclusion():
    meta = _first("counting")  # two clocks: include clock >= 2, exclude clock >= 3
    two = [D("clock", (0, 0, 5, 5), 0.95), D("clock", (10, 0, 15, 5), 0.91)]
    assert score(meta, two).correct
    # 0.85 counts for every other task but not for counting.
    assert score(meta, two[:1] + [D("clock", (10, 0, 15, 5), 0.85)]).reason == \
        "expected clock>=2, found 1"
    three = two + [D("clock", (20, 0, 25, 5), 0.92)]
    assert score(meta, three) == GenevalScore(False, "expected clock<3, found 3")
    # A third clock under the counting threshold is not seen by the exclusion either.
    assert score(meta, two + [D("clock", (20, 0, 25, 5), 0.5)]).correct


def test_at_most_16_objects_per_class_most_confident_first():
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 16}],
            "exclude": [{"class": "cup", "count": 17}], "prompt": "sixteen cups"}
    many = [D("cup", (i, 0, i + 1, 1), 0.95 + i * 1e-3) for i in range(20)]
    assert score(meta, many).correct  # 20 detected, 16 kept: the exclusion never fires
    by_class = kept(meta, many)
    assert [d.score for d in by_class["cup"]] == sorted((d.score for d in many), reverse=True)[:16]


def test_exclusions_combine_with_or():
    meta = {"tag": "counting", "include": [{"class": "cat", "count": 1}],
            "exclude": [{"class": "dog", "count": 1}, {"class": "cat", "count": 2}], "prompt": ""}
    cat = D("cat", (0, 0, 4, 4), 0.95)
    assert score(meta, [cat]).correct
    assert score(meta, [cat, D("dog", (5, 5, 9, 9), 0.95)]).reason == "expected dog<1, found 1"
    assert not score(meta, [cat, D("cat", (5, 5, 9, 9), 0.95)]).correct


def test_colour_checks_the_count_most_confident_objects():
    meta = _first("colors")  # a blue fire hydrant
    blue = D("fire hydrant", (0, 0, 5, 5), 0.9, "blue")
    assert score(meta, [blue]).correct
    red = D("fire hydrant", (0, 0, 5, 5), 0.95, "red")
    verdict = score(meta, [red, blue])  # only the most confident one is looked at
    assert verdict == GenevalScore(False, "expected blue fire hydrant>=1, found 0 blue; and 1 red")
    with pytest.raises(ValueError, match="need a colour"):
        score(meta, [D("fire hydrant", (0, 0, 5, 5), 0.9)])


def test_colour_with_counts():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "pink"}],
            "prompt": "two pink cars"}
    pink = [D("car", (0, 0, 4, 4), 0.9, "pink"), D("car", (5, 0, 9, 4), 0.8, "pink")]
    assert score(meta, pink).correct
    verdict = score(meta, [pink[0], D("car", (5, 0, 9, 4), 0.8, "white")])
    assert verdict.reason == "expected pink car>=2, found 1 pink; and 1 pink, 1 white"


def test_colour_attribution_needs_both_colours():
    meta = _first("color_attr")  # a purple wine glass and a black apple
    glass, apple = D("wine glass", (0, 0, 5, 5), 0.9, "purple"), D("apple", (6, 6, 9, 9), 0.9)
    assert score(meta, [glass, Detection("apple", apple.box, 0.9, "black")]).correct
    assert not score(meta, [glass, Detection("apple", apple.box, 0.9, "red")]).correct


def test_position():
    meta = _first("position")  # a dog right of a teddy bear
    bear, dog_right = D("teddy bear", (0, 0, 10, 10), 0.9), D("dog", (30, 0, 40, 10), 0.9)
    assert score(meta, [bear, dog_right]).correct
    verdict = score(meta, [bear, D("dog", (0, 30, 10, 40), 0.9)])
    assert verdict == GenevalScore(False, "expected dog right of target, found below target")


def test_position_with_the_target_group_missing():
    meta = _first("position")
    verdict = score(meta, [D("dog", (30, 0, 40, 10), 0.9)])
    assert verdict.reason == "expected teddy bear>=1, found 0\nno target for dog to be right of"


def test_position_boxes_touching_the_margin():
    # Offsets exactly at the 0.1 x (summed sizes) margin leave no relation; just past it, one.
    meta = position_metadata([Triplet("dog", "right of", "cat")])
    cat = D("cat", (0, 0, 10, 10), 0.9)
    at_margin = D("dog", (2, 0, 12, 10), 0.9)  # offset 2 = 0.1 x (10 + 10)
    assert geneval_relations(at_margin.box, cat.box) == set()
    assert score(meta, [cat, at_margin]).reason == "expected dog right of target, found  target"
    # Past the margin the shrunk offset must exceed half the raw one: offset 4 gives exactly
    # (4 - 2) / 4 = 0.5, which GenEval's strict test rejects; offset 5 gives 0.6.
    assert not score(meta, [cat, D("dog", (4, 0, 14, 10), 0.9)]).correct
    assert score(meta, [cat, D("dog", (5, 0, 15, 10), 0.9)]).correct


def test_position_checks_every_pair_of_the_kept_objects():
    meta = {"tag": "position", "prompt": "",
            "include": [{"class": "cat", "count": 2},
                        {"class": "dog", "count": 1, "position": ["above", 0]}]}
    cats = [D("cat", (0, 50, 10, 60), 0.9), D("cat", (30, 50, 40, 60), 0.9)]
    assert score(meta, cats + [D("dog", (15, 0, 25, 10), 0.9)]).correct
    assert not score(meta, [cats[0], D("cat", (30, 0, 40, 4), 0.9),
                            D("dog", (15, 0, 25, 10), 0.9)]).correct


def test_rules_are_the_detectors_to_choose():
    meta = _first("single_object")
    low = [D("bench", (0, 0, 5, 5), 0.05)]
    assert not score(meta, low).correct
    assert score(meta, low, Rules(threshold=0.0, counting_threshold=0.0)).correct


def test_position_metadata_expresses_chains_for_geneval():
    chain = [Triplet("frog", "above", "sneaker"), Triplet("sneaker", "below", "teapot")]
    meta = position_metadata(chain, "p", "3obj-2rel")
    assert meta["include"] == [{"class": "teapot", "count": 1},
                               {"class": "sneaker", "count": 1, "position": ["below", 0]},
                               {"class": "frog", "count": 1, "position": ["above", 1]}]
    boxes = {"teapot": (40, 40, 50, 50), "sneaker": (40, 70, 50, 80), "frog": (40, 0, 50, 10)}
    dets = [D(k, v, 0.9) for k, v in boxes.items()]
    assert score(meta, dets).correct
    with pytest.raises(ValueError, match="subject of two relations"):
        position_metadata([Triplet("a", "above", "b"), Triplet("a", "below", "c")])
    with pytest.raises(ValueError, match="cycle"):
        position_metadata([Triplet("a", "above", "b"), Triplet("b", "above", "a")])


def test_toy_scoring_matches_the_rule_the_published_toy_numbers_used():
    """Through the scorer, the toy suite gives what `detect` + GenEval's rule gave before."""
    from l2s.bench.scoring import score_image
    from l2s.bench.suites import suite_prompts
    from l2s.toy.detector import detect
    from l2s.toy.scenes import random_scene
    from l2s.toy.world import WORLD, ToyDetector

    rng = np.random.default_rng(0)
    agree = 0
    for p in suite_prompts("shapes", 60, 3):
        scene = random_scene(rng, 32)
        img = scene.image.copy()
        img[rng.random((32, 32)) < 0.1] = rng.integers(0, 256, 3)  # noise
        t = p.triplet
        found = detect(img, categories=[t.subject, t.object])
        a, b = found.get(t.subject), found.get(t.object)
        old = a is not None and b is not None and t.relation in geneval_relations(a.box, b.box)
        rec = score_image(p, img, ToyDetector(), world=WORLD)
        assert rec["correct"] == old and rec["both_present"] == (a is not None and b is not None)
        agree += old
    assert agree > 0  # some prompts hold by chance, so both branches ran


def test_threshold_is_compared_in_float32_as_genevals_score_arrays_are():
    """Bug caught: a score that is 0.3 in float32 (0.30000001 as a Python float) passed the
    float64 test `> 0.3`; GenEval's `bbox[:, 4] > 0.3` on float32 scores drops it."""
    meta = _first("single_object")  # a bench
    at = float(np.float32(0.3))
    assert at > 0.3  # the edge case: above the threshold in float64 only
    assert kept(meta, [D("bench", (0, 0, 10, 10), at)]) == {}
    assert not score(meta, [D("bench", (0, 0, 10, 10), at)]).correct
    above = float(np.nextafter(np.float32(0.3), np.float32(1)))
    assert score(meta, [D("bench", (0, 0, 10, 10), above)]).correct


def test_tied_scores_keep_the_later_detection_first_as_numpys_reversed_argsort():
    """Bug caught: l2s kept the earlier of two tied detections (a stable descending sort);
    GenEval reverses an ascending argsort, so the later one leads, and with count 1 only it is
    checked: here its position decides the verdict. Scores equal only in float32 tie too."""
    meta = position_metadata([Triplet("dog", "left of", "cat")])
    cat = D("cat", (100, 0, 120, 20), 0.9)
    wrong = D("dog", (200, 0, 220, 20), 0.8)  # right of the cat
    right = D("dog", (0, 0, 20, 20), 0.8)  # left of the cat
    assert kept(meta, [cat, wrong, right])["dog"] == [right, wrong]
    assert score(meta, [cat, wrong, right]).correct
    assert not score(meta, [cat, right, wrong]).correct
    close = D("dog", (0, 0, 20, 20), 0.8 + 1e-12)  # the same float32 score as `wrong`
    assert kept(meta, [cat, close, wrong])["dog"] == [wrong, close]
