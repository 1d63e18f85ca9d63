"""`World`: what a closed-vocabulary family's models draw and how their images are judged."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from l2s.relations import Triplet


@dataclass(frozen=True)
class World:
    """What a closed-vocabulary family's models draw, and how their images are judged.

    Attached to presets (``Preset.world``) and to the loaded backbone (``Denoiser.world``):
    steer's "achieved", ``--verify``, bench's refusals and its per-image extras ask it, never
    a family or detector name. An open-vocabulary model has none.
    """

    name: str  # e.g. "toy"
    objects: tuple[str, ...]  # the object words its models can draw (steer refuses others)
    # (N, H, W, 3) uint8 images, each image's triplets -> whether each shows all of them
    judge: Callable[[np.ndarray, Sequence[Sequence[Triplet]]], list[bool]]
    judged_by: str = ""  # how reports name the judge ("toy detector")
    description: str = ""  # what its models draw, for refusals ("six coloured shapes")
    suites: tuple[str, ...] = ()  # its benchmark suites (bench refuses others for its models)
    sources: tuple[str, ...] = ()  # its inversion data sources
    detector: str | None = None  # the detector its suites score with
    # bench fields per image: (object names, kept detections by class, image side) -> dict
    extras: Callable[[Sequence[str], dict, int], dict] | None = None
