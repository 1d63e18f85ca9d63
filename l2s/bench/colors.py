"""CLIP colour classification for GenEval's colour tasks: not built yet (issue 14 is open)."""

from __future__ import annotations

from l2s.bench.detectors import DetectorError
from l2s.bench.hf_detectors import NOT_BUILT


class ClipColors:
    """Placeholder that refuses with a clear message (no colour is ever guessed)."""

    @classmethod
    def load(cls, name: str):
        raise DetectorError(f"cannot load colour model {name!r}: {NOT_BUILT}")
