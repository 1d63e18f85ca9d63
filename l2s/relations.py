"""Spatial relations: prompt parsing and the benchmarks' box rules."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")  # directional, steerable
NEAR = "next to"  # scored by T2I-CompBench, never steered
ALL_RELATIONS: tuple[str, ...] = RELATIONS + (NEAR,)

Box = Sequence[float]  # (x1, y1, x2, y2) in pixels, y pointing down

# How each prompt style writes a canonical relation (format_prompt).
_GENEVAL_PHRASES = {
    "left of": "left of",
    "right of": "right of",
    "above": "above",
    "below": "below",
    "next to": "next to",
}
RELATION_PHRASES: dict[str, dict[str, str]] = {
    "geneval": _GENEVAL_PHRASES,
    "compbench": {
        "left of": "on the left of",
        "right of": "on the right of",
        "above": "on the top of",
        "below": "on the bottom of",
        "next to": "next to",
    },
    # GenEval's phrases without "a photo of": the toy's multi-relation prompts, which must fit
    # its 24-token text encoder (5 shapes with 3 relations take up to 24 tokens this way)
    "short": _GENEVAL_PHRASES,
    "plain": {
        "left of": "to the left of",
        "right of": "to the right of",
        "above": "above",
        "below": "below",
        "next to": "next to",
    },
}

# The multi-word class names of GenEval's 80 COCO objects (l2s/data/geneval/object_names.txt).
MULTIWORD_NOUNS: tuple[str, ...] = (
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "sports ball",
    "baseball bat",
    "baseball glove",
    "tennis racket",
    "wine glass",
    "hot dog",
    "potted plant",
    "dining table",
    "computer mouse",
    "tv remote",
    "computer keyboard",
    "cell phone",
    "teddy bear",
    "hair drier",
)
# Compounds that contain a separator or clause word; never split inside them.
_PROTECTED_COMPOUNDS = (
    "fish and chips",
    "macaroni and cheese",
    "salt and pepper shaker",
    "jack in the box",
)

# One named group per canonical relation; every phrasing the parser understands.
_RELATION_GROUPS = {
    "left": (r"(?:(?:to|on|at)\s+(?:the\s+)?)?left(?:[\s-]+hand)?(?:\s+side)?\s+of", "left of"),
    "right": (r"(?:(?:to|on|at)\s+(?:the\s+)?)?right(?:[\s-]+hand)?(?:\s+side)?\s+of", "right of"),
    "above": (r"above|atop|over|on\s+(?:the\s+)?top\s+of", "above"),
    "below": (r"below|underneath|under|beneath|on\s+(?:the\s+)?bottom\s+of", "below"),
    "near": (
        r"next\s+to|near(?:\s+to)?|close\s+to|beside|alongside|(?:on|by|at)\s+(?:the\s+)?side\s+of",
        "next to",
    ),
}
_RELATION_RE = re.compile(
    r"\b(?:" + "|".join(f"(?P<{g}>{p})" for g, (p, _) in _RELATION_GROUPS.items()) + r")\b",
    re.IGNORECASE,
)
_SEPARATOR_RE = re.compile(r"\b(?:and|while|whereas)\b|[,;:!?]|\.(?=\s|$)", re.IGNORECASE)
_PROTECTED_RE = re.compile(
    r"\b(?:" + "|".join(re.escape(n) for n in MULTIWORD_NOUNS + _PROTECTED_COMPOUNDS) + r")\b",
    re.IGNORECASE,
)
_WORD_RE = re.compile(r"\w+(?:['’-]\w+)*")

# fmt: off
_DETERMINERS = frozenset({
    "a", "an", "the", "one", "two", "three", "four", "five", "some", "this", "that", "these",
    "those", "another", "its", "his", "her", "their", "my", "our", "your",
})
# fmt: on
# Two-word openings to drop: "<a photo of> X" is about X, "<there is> X" too.
# fmt: off
_IMAGE_NOUNS = ("photo", "photograph", "picture", "image", "drawing", "painting", "illustration",
                "rendering", "render", "sketch", "snapshot")
# fmt: on
_LEADING_PAIRS = frozenset(
    {(noun, "of") for noun in _IMAGE_NOUNS} | {("there", "is"), ("there", "are")}
)
# A word that ends a noun phrase's head ("a cat sitting ...", "a dog with a hat").
# fmt: off
_CLAUSE_WORDS = frozenset({
    "in", "inside", "with", "on", "at", "wearing", "holding", "carrying", "that", "which", "who",
    "is", "are", "sits", "sitting", "stands", "standing", "lies", "lying", "placed", "located",
    "positioned", "floating", "hanging", "flying",
})
# fmt: on


@dataclass(frozen=True)
class Triplet:
    """One spatial statement of a prompt: `subject` stands `relation` of `object`."""

    subject: str  # lowercase noun phrase, e.g. "teddy bear"
    relation: str  # one of ALL_RELATIONS
    object: str
    # (start, end) character offsets of each noun phrase in the parsed prompt, so a word that
    # occurs twice resolves to the right occurrence; None for hand-made triplets.
    subject_span: tuple[int, int] | None = field(default=None, compare=False)
    object_span: tuple[int, int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.relation not in ALL_RELATIONS:
            raise ValueError(
                f"{self.relation!r} is not a canonical relation: use one of {ALL_RELATIONS} "
                "(canonical_relation() maps phrasings such as 'on the left of')"
            )

    @property
    def steerable(self) -> bool:
        return self.relation in RELATIONS

    def text(self) -> str:
        return f"{self.subject} {self.relation} {self.object}"

    def __str__(self) -> str:
        return self.text()


def canonical_relation(phrase: str) -> str:
    """Map a relation phrasing ("on the top of", "to the left of", "near") to its canonical name."""
    match = _RELATION_RE.fullmatch(" ".join(phrase.split()))
    if match is None:
        raise ValueError(
            f"unknown spatial relation {phrase!r}: use one of {ALL_RELATIONS} or a phrasing such "
            "as "
            "'to the left of', 'on the right of', 'on the top of', 'under', 'near', 'on side of'"
        )
    return _RELATION_GROUPS[match.lastgroup][1]


@dataclass(frozen=True)
class _NounPhrase:
    name: str
    span: tuple[int, int]


def _inside(span: tuple[int, int], protected: list[tuple[int, int]]) -> bool:
    return any(span[0] < end and start < span[1] for start, end in protected)


def _noun_phrase(
    prompt: str, start: int, end: int, protected: list[tuple[int, int]]
) -> _NounPhrase | None:
    """The noun phrase in prompt[start:end]: leading determiners and "photo of" dropped, cut
    before a trailing clause ("sitting ...", "with a hat")."""
    words = list(_WORD_RE.finditer(prompt, start, end))
    lower = [w.group().lower() for w in words]
    first = 0
    while first < len(words):
        if lower[first] in _DETERMINERS:
            first += 1
        elif (lower[first], *lower[first + 1 : first + 2]) in _LEADING_PAIRS:
            first += 2
        else:
            break
    last = len(words)
    for i in range(first + 1, len(words)):
        if lower[i] in _CLAUSE_WORDS and not _inside(words[i].span(), protected):
            last = i
            break
    if first >= last:
        return None
    return _NounPhrase(" ".join(lower[first:last]), (words[first].start(), words[last - 1].end()))


def parse(prompt: str) -> list[Triplet]:
    """Read the (subject, relation, object) triplets of a prompt; [] when it states no relation.

    Grammar: clauses split at "and" / "while" / punctuation; in a clause, noun phrases alternate
    with relation phrases, and each adjacent pair gives a triplet, so "A r1 B r2 C" is the chain
    [A r1 B, B r2 C]. A clause that opens with a relation ("... and above a bowl") takes the
    previous clause's first noun phrase as its subject.
    """
    if not isinstance(prompt, str):  # was: TypeError from re
        from l2s.errors import ConfigError

        raise ConfigError(f'the prompt must be text such as "a circle to the left of a square", '
                          f"got {prompt!r}")
    protected = [m.span() for m in _PROTECTED_RE.finditer(prompt)]
    events: list[tuple[int, int, str | None]] = []  # (start, end, canonical relation | None=sep)
    for m in _RELATION_RE.finditer(prompt):
        if not _inside(m.span(), protected):
            events.append((m.start(), m.end(), _RELATION_GROUPS[m.lastgroup][1]))
    for m in _SEPARATOR_RE.finditer(prompt):
        if not _inside(m.span(), protected):
            events.append((m.start(), m.end(), None))
    events.sort()

    clauses: list[tuple[list[_NounPhrase | None], list[str]]] = []
    phrases: list[_NounPhrase | None] = []
    relations: list[str] = []
    position = 0
    for start, end, relation in events:
        phrases.append(_noun_phrase(prompt, position, start, protected))
        if relation is None:
            clauses.append((phrases, relations))
            phrases, relations = [], []
        else:
            relations.append(relation)
        position = end
    phrases.append(_noun_phrase(prompt, position, len(prompt), protected))
    clauses.append((phrases, relations))

    triplets: list[Triplet] = []
    head: _NounPhrase | None = None  # first noun phrase of the latest clause that had one
    for phrases, relations in clauses:
        if phrases[0] is None:
            phrases[0] = head if relations else None
        head = phrases[0] or head
        for i, relation in enumerate(relations):
            a, b = phrases[i], phrases[i + 1]
            if a is not None and b is not None:
                triplets.append(Triplet(a.name, relation, b.name, a.span, b.span))
    return triplets


def _with_article(noun: str, mentioned: set[str]) -> str:
    if noun in mentioned:
        return f"the {noun}"
    mentioned.add(noun)
    return with_article(noun)


def with_article(noun: str) -> str:
    """"a ring", "an apple": a noun with its indefinite article."""
    return f"{'an' if noun[:1] in tuple('aeiou') else 'a'} {noun}"


def format_prompt(triplets: Sequence[Triplet], style: str = "geneval") -> str:
    """Write triplets as a prompt; a triplet whose subject is the previous one's object continues
    a chain ("a frog above a sneaker below a teapot"), others join with "and"."""
    if style not in RELATION_PHRASES:
        raise ValueError(f"unknown prompt style {style!r}: use one of {tuple(RELATION_PHRASES)}")
    if not triplets:
        raise ValueError("format_prompt needs at least one triplet")
    words = RELATION_PHRASES[style]
    mentioned: set[str] = set()
    clauses: list[list[str]] = []
    previous: Triplet | None = None
    for t in triplets:
        if previous is None or t.subject != previous.object:
            clauses.append([_with_article(t.subject, mentioned)])
        clauses[-1].append(f"{words[t.relation]} {_with_article(t.object, mentioned)}")
        previous = t
    body = " and ".join(" ".join(clause) for clause in clauses)
    return f"a photo of {body}" if style == "geneval" else body


# ---------------------------------------------------------------------------------------------
# Box rules


def _check_box(box: Box, name: str) -> tuple[float, float, float, float]:
    if len(box) != 4:
        raise ValueError(f"{name} must be (x1, y1, x2, y2), got {len(box)} numbers")
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"{name} {tuple(box)} is not (x1, y1, x2, y2) with x1 <= x2, y1 <= y2")
    return x1, y1, x2, y2


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when both are empty."""
    ax1, ay1, ax2, ay2 = _check_box(a, "box a")
    bx1, by1, bx2, by2 = _check_box(b, "box b")
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


GENEVAL_MARGIN = 0.1  # share of the summed box sizes an offset must exceed


def geneval_relations(box_a: Box, box_b: Box) -> set[str]:
    """Relations that hold for A relative to B under GenEval's rule (evaluation/evaluate_images.py,
    relative_position): the centre offset, shrunk by 0.1 x the summed sizes per axis, normalised
    by the raw offset's length; a direction holds beyond 0.5. Boxes in pixels, y down."""
    ax1, ay1, ax2, ay2 = _check_box(box_a, "box_a")
    bx1, by1, bx2, by2 = _check_box(box_b, "box_b")
    offset = ((ax1 + ax2) / 2 - (bx1 + bx2) / 2, (ay1 + ay2) / 2 - (by1 + by2) / 2)  # c_A - c_B
    sizes = ((ax2 - ax1) + (bx2 - bx1), (ay2 - ay1) + (by2 - by1))  # d_A + d_B
    revised = tuple(
        math.copysign(max(abs(o) - GENEVAL_MARGIN * s, 0.0), o)
        for o, s in zip(offset, sizes, strict=True)
    )
    # The 1e-3 test is absolute, as in GenEval: it assumes pixel, not normalised, coordinates.
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    # GenEval divides by the norm of the raw offset, not of the revised one; boundaries strict.
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


COMPBENCH_IOU = 0.1  # above this overlap a directional score decays as 0.1 / IoU
COMPBENCH_NEAR_PX = 150  # "next to" holds within this centre distance on either axis ...
COMPBENCH_FRAME_PX = 479  # ... measured on the image resized to this side, as CompBench scores
COMPBENCH_PASS = 0.5  # image scores under this count as 0


def compbench_spatial_score(relation: str, box_subject: Box, box_object: Box,
                            image_size: tuple[int, int] | None = None) -> float:
    """T2I-CompBench's 2D position term (UniDet_eval/2D_spatial_eval.py, determine_position),
    before detection-score weighting; `relation` canonical or a CompBench phrasing.

    Boxes are in pixels of an image of ``image_size`` (width, height). CompBench detects on its
    images resized to COMPBENCH_FRAME_PX a side, so its 150 px "near" distance is one of that
    frame: the centre offsets are rescaled to it first (None: boxes already in that frame).
    The directional terms compare ratios and IoU, which the resize does not change."""
    relation = canonical_relation(relation)
    sx1, sy1, sx2, sy2 = _check_box(box_subject, "box_subject")
    ox1, oy1, ox2, oy2 = _check_box(box_object, "box_object")
    dx = (ox1 + ox2) / 2 - (sx1 + sx2) / 2  # c2.x - c1.x, c1 = subject
    dy = (oy1 + oy2) / 2 - (sy1 + sy2) / 2  # y down: dy > 0 means the subject is higher
    if relation == NEAR:
        if image_size is not None:
            dx = dx * COMPBENCH_FRAME_PX / image_size[0]
            dy = dy * COMPBENCH_FRAME_PX / image_size[1]
        # CompBench's test is "or": close on either axis is enough.
        if abs(dx) < COMPBENCH_NEAR_PX or abs(dy) < COMPBENCH_NEAR_PX:
            return 1.0
        return COMPBENCH_NEAR_PX / max(abs(dx), abs(dy))
    holds = {
        "left of": dx > 0 and abs(dx) > abs(dy),
        "right of": dx < 0 and abs(dx) > abs(dy),
        "above": dy > 0 and abs(dy) > abs(dx),
        "below": dy < 0 and abs(dy) > abs(dx),
    }[relation]
    if not holds:
        return 0.0
    iou = box_iou(box_subject, box_object)
    return 1.0 if iou < COMPBENCH_IOU else COMPBENCH_IOU / iou


def _detection_score(box: Box | None, score: float | None, name: str) -> float:
    if box is None:
        return 0.0
    if score is None:
        raise ValueError(f"the {name} has a box but no detection score: pass both, or box None")
    return float(score)


def compbench_image_score(
    relation: str,
    box_subject: Box | None,
    score_subject: float | None,
    box_object: Box | None,
    score_object: float | None,
    image_size: tuple[int, int] | None = None,
) -> float:
    """One image's T2I-CompBench spatial score (UniDet_eval/2D_spatial_eval.py): 0.25 s1 + 0.25 s2
    + position / 2 with both objects found, 0.25 s for one, 0 for none; then 0 if under 0.5.
    A missing object is passed as box None; scores are the detector's confidences; boxes are
    pixels of an image of ``image_size`` (width, height; see compbench_spatial_score)."""
    relation = canonical_relation(relation)
    s1 = _detection_score(box_subject, score_subject, "subject")
    s2 = _detection_score(box_object, score_object, "object")
    if box_subject is not None and box_object is not None:
        position = compbench_spatial_score(relation, box_subject, box_object, image_size)
        score = 0.25 * s1 + 0.25 * s2 + position / 2
    else:
        score = 0.25 * (s1 + s2)  # the missing object's s is 0
    return score if score >= COMPBENCH_PASS else 0.0
