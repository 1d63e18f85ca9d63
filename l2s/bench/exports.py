"""A method's bench images in an original harness's own folder layout, beside l2s's.

T2I-CompBench (github.com/Karine-Huang/T2I-CompBench): its scripts read
``OUTPATH/samples/{prompt}_{index:06d}.png`` (``UniDet_eval/2D_spatial_eval.py`` with
``--outpath OUTPATH``, through ``experts/obj_detection/generate_dataset.py``): every entry of
``samples/`` is an image, sorted by the number after the first ``_``; the prompt is the name
before the first ``_`` (its relation word and nouns are read from it); the question id is the
number after the last ``_``. Their own generation script numbers images prompt by prompt from 0,
so image k of prompt i of n per prompt is ``i * n + k``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from l2s.errors import L2SError

COMPBENCH_FOLDER = "compbench"  # <out>/<method>/compbench/samples/: pass <out>/<method>/compbench


class ExportError(L2SError, ValueError):
    """Images cannot be written in a harness's layout; says why."""


def compbench_name(prompt: str, prompt_index: int, image_index: int, num_images: int) -> str:
    """T2I-CompBench's file name of image ``image_index`` of prompt ``prompt_index``."""
    if "_" in prompt or "/" in prompt or os.sep in prompt:
        raise ExportError(f"prompt {prompt!r} holds '_' or '/', which T2I-CompBench's file names "
                          "cannot carry (it reads the prompt as the name before the first '_')")
    return f"{prompt}_{prompt_index * num_images + image_index:06d}.png"


def compbench_samples(out: Path, records: list[dict], num_images: int) -> Path | None:
    """Make ``<out>/<method>/compbench/samples/`` hold exactly the images of ``records`` (one
    method's, GenEval-format file names relative to ``out``) under T2I-CompBench's names: hard
    links to l2s's images (copies where the disk has none); a file there that is not one of
    them is removed, since their script reads every entry. Returns the folder to pass as
    ``--outpath`` (None without records)."""
    if not records:
        return None
    method_dir = {Path(r["filename"]).parts[0] for r in records}
    if len(method_dir) != 1:
        raise ExportError(f"records of several methods ({sorted(method_dir)}) in one export")
    root = out / method_dir.pop() / COMPBENCH_FOLDER
    folder = root / "samples"
    want = {compbench_name(r["prompt"], r["prompt_index"], r["image_index"], num_images):
            out / r["filename"] for r in records}
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.name not in want and not old.is_dir():
            old.unlink()
    for name, source in want.items():
        target = folder / name
        if target.exists() and os.path.samefile(target, source):
            continue
        # made beside samples/ and renamed in: their script never sees a partial file; named
        # per process, as the shards of a run each export at their end
        tmp = root / f".{name}.{os.getpid()}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:  # no hard links on this disk (or across disks): a copy
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return root
