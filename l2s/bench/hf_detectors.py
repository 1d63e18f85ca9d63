"""transformers detectors for the GenEval / CompBench suites: not built yet (issue 14 is open).

Planned: Mask2Former (facebook/mask2former-swin-small-coco-instance, boxes from the instance
masks) and OWLv2 through transformers. Until then every real-model suite is refused up front
with this module's DetectorError, before anything is generated.
"""

from __future__ import annotations

from l2s.bench.detectors import DetectorError

NOT_BUILT = ("the transformers detectors (Mask2Former, OWLv2) are not built into this version "
             "of l2s yet, so suites geneval, geneval-position, compbench-spatial and multirel "
             "cannot be scored; use --suite shapes or shapes-multi with --detector toy, or score "
             "the saved images with GenEval's own evaluate_images.py (the output folder uses "
             "its layout)")


def load_hf_detector(name: str, device: str | None = None):
    """Refuses: see NOT_BUILT."""
    raise DetectorError(f"cannot load detector {name!r}: {NOT_BUILT}")


def hf_model_available(name: str) -> bool:
    """No transformers detector can be used yet, cached or not."""
    return False
