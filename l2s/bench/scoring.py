"""One image's verdict in a suite: run the detector, classify colours, apply the suite's rule.

GenEval-style suites (geneval, geneval-position, multirel, shapes, shapes-multi) go through
l2s.bench.geneval.score; compbench-spatial through T2I-CompBench's formula
(l2s.relations.compbench_image_score). The fields returned join GenEval's result record.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from l2s.bench.detectors import Detector, ImageDetections
from l2s.bench.geneval import Detection, kept, needs_color, position_metadata, score
from l2s.bench.suites import BenchPrompt
from l2s.engine.registry import World
from l2s.relations import compbench_image_score, format_prompt

# (image (H, W, 3) uint8, detections to label, their masks) -> one colour name each
ColorClassifier = Callable[[np.ndarray, Sequence[Detection], Sequence[np.ndarray | None]],
                           list[str]]


def object_names(prompt: BenchPrompt) -> list[str]:
    """The names a detector is asked about: the metadata's classes or CompBench's queries."""
    meta = prompt.metadata
    if "queries" in meta:
        return list(dict.fromkeys(meta["queries"]))
    return list(dict.fromkeys(r["class"] for key in ("include", "exclude")
                              for r in meta.get(key, [])))


def _details(by_class: dict[str, list[Detection]]) -> str:
    """GenEval's "details": per class, the kept boxes as [x0, y0, x1, y1, score]."""
    return json.dumps({name: [[round(v, 2) for v in d.box] + [round(d.score, 4)] for d in dets]
                       for name, dets in by_class.items()})


def score_image(prompt: BenchPrompt, image: np.ndarray, detector: Detector,
                colors: ColorClassifier | None = None, world: World | None = None) -> dict:
    """Record fields for one image: correct, reason, details, score, n_detections and the
    extras (relations_held for multi-relation prompts; those of the world the image was drawn
    in, ``World.extras``)."""
    found = detector.detect(image, object_names(prompt))
    if prompt.tag == "spatial":
        return _compbench(prompt, found, detector, (image.shape[1], image.shape[0]))
    meta = prompt.metadata
    by_class = kept(meta, found.detections, detector.rules)
    # A detection that comes with its colour (Detection.color) is not classified again.
    todo = [d for d in needs_color(meta, by_class) if d.color is None]
    detections = found.detections
    if todo:
        if colors is None:
            raise ValueError(f"{prompt.prompt!r} asks for colours: pass a colour classifier")
        named = dict(zip(map(id, todo), colors(image, todo, [found.mask_of(d) for d in todo]),
                         strict=True))
        detections = [replace(d, color=named[id(d)]) if id(d) in named else d
                      for d in detections]
        by_class = kept(meta, detections, detector.rules)
    verdict = score(meta, detections, detector.rules)
    rec = {"correct": verdict.correct, "reason": verdict.reason, "details": _details(by_class),
           "score": float(verdict.correct), "n_detections": sum(map(len, by_class.values()))}
    if len(prompt.triplets) > 1:
        rec["relations_held"] = [score(position_metadata([t]), detections, detector.rules).correct
                                 for t in prompt.triplets]
    if world is not None and world.extras is not None:
        rec.update(world.extras(object_names(prompt), by_class, max(image.shape[:2])))
    return rec


def _compbench(prompt: BenchPrompt, found: ImageDetections, detector: Detector,
               size: tuple[int, int]) -> dict:
    """T2I-CompBench's spatial score from the most confident detection of each query."""
    meta = prompt.metadata
    best: dict[str, Detection] = {}
    for d in found.detections:
        if d.score > detector.rules.threshold and d.score > getattr(best.get(d.label), "score", -1):
            best[d.label] = d
    subj, obj = (best.get(q) for q in meta["queries"])
    value = compbench_image_score(meta["relation"], subj and subj.box, subj and subj.score,
                                  obj and obj.box, obj and obj.score, size)
    by_class = {d.label: [d] for d in best.values()}
    reason = "" if value > 0 else (
        "missing " + " and ".join(q for q, d in zip(meta["queries"], (subj, obj), strict=True)
                                  if d is None) if subj is None or obj is None
        else f"score under 0.5: {meta['relation']} does not hold")
    return {"correct": value > 0, "reason": reason, "details": _details(by_class),
            "score": value, "n_detections": len(best)}


def score_relation(image: np.ndarray, triplet, detector: Detector,
                   world: World | None = None) -> dict:
    """One relation "a A REL a B" on an (H, W, 3) image through ``detector`` and GenEval's
    rules: the record fields of score_image (correct, details, the world's extras, ...)."""
    prompt = format_prompt([triplet], style="plain")
    return score_image(BenchPrompt(0, prompt, position_metadata([triplet], prompt), (triplet,)),
                       np.asarray(image), detector, world=world)
