"""A benchmark's files: GenEval's image layout per method, per-image results, resume, shards.

    <out>/config.json                       the settings every resumed run must share
    <out>/<method>/<00042>/metadata.jsonl   GenEval's layout: each <out>/<method> folder is an
    <out>/<method>/<00042>/samples/0000.png imagedir for GenEval's own evaluate_images.py
    <out>/results.jsonl                     one line per scored image (results.shard-I-of-N.jsonl
                                            per shard); GenEval's fields plus method and seed
    <out>/<method>/results.jsonl            that method's images only, in GenEval's record format
                                            (filename relative to <out>/<method>): what GenEval's
                                            summary_scores.py reads as this method's score
    <out>/contact_<method>_<task>.png       contact sheets, paged (-2.png, ...); disagreements.png
    <out>/<method>/compbench/samples/       compbench-spatial: T2I-CompBench's own names
                                            (l2s.bench.exports)

An image is written atomically (a hidden temporary name GenEval's `\\d+\\.png` never matches,
then renamed) with its seed and generation seconds in PNG text chunks, and its result line is
appended and synced as soon as it is scored: a killed run loses at most the images in flight,
and an image saved but not yet scored is scored on resume, not generated again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Collection
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from l2s import locks
from l2s.bench.suites import BenchError
from l2s.inversion.cache import atomic_write, atomic_write_text, writing


def method_folder(method: str) -> str:
    """The folder name of a method's images: the name itself, unless it holds characters a
    folder name cannot (``l2s:path/to/card``), then a readable form plus a short hash of it."""
    if re.fullmatch(r"[A-Za-z0-9._+-]+", method):
        return method
    readable = re.sub(r"[^A-Za-z0-9._+-]+", "_", method).strip("._")[-40:]
    return f"{readable}-{hashlib.sha256(method.encode()).hexdigest()[:8]}"


def prompt_dir(out: Path, method: str, index: int) -> Path:
    return out / method_folder(method) / f"{index:05d}"


def image_path(out: Path, method: str, index: int, image: int) -> Path:
    return prompt_dir(out, method, index) / "samples" / f"{image:04d}.png"


def write_metadata(out: Path, method: str, index: int, metadata: dict) -> None:
    """GenEval's metadata.jsonl: the prompt's metadata as one JSON document (written again
    when deleted or damaged)."""
    path = prompt_dir(out, method, index) / "metadata.jsonl"
    text = json.dumps(metadata) + "\n"
    try:
        if path.read_bytes() == text.encode():
            return
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def save_image(path: Path, image: np.ndarray, seed: int, seconds: float,
               cpu_seconds: float = float("nan"), made_with: dict | None = None) -> None:
    """Write an (H, W, 3) uint8 PNG atomically, its seed, generation (wall, CPU) time and
    ``made_with`` (the text length, classifier and LoRA that made it) in text chunks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("l2s-seed", str(seed))
    info.add_text("l2s-seconds", f"{seconds:.6f}")
    info.add_text("l2s-cpu-seconds", f"{cpu_seconds:.6f}")
    if made_with:
        info.add_text(MADE_WITH_CHUNK, json.dumps(made_with, sort_keys=True))
    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG", pnginfo=info))


MADE_WITH_CHUNK = "l2s-made-with"


def made_with(text: dict[str, str]) -> dict:
    """What a saved image's text chunks say it was made with (``save_image``'s
    ``made_with``: text length, classifier and LoRA); {} for an image of an older l2s."""
    try:
        got = json.loads(text.get(MADE_WITH_CHUNK, "{}"))
    except ValueError:
        return {}
    if not isinstance(got, dict):
        return {}
    return {k: v for k, v in got.items()
            if isinstance(v, str) or (k == "text_len" and type(v) is int)}


def image_text(path: Path) -> dict[str, str]:
    """The text chunks a saved PNG holds before its pixels (``save_image`` writes them
    there), without decoding the pixels."""
    with Image.open(path) as im:
        return {k: v for k, v in im.info.items() if isinstance(v, str)}


def load_image(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    """(H, W, 3) uint8 pixels and the PNG's text chunks."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), dict(getattr(im, "text", {}))


def results_name(shard: tuple[int, int] | None) -> str:
    return "results.jsonl" if shard is None or shard[1] == 1 else \
        f"results.shard-{shard[0]}-of-{shard[1]}.jsonl"


# What summarising and resuming read from a record; a line without them (`null`, `{}`, a
# line cut by a kill or damaged on disk) is dropped and its image scored again.
RECORD_FIELDS = {"filename": str, "tag": str, "score": (int, float), "correct": bool,
                 "method": str, "prompt_index": int, "image_index": int, "n_detections": int}


def record_digest(record: dict) -> str:
    """A short sha256 of a record's fields (all but ``check``, where it is kept): a byte of a
    results line altered on disk that still parses (a score digit) is found by it."""
    rest = {k: v for k, v in record.items() if k != "check"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:16]


def _record(line: bytes) -> dict | None:
    """A results line as a record, or None when it is not one (not UTF-8, not JSON, a field
    missing or of another type, or fields that differ from its ``check`` digest)."""
    try:
        rec = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(rec, dict) or any(
            not isinstance(rec.get(k), t) or (t is int and isinstance(rec.get(k), bool))
            for k, t in RECORD_FIELDS.items()):
        return None
    if "check" in rec and rec["check"] != record_digest(rec):
        return None
    return rec


def read_records(out: Path) -> list[dict]:
    """Every finished record of every results file in `out` (shards merge here); a line that
    is not a whole record (cut by a kill, damaged) is dropped from its file, so that image is
    scored again."""
    records = []
    for path in sorted(out.glob("results*.jsonl")):
        data = path.read_bytes()
        lines = data.splitlines()
        good = [r for r in map(_record, lines) if r is not None]
        if len(good) < len(lines) or (data and not data.endswith(b"\n")):
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in good))
        records += good
    return records


def image_readable(path: Path) -> bool:
    """Whether a saved image is whole: it exists and its PNG chunks check out."""
    try:
        with Image.open(path) as im:
            im.verify()  # every chunk's CRC: finds truncated or altered files without decoding
        return True
    except Exception:  # noqa: BLE001 - any failure to parse means the file is damaged
        return False


def drop_records(out: Path, lost: set[tuple[str, int, int]]) -> None:
    """Remove the records of ``lost`` (method, prompt_index, image_index) images from every
    results file, so they are generated and scored again."""
    for path in sorted(out.glob("results*.jsonl")):
        recs = [r for r in map(_record, path.read_bytes().splitlines()) if r is not None]
        keep = [r for r in recs
                if (r["method"], r["prompt_index"], r["image_index"]) not in lost]
        if len(keep) < len(recs):
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def append_record(path: Path, record: dict) -> None:
    """Append one record and sync it (a line cut by a full disk is dropped on resume)."""
    record = {**record, "check": record_digest(record)}
    with writing(path), path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


GENEVAL_FIELDS = ("filename", "tag", "prompt", "correct", "reason", "metadata", "details")


def write_method_results(out: Path, method: str, records: list[dict]) -> Path:
    """Rewrite <out>/<method>/results.jsonl from the method's records: GenEval's fields only,
    file names relative to the method's image folder, as its evaluate_images.py writes them.
    results.jsonl pools every method (resume reads it), so GenEval's summary_scores.py run on
    it would average plain and steered images into one score."""
    path = out / method_folder(method) / "results.jsonl"
    lines = []
    for r in records:
        rec = {k: r[k] for k in GENEVAL_FIELDS}
        rec["filename"] = Path(r["filename"]).relative_to(method_folder(method)).as_posix()
        lines.append(json.dumps(rec) + "\n")
    atomic_write_text(path, "".join(lines))
    return path


def check_config(out: Path, identity: dict, started: bool = True) -> None:
    """Refuse a folder that holds a run whose identity differs (unless that run has not
    ``started``: no result or image of it exists, so nothing would mix)."""
    path = out / "config.json"
    if path.exists():
        try:
            old = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            old = e
        if not isinstance(old, dict):
            if not started:
                return
            raise BenchError(f"{path} is damaged (not a JSON object of settings), so this run "
                             "cannot check that it continues the same benchmark: pass another "
                             "--out, or delete that folder to start over")
        diff = {k: (old.get(k), v) for k, v in identity.items() if old.get(k) != v}
        if diff and started:
            raise BenchError(f"{out} holds a run with other settings {diff}: pass another --out "
                             "or delete that folder")


def write_config(out: Path, config: dict, identity: dict, started: bool = True) -> None:
    """Write config.json, refusing a folder that holds a run whose identity differs."""
    check_config(out, identity, started)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(config, indent=2))


def has_images(out: Path) -> bool:
    """Whether any method's image is saved in ``out``."""
    return next(out.glob("*/*/samples/*.png"), None) is not None


def settings_digest(identity: dict) -> str:
    """A short digest of a run's identity: each record carries it. Numbers count by value,
    as config.json's check compares them (``--steer-until 2`` from a file is ``2.0`` from the
    command line)."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    return hashlib.sha256(json.dumps(plain(identity), sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]


def check_records(out: Path, records: list[dict], made: dict, config_checked: bool,
                  also: Collection[str] = ()) -> None:
    """Refuse results made with other settings than ``made`` ({"settings": digest, "steps",
    "guidance"}; ``also``: other digests of the same settings, written otherwise). Records of
    an older l2s carry no digest: config.json vouches for them, and without it (deleted) they
    cannot be trusted to match."""
    other = [r for r in records if r.get("settings", None if config_checked else "?")
             not in (None, made["settings"], *also)]
    if not other:
        return
    said = {k: sorted({str(r.get(k, "?")) for r in other}) for k in ("steps", "guidance")}
    diff = [f"{k} {', '.join(v)} (this run: {made[k]})" for k, v in said.items()
            if v != [str(made[k])]]
    what = f" ({'; '.join(diff)})" if diff else ""
    gone = "" if config_checked else ", and its config.json, which records them, is gone"
    raise BenchError(f"{out} holds {len(other)} results made with other settings{what}{gone}: "
                     "rerun with the settings of that run, pass another --out, or delete that "
                     "folder to start over")


def lock_path(out: Path, shard: tuple[int, int] | None) -> Path:
    """The lock file of one shard's run in ``out``."""
    return out / f".{results_name(shard).removesuffix('.jsonl')}.lock"


@contextmanager
def holding(out: Path, shard: tuple[int, int] | None):
    """Hold ``out``'s lock of this shard for the body (another live process holding it: a
    LockError naming it); folders made for the lock alone are removed again when nothing
    was written into them (a run that could not load)."""
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        with locks.exclusive(lock_path(out, shard), "l2s bench"
                             + (f" of shard {shard[0]}/{shard[1]}" if shard else ""), out):
            yield
    finally:
        for p in made:  # deepest first
            try:
                p.rmdir()
            except OSError:
                break
