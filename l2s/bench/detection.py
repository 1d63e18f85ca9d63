"""What every detector returns and raises: `ImageDetections` (detections plus instance masks),
`DetectorError`, and OWLv2's thresholds; imported by the detector registry
(`l2s.bench.detectors`) and the transformers adapters (`l2s.bench.hf_detectors`) alike."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from l2s.bench.geneval import Detection, Rules
from l2s.errors import L2SError

# OWLv2 sigmoid scores sit far lower than Mask2Former's: 0.1 is the threshold of its own
# post-processing and model card (CompBench's UniDet used 0.5 on its own scale).
OWL_RULES = Rules(threshold=0.1, counting_threshold=0.1)


class DetectorError(L2SError, ValueError):
    """A detector cannot be found or loaded; says what to do."""


@dataclass(eq=False)
class ImageDetections:
    """What a detector found in one image."""

    detections: list[Detection]
    # (H, W) bool instance mask per detection, None where the detector gives boxes only
    masks: list[np.ndarray | None] = field(default_factory=list)

    def mask_of(self, det: Detection) -> np.ndarray | None:
        for d, m in zip(self.detections, self.masks, strict=False):
            if d is det:
                return m
        return None
