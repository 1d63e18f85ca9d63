"""Detectors behind one interface: the toy world's colour detector and transformers models.

A detector turns an image and the object names a prompt mentions into raw `Detection`s (plus
instance masks where it has them, for the colour classifier) and carries the thresholds its
scores need (`rules`). Which detector each suite uses by default, and each one's thresholds:

| name (`--detector`) | model | used by | rules |
|---|---|---|---|
| toy | l2s.toy.detector (colour components) | shapes, shapes-multi | every detection kept |
| mask2former | facebook/mask2former-swin-small-coco-instance | geneval*, multirel | 0.3 / 0.9 |
| owlv2 | google/owlv2-base-patch16-ensemble | compbench-spatial | 0.1 (OWLv2's own default) |

A hub id or a local folder is read by its config's model_type (mask2former, owlv2, owlvit).
The transformers adapters live in l2s.bench.hf_detectors and load only when asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from l2s.bench.detection import OWL_RULES, DetectorError, ImageDetections
from l2s.bench.geneval import GENEVAL_RULES, Detection, Rules

# Aliases of --detector and the suites' defaults.
DETECTOR_ALIASES = {
    "mask2former": "facebook/mask2former-swin-small-coco-instance",
    "owlv2": "google/owlv2-base-patch16-ensemble",
}
DEFAULT_DETECTORS = {
    "shapes": "toy", "shapes-multi": "toy",
    "geneval": "mask2former", "geneval-position": "mask2former", "multirel": "mask2former",
    "compbench-spatial": "owlv2",
}
COLOR_MODEL = "openai/clip-vit-large-patch14"  # GenEval's CLIP ViT-L/14 (OpenAI weights)
# The toy detector's confidence (colour purity x shape fit) is not a calibrated probability, and
# the toy suites always took every detection: no threshold.
TOY_RULES = Rules(threshold=0.0, counting_threshold=0.0)


class Detector(Protocol):
    name: str  # what --detector resolved to, written into results
    rules: Rules  # thresholds for GenEval's decision rules
    open_vocabulary: bool  # whether `names` are free text queries (else a fixed label set)

    def detect(self, image: np.ndarray, names: Sequence[str]) -> ImageDetections:
        """Detections in an (H, W, 3) uint8 image; `names` are the objects the prompt mentions
        (an open-vocabulary detector queries them; a closed one may return other classes)."""
        ...


class ToyDetector:
    """The toy world's colour detector (l2s.toy.detector) as a Detector."""

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


def load_detector(name: str, device: str | None = None) -> Detector:
    """`--detector`: "toy", an alias of DETECTOR_ALIASES, a hub id or a local folder."""
    if name == "toy":
        return ToyDetector()
    from l2s.bench.hf_detectors import load_hf_detector

    return load_hf_detector(DETECTOR_ALIASES.get(name, name), device)


def detector_available(name: str) -> bool:
    """Whether a detector loads with no network (shipped, a local folder or in the HF cache)."""
    if name == "toy":
        return True
    from l2s.bench.hf_detectors import hf_model_available

    return hf_model_available(DETECTOR_ALIASES.get(name, name))


def detector_notes(suite: str, detector: str) -> list[str]:
    """How a suite's scoring with `detector` departs from the original harness (docs/benchmarks.md,
    "Deviations"), for the run's output."""
    repo = DETECTOR_ALIASES.get(detector, detector)
    if suite == "compbench-spatial":
        return [f"T2I-CompBench's UniDet is replaced by {repo}: its scores enter CompBench's "
                "formula on another scale, so compare methods within this run, not with "
                "published CompBench numbers"]
    if suite in ("geneval", "geneval-position", "multirel") and repo == DETECTOR_ALIASES[
            "mask2former"]:
        return [f"{repo} is Meta's Mask2Former release ported to transformers, not the mmdet "
                "checkpoint GenEval runs: same architecture and rules, other weights"]
    return []


def describe_detectors() -> dict[str, dict]:
    """Each known detector (and the colour model): its repo and whether it is usable offline."""
    out = {"toy": {"repo": "l2s.toy.detector", "available": True}}
    for alias, repo in DETECTOR_ALIASES.items():
        out[alias] = {"repo": repo, "available": detector_available(repo)}
    out["clip-colors"] = {"repo": COLOR_MODEL, "available": detector_available(COLOR_MODEL)}
    return out


__all__ = ["COLOR_MODEL", "DEFAULT_DETECTORS", "DETECTOR_ALIASES", "GENEVAL_RULES", "OWL_RULES",
           "TOY_RULES", "Detector", "DetectorError", "ImageDetections", "ToyDetector",
           "describe_detectors", "detector_available", "detector_notes", "load_detector",
           "toy_detection"]
