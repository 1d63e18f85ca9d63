"""The toy world: six coloured shapes, the detector that judges them, its suites and sources.

Both toy families (``toy``, ``toy-mmdit``) attach :data:`WORLD` to their presets and
backbones; importing this module registers the world's detector ("toy"), benchmark suites
("shapes", "shapes-multi") and inversion data sources ("shapes", "generated"), so the core
finds them through its registries and never names the toy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from l2s.bench.detection import ImageDetections
from l2s.bench.detectors import RegisteredDetector, register_detector
from l2s.bench.geneval import Detection, Rules
from l2s.bench.scoring import score_relation
from l2s.bench.suites import GENERATED_PROMPTS, Suite, multi_prompts, pair_prompts, register_suite
from l2s.engine.registry import TrainDefaults, World
from l2s.inversion.sources.base import Source, register_source
from l2s.relations import Triplet
from l2s.toy.scenes import CATEGORY_NAMES, WORLD_NAME

# The shipped toys: a small clean data set (a larger step converges in minutes) and ~130k
# parameters, enough for the toy's clean shapes and fast on a CPU.
TRAINING = TrainDefaults(lr=1e-3, size=(64, 1))
# The toy detector's confidence (colour purity x shape fit) is not a calibrated probability, and
# the toy suites always took every detection: no threshold.
TOY_RULES = Rules(threshold=0.0, counting_threshold=0.0)


def judge(images: np.ndarray, triplets: Sequence[Sequence[Triplet]]) -> list[bool]:
    """Per image (N, H, W, 3) uint8: every one of its triplets holds under the toy detector
    and GenEval's position rule (``l2s.toy.detector.relations_hold``)."""
    from l2s.toy.detector import relations_hold

    return relations_hold(images, triplets)


def extras(names: Sequence[str], by_class: dict[str, list[Detection]], size: int) -> dict:
    """Every prompt object found (both_present) and whether any two touch or one is a merged
    blob (fused): the toy world's failure modes (l2s.toy.detector)."""
    from l2s.toy.detector import objects_touch, oversized

    dets = [by_class[n][0] for n in names if n in by_class]
    fused = any(oversized(d, size) for d in dets) or any(
        objects_touch(a, b) for i, a in enumerate(dets) for b in dets[i + 1:])
    return {"both_present": len(dets) == len(names), "fused": bool(len(dets) > 1 and fused)}


class ToyDetector:
    """The toy world's colour detector (l2s.toy.detector) as a bench Detector."""

    name = "toy"
    rules = TOY_RULES
    open_vocabulary = False

    def detect(self, image: np.ndarray, names: Sequence[str]) -> ImageDetections:
        from l2s.toy.detector import detect

        found = detect(image, categories=list(names) or None)
        return ImageDetections([toy_detection(d) for d in found.values()],
                               [None] * len(found))


def toy_detection(d) -> Detection:
    """A toy detector result (l2s.toy.detector.Detection) as a scorer Detection."""
    return Detection(d.category, tuple(float(v) for v in d.box), float(d.confidence))


WORLD = World(
    WORLD_NAME, CATEGORY_NAMES, judge, judged_by="toy detector",
    description="six coloured shapes", suites=("shapes", "shapes-multi"),
    sources=("shapes", "generated"), detector="toy", extras=extras)


def score_shapes(image: np.ndarray, triplet: Triplet) -> dict:
    """One toy-world relation on an (H, W, 3) image, through the toy detector and GenEval's
    rules: the record fields of score_image (correct, both_present, fused, details, ...).
    Its verdict is ``l2s.toy.detector.score_pair``'s (one detection per shape, every
    confidence > 0; tests/test_detector.py checks they agree)."""
    return score_relation(image, triplet, ToyDetector(), WORLD)


def _source(name: str):
    def samples(options, report, denoiser=None):
        from l2s.toy import sources

        return getattr(sources, f"{name}_source")(options, report, denoiser)

    return samples


register_detector(RegisteredDetector("toy", lambda device: ToyDetector(), "l2s.toy.detector"))
register_suite(Suite("shapes", lambda n, seed: pair_prompts(
    CATEGORY_NAMES, GENERATED_PROMPTS if n is None else n, seed), 1, "toy"))
register_suite(Suite("shapes-multi", lambda n, seed: multi_prompts(
    CATEGORY_NAMES, GENERATED_PROMPTS if n is None else n, seed, "short"), 1, "toy"))
# shapes: toy scenes are free, but the toy classifier needs far fewer than method.md's counts;
# generated: method.md's synthetic counts.
register_source(Source("shapes", _source("shapes"), (400, 50, 50)))
register_source(Source("generated", _source("generated"), (800, 100, 70)))
