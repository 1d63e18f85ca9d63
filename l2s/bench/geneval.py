"""GenEval's per-image decision rules as a pure function: metadata + detections -> correct, reason.

Rules of evaluation/evaluate_images.py in github.com/djghosh13/geneval (commit af4902f):
- detections of a class are kept when their score is > 0.3 (> 0.9 for the "counting" task), most
  confident first, at most 16 per class, no NMS (GenEval's default max_overlap of 1.0);
- an "include" clause {class, count} needs `count` kept objects of that class; with "color", the
  `count` most confident of them must all carry that colour; with "position" [REL, group], each of
  its `count` most confident objects must stand REL of every object of include group `group`,
  under GenEval's relative-position rule (l2s.relations.geneval_relations); a group that failed
  gives its dependants "no target"; include clauses combine with AND;
- an "exclude" clause {class, count} fails when `count` or more objects of the class are kept;
  exclude clauses combine with OR (any one fails the image).
Colours come with the detections (`Detection.color`, filled by a colour classifier: CLIP
ViT-L/14 zero-shot, see l2s.bench.colors); the scorer never runs a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from l2s.relations import Triplet, geneval_relations

# GenEval's zero-shot colour classes and prompt templates (evaluate_images.py, COLORS and
# color_classification); "{c}" is the colour, "{o}" the class name.
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown",
                           "black", "white")
COLOR_TEMPLATES: tuple[str, ...] = ("a photo of a {c} {o}", "a photo of a {c}-colored {o}",
                                    "a photo of a {c} object")
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position",
                          "color_attr")  # GenEval's six tags, in its metadata's order


@dataclass(frozen=True)
class Detection:
    """One raw detection, before any thresholding."""

    label: str  # class name in GenEval's vocabulary ("teddy bear"), or the queried phrase
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) pixels, y down
    score: float  # detector confidence in [0, 1]
    color: str | None = None  # one of COLORS when already classified; None: not classified


@dataclass(frozen=True)
class GenevalScore:
    correct: bool
    reason: str  # GenEval's wording, one failed clause a line; "" when correct


@dataclass(frozen=True)
class Rules:
    """Detection thresholds of the decision rules; GenEval's values by default. Detectors whose
    scores live on another scale (the toy detector) pass their own (l2s.bench.detectors)."""

    threshold: float = 0.3  # keep detections scoring above this
    counting_threshold: float = 0.9  # ... above this in the "counting" task
    max_objects: int = 16  # per class, most confident first


GENEVAL_RULES = Rules()


def kept(metadata: dict, detections: Sequence[Detection], rules: Rules = GENEVAL_RULES
         ) -> dict[str, list[Detection]]:
    """The detections GenEval reasons about: per class, above the task's threshold, most
    confident first, at most rules.max_objects.

    As evaluate_images.py does it on mmdet's float32 score arrays: the score is compared with
    the threshold in float32 (``bbox[:, 4] > 0.3``, so a score of float32(0.3) is not above
    0.3), and the order is a stable ascending argsort reversed, so of two tied scores the later
    detection comes first."""
    cut = np.float32(rules.counting_threshold if metadata.get("tag") == "counting"
                     else rules.threshold)
    scores = [np.float32(d.score) for d in detections]
    order = sorted(range(len(detections)), key=lambda i: (scores[i], i), reverse=True)
    by_class: dict[str, list[Detection]] = {}
    for i in order:
        if scores[i] > cut:
            group = by_class.setdefault(detections[i].label, [])
            if len(group) < rules.max_objects:
                group.append(detections[i])
    return by_class


def needs_color(metadata: dict, by_class: dict[str, list[Detection]]) -> list[Detection]:
    """The kept detections whose colour the decision reads (the `count` most confident of each
    class an include clause gives a colour): what a colour classifier must label."""
    out = []
    for req in metadata.get("include", []):
        if "color" in req:
            out += by_class.get(req["class"], [])[: req["count"]]
    return out


def score(metadata: dict, detections: list[Detection], rules: Rules = GENEVAL_RULES
          ) -> GenevalScore:
    """GenEval's verdict on one image (see the module docstring for the rules)."""
    objects = kept(metadata, detections, rules)
    correct, reasons = True, []
    groups: list[list[Detection] | None] = []  # include clause i -> its objects, None if failed
    for req in metadata.get("include", []):
        name, count = req["class"], req["count"]
        found = objects.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if matched and "color" in req:
            colors = [d.color for d in found]
            if None in colors:
                raise ValueError(f"the {name} detections need a colour to score {req}: "
                                 "classify them first (l2s.bench.colors)")
            if colors.count(req["color"]) < count:
                matched = False
                reasons.append(
                    f"expected {req['color']} {name}>={count}, found "
                    f"{colors.count(req['color'])} {req['color']}; and "
                    + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))
        if matched and "position" in req:
            relation, target = req["position"]
            if groups[target] is None:
                matched = False
                reasons.append(f"no target for {name} to be {relation}")
            else:
                for obj in found:
                    bad = next((t for t in groups[target]
                                if relation not in geneval_relations(obj.box, t.box)), None)
                    if bad is not None:
                        held = geneval_relations(obj.box, bad.box)
                        matched = False
                        reasons.append(f"expected {name} {relation} target, found "
                                       f"{' and '.join(sorted(held))} target")
                        break
        correct &= matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        name, count = req["class"], req["count"]
        if len(objects.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(objects[name])}")
    return GenevalScore(correct, "\n".join(reasons))


def position_metadata(triplets: Sequence[Triplet], prompt: str = "", tag: str = "position"
                      ) -> dict:
    """GenEval metadata asking every triplet to hold (one object per class): each relation's
    object is an include group and its subject a later group with "position" [REL, that group].

    Each noun may be the subject of at most one relation (GenEval gives a clause one position),
    and a noun's relation must not point at itself through a cycle.
    """
    index: dict[str, int] = {}
    include: list[dict] = []
    pending = list(triplets)
    subjects = [t.subject for t in pending]
    if len(set(subjects)) != len(subjects):
        raise ValueError(f"{[str(t) for t in triplets]}: a noun is the subject of two relations, "
                         "which GenEval metadata cannot express")
    while pending:
        # Add an object-only noun, or a subject whose relation target is already placed.
        for t in pending:
            if t.object in index or t.object not in subjects:
                break
        else:
            raise ValueError(f"{[str(x) for x in triplets]}: the relations form a cycle")
        if t.object not in index:
            index[t.object] = len(include)
            include.append({"class": t.object, "count": 1})
        if t.subject in index:
            raise ValueError(f"{t}: {t.subject!r} is placed before its own relation is")
        index[t.subject] = len(include)
        include.append({"class": t.subject, "count": 1, "position": [t.relation, index[t.object]]})
        pending.remove(t)
        subjects.remove(t.subject)
    return {"tag": tag, "include": include, "prompt": prompt}
