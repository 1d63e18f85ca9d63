"""Tests for l2s.relations: prompt parsing and the GenEval / T2I-CompBench box rules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l2s.relations import (
    ALL_RELATIONS,
    MULTIWORD_NOUNS,
    NEAR,
    RELATIONS,
    Triplet,
    box_iou,
    canonical_relation,
    compbench_image_score,
    compbench_spatial_score,
    format_prompt,
    geneval_relations,
    parse,
)

DATA = Path(__file__).resolve().parents[1] / "l2s" / "data"


def _geneval_position_entries() -> list[dict]:
    lines = (DATA / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines if line.strip()]
    return [e for e in entries if e["tag"] == "position"]


def _compbench_prompts() -> list[str]:
    text = (DATA / "t2i-compbench" / "spatial_val.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Parsing the benchmarks


def test_geneval_position_prompts_parse_to_their_metadata():
    entries = _geneval_position_entries()
    assert len(entries) == 100
    for entry in entries:
        reference, target = entry["include"]
        relation = target["position"][0]
        expected = Triplet(target["class"], relation, reference["class"])
        triplets = parse(entry["prompt"])
        assert triplets == [expected], entry["prompt"]
        (t,) = triplets
        prompt = entry["prompt"]
        assert prompt[slice(*t.subject_span)] == target["class"]
        assert prompt[slice(*t.object_span)] == reference["class"]


_COMPBENCH_PHRASES = {
    "on the left of": "left of",
    "on the right of": "right of",
    "on the top of": "above",
    "on the bottom of": "below",
    "next to": "next to",
    "near": "next to",
    "on side of": "next to",
}


def test_all_compbench_spatial_prompts_parse_to_first_and_last_noun():
    prompts = _compbench_prompts()
    assert len(prompts) == 300
    pattern = re.compile(r"an? (.+?) (" + "|".join(_COMPBENCH_PHRASES) + r") an? (.+)")
    for prompt in prompts:
        match = pattern.fullmatch(prompt)
        assert match is not None, prompt
        subject, phrase, obj = match.groups()
        assert parse(prompt) == [Triplet(subject, _COMPBENCH_PHRASES[phrase], obj)], prompt


@pytest.mark.parametrize(
    "prompt, expected",
    [  # a dozen of the CompBench prompts, checked by hand
        ("a giraffe next to a lamp", ("giraffe", "next to", "lamp")),
        ("a girl on the top of a frog", ("girl", "above", "frog")),
        ("a mouse on side of a key", ("mouse", "next to", "key")),
        ("a bee on the right of a refrigerator", ("bee", "right of", "refrigerator")),
        ("a bicycle on the bottom of a girl", ("bicycle", "below", "girl")),
        ("a sheep on the left of a lamp", ("sheep", "left of", "lamp")),
        ("a bird on side of a airplane", ("bird", "next to", "airplane")),
        ("a mouse near a bowl", ("mouse", "next to", "bowl")),
        ("a painting on the top of a rabbit", ("painting", "above", "rabbit")),
        ("a airplane on the right of a person", ("airplane", "right of", "person")),
        ("a television on the top of a bird", ("television", "above", "bird")),
        ("a painting on the right of a pig", ("painting", "right of", "pig")),
    ],
)
def test_compbench_prompts_by_hand(prompt, expected):
    assert parse(prompt) == [Triplet(*expected)]


def test_multiword_nouns_match_geneval_object_names():
    names = (DATA / "geneval" / "object_names.txt").read_text().splitlines()
    assert set(MULTIWORD_NOUNS) == {n.strip() for n in names if " " in n.strip()}
    for noun in MULTIWORD_NOUNS:
        assert parse(f"a {noun} left of a {noun}") == [Triplet(noun, "left of", noun)]


# ---------------------------------------------------------------------------------------------
# Parsing by hand


@pytest.mark.parametrize(
    "phrase, relation",
    [
        ("to the left of", "left of"),
        ("on the left of", "left of"),
        ("left of", "left of"),
        ("on the left side of", "left of"),
        ("to the right of", "right of"),
        ("on the right of", "right of"),
        ("right of", "right of"),
        ("on top of", "above"),
        ("on the top of", "above"),
        ("over", "above"),
        ("above", "above"),
        ("under", "below"),
        ("beneath", "below"),
        ("underneath", "below"),
        ("below", "below"),
        ("on the bottom of", "below"),
        ("beside", NEAR),
        ("near", NEAR),
        ("next to", NEAR),
        ("on side of", NEAR),
        ("on the side of", NEAR),
    ],
)
def test_synonyms(phrase, relation):
    assert canonical_relation(phrase) == relation
    assert canonical_relation(phrase.upper()) == relation
    assert parse(f"a cat {phrase} a dog") == [Triplet("cat", relation, "dog")]


def test_canonical_relation_rejects_unknown_phrases():
    with pytest.raises(ValueError, match="unknown spatial relation 'behind'"):
        canonical_relation("behind")
    with pytest.raises(ValueError, match="canonical"):
        Triplet("cat", "to the left of", "dog")


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a red car left of a dog", [("red car", "left of", "dog")]),
        ("A Photo of a Wine Glass ABOVE a Kite.", [("wine glass", "above", "kite")]),
        (
            "a frog above a sneaker below a teapot",
            [("frog", "above", "sneaker"), ("sneaker", "below", "teapot")],
        ),
        (
            "a cat left of a dog and a cup above a bowl",
            [("cat", "left of", "dog"), ("cup", "above", "bowl")],
        ),
        (
            "a cat to the left of a dog, and a cup on top of a bowl",
            [("cat", "left of", "dog"), ("cup", "above", "bowl")],
        ),
        (
            "a fox left of a cat right of a dog above a hen",
            [("fox", "left of", "cat"), ("cat", "right of", "dog"), ("dog", "above", "hen")],
        ),
        (
            "a fox left of a cat and a dog above a hen below a robot",
            [("fox", "left of", "cat"), ("dog", "above", "hen"), ("hen", "below", "robot")],
        ),
        (
            "a cat left of a dog and above a bowl",
            [("cat", "left of", "dog"), ("cat", "above", "bowl")],
        ),
        ("two cats near some dogs", [("cats", "next to", "dogs")]),
        ("one teapot under the corgi", [("teapot", "below", "corgi")]),
        ("a cat sitting on a sofa to the right of a man in a hat", [("cat", "right of", "man")]),
        ("there is a hot dog beneath a dining table", [("hot dog", "below", "dining table")]),
        ("a t-shirt beside an orange", [("t-shirt", "next to", "orange")]),
        ("a dog in a park", []),
        ("a photo of a cat", []),
        ("", []),
        ("a cat in front of a dog", []),
        ("left of a dog", []),
    ],
)
def test_parse_by_hand(prompt, expected):
    assert parse(prompt) == [Triplet(*t) for t in expected]


def test_repeated_word_resolves_to_its_own_occurrence():
    prompt = "a cat left of a dog and a bird above the cat"
    first, second = parse(prompt)
    assert first == Triplet("cat", "left of", "dog")
    assert second == Triplet("bird", "above", "cat")
    assert first.subject_span == (2, 5)
    assert second.object_span == (prompt.rindex("cat"), len(prompt))
    assert second.subject_span == (prompt.index("bird"), prompt.index("bird") + 4)


def test_chain_shares_the_middle_span():
    prompt = "a frog above a sneaker below a teapot"
    first, second = parse(prompt)
    assert first.object_span == second.subject_span
    assert prompt[slice(*first.object_span)] == "sneaker"


def test_spans_index_the_original_casing():
    prompt = "A Teddy  Bear to the LEFT of a Cat!"
    (t,) = parse(prompt)
    assert t == Triplet("teddy bear", "left of", "cat")
    assert prompt[slice(*t.subject_span)] == "Teddy  Bear"
    assert prompt[slice(*t.object_span)] == "Cat"


def test_triplet_helpers():
    t = Triplet("cat", "left of", "dog", subject_span=(2, 5))
    assert t.text() == str(t) == "cat left of dog"
    assert t.steerable and not Triplet("cat", NEAR, "dog").steerable
    assert t == Triplet("cat", "left of", "dog")  # spans do not take part in equality
    assert hash(t) == hash(Triplet("cat", "left of", "dog"))
    assert ALL_RELATIONS == RELATIONS + (NEAR,)


# ---------------------------------------------------------------------------------------------
# format_prompt and the round trip


def test_format_prompt_styles():
    t = [Triplet("dog", "right of", "teddy bear")]
    assert format_prompt(t) == "a photo of a dog right of a teddy bear"
    assert format_prompt(t, "plain") == "a dog to the right of a teddy bear"
    assert format_prompt(t, "compbench") == "a dog on the right of a teddy bear"
    chain = [Triplet("frog", "above", "sneaker"), Triplet("sneaker", "below", "teapot")]
    assert format_prompt(chain, "plain") == "a frog above a sneaker below a teapot"
    joined = [Triplet("cat", "left of", "dog"), Triplet("bird", "above", "cat")]
    assert format_prompt(joined, "plain") == "a cat to the left of a dog and a bird above the cat"
    assert format_prompt([Triplet("apple", NEAR, "owl")], "plain") == "an apple next to an owl"


def test_format_prompt_errors():
    with pytest.raises(ValueError, match="style"):
        format_prompt([Triplet("cat", "above", "dog")], "fancy")
    with pytest.raises(ValueError, match="at least one"):
        format_prompt([])


_COCO = [n.strip() for n in (DATA / "geneval" / "object_names.txt").read_text().splitlines()]
_OOD = ["teapot", "corgi", "furby", "robot", "red car", "wooden chair", "t-shirt", "apple pie"]
# Words the grammar gives a role (determiners, relation and clause words): a noun may not use them.
# fmt: off
_RESERVED = {
    "a", "an", "the", "one", "two", "three", "four", "five", "some", "this", "that", "these",
    "those", "another", "its", "his", "her", "their", "my", "our", "your", "there", "to", "on",
    "at", "by", "next", "close", "near", "over", "under", "above", "below", "beneath",
    "underneath", "beside", "atop", "alongside", "left", "right", "top", "bottom", "side", "of",
    "and", "while", "whereas", "in", "inside", "with", "wearing", "holding", "carrying", "which",
    "who", "is", "are", "sits", "sitting", "stands", "standing", "lies", "lying", "placed",
    "located", "positioned", "floating", "hanging", "flying", "photo", "photograph", "picture",
    "image", "drawing", "painting", "illustration", "rendering", "render", "sketch", "snapshot",
}
# fmt: on
_random_noun = st.lists(
    st.from_regex(r"[a-z]{2,8}", fullmatch=True).filter(lambda w: w not in _RESERVED),
    min_size=1,
    max_size=2,
).map(" ".join)
_nouns = st.one_of(st.sampled_from(_COCO + _OOD), _random_noun)
_triplets = st.lists(
    st.builds(Triplet, _nouns, st.sampled_from(ALL_RELATIONS), _nouns), min_size=1, max_size=4
)


@settings(max_examples=150, deadline=None)
@given(triplets=_triplets, style=st.sampled_from(["geneval", "compbench", "plain"]))
def test_format_then_parse_round_trips(triplets, style):
    prompt = format_prompt(triplets, style)
    parsed = parse(prompt)
    assert parsed == triplets, prompt
    for t in parsed:
        assert prompt[slice(*t.subject_span)] == t.subject
        assert prompt[slice(*t.object_span)] == t.object


# ---------------------------------------------------------------------------------------------
# GenEval's rule


@pytest.mark.parametrize(
    "box_a, box_b, expected",
    [
        # cA=(5,5), cB=(25,5): offset (-20,0), margin 0.1*(10+10)=2, r=(-18,0), dx=-18/20=-0.9
        ((0, 0, 10, 10), (20, 0, 30, 10), {"left of"}),
        ((20, 0, 30, 10), (0, 0, 10, 10), {"right of"}),
        # y points down: offset (0,-20), dy=-0.9, so A is above B
        ((0, 0, 10, 10), (0, 20, 10, 30), {"above"}),
        ((0, 20, 10, 30), (0, 0, 10, 10), {"below"}),
        # diagonal: offset (-20,-20), r=(-18,-18), /28.28 -> dx=dy=-0.636: both hold
        ((0, 0, 10, 10), (20, 20, 30, 30), {"left of", "above"}),
        # offset (-20,-5), r=(-18,-3), /20.62 -> dx=-0.873, dy=-0.145: left only
        ((0, 0, 10, 10), (20, 5, 30, 15), {"left of"}),
        # identical boxes: offset 0 -> no relation (and no division by zero)
        ((0, 0, 10, 10), (0, 0, 10, 10), set()),
        # near-identical centres: offset (-1,0) inside the margin 2 -> r=0 -> no relation
        ((0, 0, 10, 10), (1, 0, 11, 10), set()),
        # offset exactly the margin: r=0 -> no relation
        ((0, 0, 10, 10), (2, 0, 12, 10), set()),
        # offset (-4,0), r=-2, dx=-2/4=-0.5: not strictly under -0.5 -> no relation
        ((0, 0, 10, 10), (4, 0, 14, 10), set()),
        # offset (-4.5,0), r=-2.5, dx=-0.556 -> left of
        ((0, 0, 10, 10), (4.5, 0, 14.5, 10), {"left of"}),
        # big boxes widen the margin: offset (-30,0), margin 0.1*(100+100)=20, r=-10, dx=-0.333
        ((0, 0, 100, 100), (30, 0, 130, 100), set()),
    ],
)
def test_geneval_relations_by_hand(box_a, box_b, expected):
    assert geneval_relations(box_a, box_b) == expected


_coord = st.floats(0, 512, allow_nan=False)
_box = st.tuples(_coord, _coord, _coord, _coord).map(
    lambda b: (min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3]))
)
_MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@settings(max_examples=300, deadline=None)
@given(a=_box, b=_box)
def test_geneval_relations_are_antisymmetric(a, b):
    forward = geneval_relations(a, b)
    assert {_MIRROR[r] for r in forward} == geneval_relations(b, a)
    assert not {"left of", "right of"} <= forward and not {"above", "below"} <= forward
    assert forward <= set(RELATIONS)


def test_box_validation():
    with pytest.raises(ValueError, match="x1 <= x2"):
        geneval_relations((10, 0, 0, 10), (0, 0, 1, 1))
    with pytest.raises(ValueError, match="4|numbers"):
        box_iou((0, 0, 1), (0, 0, 1, 1))


# ---------------------------------------------------------------------------------------------
# T2I-CompBench's rule


def test_box_iou():
    assert box_iou((0, 0, 100, 100), (50, 0, 150, 100)) == pytest.approx(5000 / 15000)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((5, 5, 5, 5), (5, 5, 5, 5)) == 0.0  # empty boxes: no union, no overlap


SUBJECT = (0, 0, 100, 100)  # c1 = (50, 50)


@pytest.mark.parametrize(
    "relation, box_object, expected",
    [
        # object c2=(350,50): dx=300>0, dy=0, IoU 0 -> subject left of object
        ("left of", (300, 0, 400, 100), 1.0),
        ("on the left of", (300, 0, 400, 100), 1.0),
        ("right of", (300, 0, 400, 100), 0.0),
        ("above", (300, 0, 400, 100), 0.0),
        # object c2=(-250,50): dx=-300 -> right of
        ("on the right of", (-300, 0, -200, 100), 1.0),
        # object c2=(50,350): dy=300>0 -> subject above (smaller y) -> "on the top of"
        ("on the top of", (0, 300, 100, 400), 1.0),
        ("on the bottom of", (0, 300, 100, 400), 0.0),
        ("on the bottom of", (0, -300, 100, -200), 1.0),
        # overlap: object (50,0,150,100), dx=50>0, IoU=5000/15000=1/3 -> 0.1/(1/3)=0.3
        ("left of", (50, 0, 150, 100), 0.3),
        # diagonal tie |dx|=|dy|=300: no direction holds
        ("left of", (300, 300, 400, 400), 0.0),
        ("above", (300, 300, 400, 400), 0.0),
        # next to: dx=500, dy=100 -> |dy|<150 -> 1
        ("next to", (500, 100, 600, 200), 1.0),
        ("near", (500, 100, 600, 200), 1.0),
        # dx=500, dy=400: both far -> 150/500=0.3
        ("on side of", (500, 400, 600, 500), 0.3),
        # dx=dy=149.5: close on both axes -> 1; dx=dy=150: 150/150=1 too (continuous)
        ("next to", (149.5, 149.5, 249.5, 249.5), 1.0),
        ("next to", (150, 150, 250, 250), 1.0),
        # dx=dy=300 -> 0.5
        ("next to", (300, 300, 400, 400), 0.5),
    ],
)
def test_compbench_spatial_score_by_hand(relation, box_object, expected):
    assert compbench_spatial_score(relation, SUBJECT, box_object) == pytest.approx(expected)


def test_compbench_image_score():
    far_right = (300, 0, 400, 100)
    overlap = (50, 0, 150, 100)
    # 0.25*0.9 + 0.25*0.8 + 1/2 = 0.925
    assert compbench_image_score("left of", SUBJECT, 0.9, far_right, 0.8) == pytest.approx(0.925)
    # 0.425 + 0.3/2 = 0.575
    assert compbench_image_score("on the left of", SUBJECT, 0.9, overlap, 0.8) == pytest.approx(
        0.575
    )
    # wrong direction: 0.425 < 0.5 -> 0
    assert compbench_image_score("right of", SUBJECT, 0.9, far_right, 0.8) == 0.0
    # only one object found: 0.25*0.9 = 0.225 < 0.5 -> 0; none -> 0
    assert compbench_image_score("left of", SUBJECT, 0.9, None, None) == 0.0
    assert compbench_image_score("left of", None, None, far_right, 0.8) == 0.0
    assert compbench_image_score("left of", None, None, None, None) == 0.0
    # exactly 0.5 stays: 0.25*0.5 + 0.25*0.5 + 0.5/2 (near, dx=dy=300 -> 150/300) = 0.5
    assert compbench_image_score("near", SUBJECT, 0.5, (300, 300, 400, 400), 0.5) == 0.5
    # a relation is checked even when nothing was found
    with pytest.raises(ValueError, match="unknown spatial relation"):
        compbench_image_score("behind", None, None, None, None)
    with pytest.raises(ValueError, match="no detection score"):
        compbench_image_score("left of", SUBJECT, None, far_right, 0.8)


def test_compbench_near_distance_is_measured_on_its_479px_frame():
    """Bug caught: the 150 px "near" distance was applied to the generated image's own pixels;
    CompBench measures it on images resized to 479 px, so at 1024 px a 300 px offset is near
    (140 px there), and the image passes where the old rule gave it 0."""
    box = (300, 300, 400, 400)  # centres 300 px apart on both axes
    assert compbench_spatial_score("near", SUBJECT, box) == pytest.approx(0.5)  # in the frame
    assert compbench_spatial_score("near", SUBJECT, box, (1024, 1024)) == 1.0
    assert compbench_spatial_score("near", SUBJECT, box, (479, 479)) == pytest.approx(0.5)
    # 0.25 * 0.1 * 2 + 1 / 2 = 0.55 passes; with position 0.5 it was 0.3, under 0.5 -> 0
    assert compbench_image_score("near", SUBJECT, 0.1, box, 0.1, (1024, 1024)) == \
        pytest.approx(0.55)
    assert compbench_image_score("near", SUBJECT, 0.1, box, 0.1) == 0.0
    # at 512 px, 155 px apart is 145 px of the frame: near, where the old rule gave 150/155
    close = (155, 155, 255, 255)
    assert compbench_spatial_score("next to", SUBJECT, close, (512, 512)) == 1.0


def test_bench_scores_compbench_near_in_the_479px_frame_of_its_image():
    """Bug caught: the benchmark's CompBench scorer did not tell the rule its image's size."""
    import numpy as np

    from l2s.bench.detectors import ImageDetections
    from l2s.bench.geneval import Detection, Rules
    from l2s.bench.scoring import score_image
    from l2s.bench.suites import BenchPrompt

    class Fixed:  # a detector that finds the two queried objects 300 px apart
        name, rules = "fixed", Rules(threshold=0.0)

        def detect(self, image, names):
            return ImageDetections([Detection("dog", SUBJECT, 0.1),
                                    Detection("cat", (300, 300, 400, 400), 0.1)])

    meta = {"tag": "spatial", "prompt": "a dog near a cat", "relation": "near",
            "subject": "dog", "object": "cat", "queries": ["dog", "cat"]}
    prompt = BenchPrompt(0, meta["prompt"], meta)
    rec = score_image(prompt, np.zeros((1024, 1024, 3), np.uint8), Fixed())
    assert rec["correct"] and rec["score"] == pytest.approx(0.55)
