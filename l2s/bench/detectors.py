"""Detectors behind one interface, and their registry (`--detector`).

A detector turns an image and the object names a prompt mentions into raw `Detection`s (plus
instance masks where it has them, for the colour classifier) and carries the thresholds its
scores need (`rules`). The transformers ones registered here, the suites using each by
default, and their thresholds (a family's world registers the detector its suites score
with; other packages list theirs under the ``l2s.detectors`` entry-point group):

| name (`--detector`) | model | used by | rules |
|---|---|---|---|
| mask2former | facebook/mask2former-swin-small-coco-instance | geneval*, multirel | 0.3 / 0.9 |
| owlv2 | google/owlv2-base-patch16-ensemble | compbench-spatial | 0.1 (OWLv2's own default) |

A hub id or a local folder is read by its config's model_type (mask2former, owlv2, owlvit).
The transformers adapters live in l2s.bench.hf_detectors and load only when asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from l2s.bench.detection import OWL_RULES, DetectorError, ImageDetections
from l2s.bench.geneval import GENEVAL_RULES, Rules
from l2s.engine.registry import Registry

# Aliases of --detector: the transformers models the suites score with by default.
DETECTOR_ALIASES = {
    "mask2former": "facebook/mask2former-swin-small-coco-instance",
    "owlv2": "google/owlv2-base-patch16-ensemble",
}
COLOR_MODEL = "openai/clip-vit-large-patch14"  # GenEval's CLIP ViT-L/14 (OpenAI weights)


class Detector(Protocol):
    name: str  # what --detector resolved to, written into results
    rules: Rules  # thresholds for GenEval's decision rules
    open_vocabulary: bool  # whether `names` are free text queries (else a fixed label set)

    def detect(self, image: np.ndarray, names: Sequence[str]) -> ImageDetections:
        """Detections in an (H, W, 3) uint8 image; `names` are the objects the prompt mentions
        (an open-vocabulary detector queries them; a closed one may return other classes)."""
        ...


@dataclass(frozen=True)
class RegisteredDetector:
    """A detector `--detector` names: how it loads and where it comes from."""

    name: str  # what --detector names
    load: Callable[[str | None], Detector]  # device (None: the default) -> the detector
    repo: str  # where it comes from (hub id or module), for `l2s doctor`
    available: Callable[[], bool] = lambda: True  # loads with no network (default: shipped)


DETECTOR_REGISTRY: Registry[RegisteredDetector] = Registry("detector", "l2s.detectors")


def register_detector(detector: RegisteredDetector) -> None:
    """Make a detector known to `--detector` (a module calls this at import)."""
    DETECTOR_REGISTRY.register(detector.name, detector)


def load_detector(name: str, device: str | None = None) -> Detector:
    """`--detector`: a registered name (an alias of DETECTOR_ALIASES, a world's detector), a
    hub id or a local folder."""
    registered = DETECTOR_REGISTRY.get(name)
    if registered is not None:
        return registered.load(device)
    from l2s.bench.hf_detectors import load_hf_detector

    return load_hf_detector(name, device)


def _hf_available(repo: str) -> bool:
    from l2s.bench.hf_detectors import hf_model_available

    return hf_model_available(repo)


def detector_available(name: str) -> bool:
    """Whether a detector loads with no network (shipped, a local folder or in the HF cache)."""
    registered = DETECTOR_REGISTRY.get(name)
    return registered.available() if registered is not None else _hf_available(name)


def _hf(alias: str, repo: str) -> RegisteredDetector:
    def load(device: str | None) -> Detector:
        from l2s.bench.hf_detectors import load_hf_detector

        return load_hf_detector(repo, device)

    return RegisteredDetector(alias, load, repo, lambda: _hf_available(repo))


for _alias, _repo in DETECTOR_ALIASES.items():
    register_detector(_hf(_alias, _repo))


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
    out = {name: {"repo": d.repo, "available": d.available()}
           for name, d in DETECTOR_REGISTRY.all().items()}
    out["clip-colors"] = {"repo": COLOR_MODEL, "available": detector_available(COLOR_MODEL)}
    return out


__all__ = ["COLOR_MODEL", "DETECTOR_ALIASES", "DETECTOR_REGISTRY", "GENEVAL_RULES", "OWL_RULES",
           "Detector", "DetectorError", "ImageDetections", "RegisteredDetector",
           "describe_detectors", "detector_available", "detector_notes", "load_detector",
           "register_detector"]
