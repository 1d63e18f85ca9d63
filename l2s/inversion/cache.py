"""Content-addressed on-disk cache of inverted latents and recorded attention maps.

Layout, per backbone fingerprint:

    <cache_dir>/<fingerprint>/maps/<key[:2]>/<key>.safetensors     one (image, prompt) entry
    <cache_dir>/<fingerprint>/latents/<key[:2]>/<key>.safetensors  one image's inverted latents
    <cache_dir>/<fingerprint>/manifest.jsonl                       one line per map entry

A map entry holds ``maps`` (T, 2, C, S, S) fp16 -- subject and object maps at T recorded
timesteps, C = layers x heads -- and its metadata (relation, pos/neg, source, PSNR, timesteps,
layer names) in the safetensors header, so the file alone is self-describing. Writes go to a
temporary file in the same folder and are renamed into place, so a crash or a full disk never
leaves a half-written entry; manifest lines are appended with one O_APPEND write each, which
several processes can do at once.

The cache repairs itself. An entry is trusted only after its content checks out (safetensors
header, recorded shape and key, finite values, the sha256 of its tensor and the sha256 of its
metadata, both recorded at write time); one that fails is deleted and reported, and the job
that wanted it rebuilds it. The manifest is an index, not the truth: entries on disk that it
does not list (it was truncated, zeroed or deleted) are read back into it, lines of missing or
broken entries, duplicates and garbage are dropped, and the file is rewritten. Processes
sharing a cache claim the images they work on (``claims/<key>``), so two `l2s invert` runs
split the work instead of both doing all of it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from l2s import locks
from l2s.errors import L2SError, WriteError, is_write_failure, write_failed


class CacheError(L2SError, RuntimeError):
    """The cache folder cannot be used as asked."""


def default_cache_dir() -> Path:
    """$L2S_CACHE_DIR, else $XDG_CACHE_HOME/l2s, else ~/.cache/l2s."""
    if os.environ.get("L2S_CACHE_DIR"):
        return Path(os.environ["L2S_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "l2s"


def content_key(*parts) -> str:
    """sha256 over the JSON of the parts: the address of an entry."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def image_hash(array) -> str:
    """Hash of an image's pixels and shape (not its file name)."""
    import numpy as np

    a = np.ascontiguousarray(array)
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()[:32]


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


TEMP_PREFIX = ".tmp-"
OTHER_HOST_TEMP_S = 3600.0  # another machine's temp file older than this: its writer is gone


def temp_prefix() -> str:
    """The name prefix of this process's temp files: ``.tmp-HOST+PID+START+``, so a later run
    can tell the leftovers of a killed writer (``remove_dead_temp_files``)."""
    host, pid, start = locks.owner_text().split()
    return f"{TEMP_PREFIX}{host}+{pid}+{start}+"


def remove_dead_temp_files(folder: Path) -> int:
    """Delete the temp files under ``folder`` whose writer is gone (killed between writing
    and renaming: never read, only litter): on this machine when its process is gone, from
    another machine after an hour, unnamed ones (older l2s) after an hour. Returns how many."""
    removed = 0
    for path in Path(folder).rglob(TEMP_PREFIX + "*"):
        parts = path.name[len(TEMP_PREFIX):].split("+")
        try:
            age = time.time() - path.stat().st_mtime
            if len(parts) >= 4 and parts[1].isdigit():
                h = locks.Holder(parts[0], int(parts[1]), parts[2], age)
                gone = locks.is_gone(h) if h.here else age > OTHER_HOST_TEMP_S
            else:
                gone = age > OTHER_HOST_TEMP_S
            if gone and path.is_file():
                path.unlink()
                removed += 1
        except OSError:
            continue  # gone meanwhile, or not ours to delete
    return removed


def file_mode() -> int:
    """The mode an ordinary ``open`` gives a new file: 0666 less the umask."""
    return 0o666 & ~_umask()


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """``write(tmp)`` into a temp file beside ``path``, then rename it into place: readers
    and interrupted runs never see a half-written file. The file gets the mode an ordinary
    ``open`` would give it (0666 less the umask), not mkstemp's owner-only 0600, so a shared
    cache or another user's evaluation can read it."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(), suffix=path.suffix)
        os.close(fd)
        try:
            write(tmp)
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


@contextmanager
def writing(path: str | Path):
    """Turn a full or read-only disk met while writing ``path`` into a one-line WriteError
    naming the file and its folder (other errors pass through)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        if not is_write_failure(e):
            raise
        raise write_failed(e, path) from None
    except SafetensorError as e:  # safetensors reports a failed write as its own error
        if "No space left" not in str(e) and "Read-only" not in str(e):
            raise
        raise write_failed(OSError(errno.ENOSPC if "space" in str(e) else errno.EROFS,
                                   str(e)), path) from None


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` (UTF-8) into ``path`` through ``atomic_write``: never half-written."""
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def finite_json(obj):
    """``obj`` with every NaN or infinite float as None: what ``json.dumps`` writes is then
    valid JSON (it writes NaN, which JSON does not have, e.g. a p_target of a NaN loss)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (as stored: contiguous, on the CPU)."""
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                          ).hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()},
                                             tmp, metadata={"l2s": json.dumps(metadata)}))


@dataclass(frozen=True)
class Entry:
    """A cached (image, prompt) sample: maps (T, 2, C, S, S) and their metadata."""

    key: str
    maps: torch.Tensor
    meta: dict


class AttentionCache:
    """The cache of one backbone (by fingerprint) under a cache folder."""

    def __init__(self, root: str | Path | None, fingerprint: str, *,
                 readable_only: bool = False) -> None:
        """``readable_only``: a folder that exists but cannot be written (a read-only mount, a
        shared cache of another user) is opened for reading (``self.read_only``): broken
        entries are skipped instead of deleted, the manifest is not rewritten. Otherwise an
        unwritable folder is refused."""
        self.root = Path(root) if root else default_cache_dir()
        self.fingerprint = fingerprint
        self.dir = self.root / fingerprint
        self.read_only = False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".write-probe"
            try:
                probe.write_text("ok")
            finally:  # a full disk creates the file, then fails the write: none left behind
                probe.unlink(missing_ok=True)
        except OSError as e:
            file = next((a for a in self.dir.parents if a.is_file()), None)
            if file is not None:
                raise CacheError(f"cache folder {self.root}: {file} is a file, not a folder: "
                                 "pass another --cache-dir (or $L2S_CACHE_DIR)") from e
            if not (readable_only and self.dir.is_dir()):
                raise CacheError(f"cache folder {self.dir} is not writable ({e.strerror}): "
                                 "pass --cache-dir to a writable folder") from e
            self.read_only = True
        self.manifest_path = self.dir / "manifest.jsonl"
        self.corrupt: list[str] = []  # keys found broken during this session (deleted, but
        self.kept: list[str] = []  # these of them, which could not be: read-only, not ours)
        self._verified: set[str] = set()  # keys whose content checked out in this session
        self._claims: set[str] = set()  # claims this object holds

    # --- paths ---------------------------------------------------------------------------
    def map_path(self, key: str) -> Path:
        return self.dir / "maps" / key[:2] / f"{key}.safetensors"

    def latent_path(self, key: str) -> Path:
        return self.dir / "latents" / key[:2] / f"{key}.safetensors"

    # --- maps ----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        """Whether a sound entry exists: its content is checked (once per session); a broken
        one is deleted and recorded, so the caller rebuilds it."""
        if key in self._verified:
            return True
        return self._read(self.map_path(key), "maps", key) is not None

    def put(self, key: str, maps: torch.Tensor, meta: dict) -> None:
        """Store an entry atomically, then list it in the manifest."""
        if maps.ndim != 5 or maps.shape[1] != 2:
            raise ValueError(f"maps must be (T, 2, C, S, S), got {tuple(maps.shape)}")
        maps = maps.detach().to(torch.float16).cpu().contiguous()
        meta = sealed({**meta, "key": key, "shape": list(maps.shape),
                       "sha256": tensor_sha256(maps)})
        _atomic_save({"maps": maps}, self.map_path(key), meta)
        self._verified.add(key)
        self._append(meta)

    def _append(self, meta: dict) -> None:
        line = (json.dumps({k: meta[k] for k in MANIFEST_FIELDS if k in meta}) + "\n").encode()
        with writing(self.manifest_path):
            fd = os.open(self.manifest_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, line)  # one write per line: concurrent appenders never interleave
            finally:
                os.close(fd)

    def _read(self, path: Path, name: str, key: str) -> tuple[torch.Tensor, dict] | None:
        """(tensor, metadata) of a cache file; None if absent. A file whose content does not
        check out (see ``check_entry``) is deleted and its key recorded."""
        if not path.exists():
            return None
        try:
            tensor = load_file(path)[name]
            with safe_open(path, "pt") as f:
                meta = json.loads(f.metadata()["l2s"])
            check_entry(tensor, meta, key)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError):
            self._discard(path, key)
            self.corrupt.append(key)
            self._verified.discard(key)
            return None
        self._verified.add(key)
        return tensor, meta

    def _discard(self, path: Path, key: str) -> None:
        """Delete a broken cache file, so the caller rebuilds it; in a cache this process may
        not change (read-only, or the file of another user) it stays, listed in ``kept``."""
        if not self.read_only:
            try:
                path.unlink(missing_ok=True)
                return
            except OSError:
                pass
        self.kept.append(key)

    def get(self, key: str) -> Entry | None:
        """The entry, or None if absent; a corrupt entry is deleted, recorded and None."""
        got = self._read(self.map_path(key), "maps", key)
        return None if got is None else Entry(key, *got)

    def manifest(self) -> list[dict]:
        """Manifest records of the sound entries on disk, one per key (the last line wins).

        Repairs as it reads: entries on disk that no line lists are read back in, lines of
        missing entries, duplicates and unreadable lines are dropped, and then the file is
        rewritten. Entries written meanwhile by another process are still on disk, so a
        later call lists them again.
        """
        rows, dirty = self._manifest_lines()
        on_disk = {p.stem for p in (self.dir / "maps").glob("*/*.safetensors")}
        for key in sorted(on_disk - rows.keys()):
            got = self._read(self.map_path(key), "maps", key)
            if got is not None:
                rows[key] = {k: got[1][k] for k in MANIFEST_FIELDS if k in got[1]}
            dirty = True
        for key in rows.keys() - on_disk:
            del rows[key]
            dirty = True
        if dirty and not self.read_only:
            text = "".join(json.dumps(r) + "\n" for r in rows.values())
            atomic_write_text(self.manifest_path, text)
        return list(rows.values())

    def _manifest_lines(self) -> tuple[dict[str, dict], bool]:
        """(key -> record, whether the file needs rewriting) from the manifest as it is."""
        try:
            raw = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return {}, False
        rows: dict[str, dict] = {}
        dirty = False
        for line in raw.splitlines():
            try:
                row = json.loads(line.decode("utf-8"))
                key = row["key"]
                if not isinstance(key, str):
                    raise TypeError(key)
            except (ValueError, KeyError, TypeError):  # garbage, zeroed or torn lines
                dirty = True
                continue
            dirty = dirty or key in rows
            rows[key] = row
        return rows, dirty

    # --- which sources an invert run finished ---------------------------------------------
    def begin_source(self, source: str) -> None:
        """Mark ``source`` as being inverted (until ``end_source``): a killed run leaves the
        mark, so `l2s train --data SOURCE` knows to resume it."""
        with writing(self.dir / f"inverting-{source}"):
            (self.dir / f"inverting-{source}").write_text(locks.owner_text())

    def end_source(self, source: str) -> None:
        (self.dir / f"inverting-{source}").unlink(missing_ok=True)

    def sources_to_invert(self, sources) -> list[str]:
        """Those of ``sources`` the cache holds no entry of, or whose last invert was cut off."""
        have = {r.get("source") for r in self.manifest()}
        return [s for s in sources
                if s not in have or (self.dir / f"inverting-{s}").exists()]

    # --- claims: processes sharing a cache split the work --------------------------------
    def claim(self, key: str) -> bool:
        """Take the work on ``key`` (an image's latent key) unless another live process has;
        a claim left by a process that is gone is taken over (``l2s.locks``: at once on this
        machine, after ten minutes without its heartbeat from another)."""
        if locks.take(self.dir / "claims" / key) is not None:
            return False
        self._claims.add(key)
        return True

    def release(self, key: str) -> None:
        if key in self._claims:
            locks.release(self.dir / "claims" / key)
            self._claims.discard(key)

    def writers(self) -> list[str]:
        """The processes writing into this cache now (``writers``)."""
        return writers(self.dir)

    def entries(self) -> Iterator[Entry]:
        """Every readable entry listed in the manifest (corrupt ones are dropped)."""
        for row in self.manifest():
            e = self.get(row["key"])
            if e is not None:
                yield e

    # --- latents -------------------------------------------------------------------------
    def put_latents(self, key: str, latents: torch.Tensor, meta: dict) -> None:
        """One image's inverted DDIM trajectory (steps, C, h, w), stored as fp16."""
        latents = latents.detach().to(torch.float16).cpu().contiguous()
        _atomic_save({"latents": latents}, self.latent_path(key),
                     sealed({**meta, "key": key, "shape": list(latents.shape),
                             "sha256": tensor_sha256(latents)}))

    def get_latents(self, key: str) -> tuple[torch.Tensor, dict] | None:
        """(latents, metadata) of an image, or None if absent or corrupt (then deleted)."""
        return self._read(self.latent_path(key), "latents", key)

    # --- stats ---------------------------------------------------------------------------
    def stats(self) -> dict:
        """Counts per source, relation, polarity and split, and bytes on disk."""
        rows = self.manifest()
        size = sum(p.stat().st_size for p in self.dir.rglob("*.safetensors"))
        return {
            "fingerprint": self.fingerprint,
            "dir": str(self.dir),
            "entries": len(rows),
            "images": len({r.get("image_hash") for r in rows}),
            "by_source": dict(Counter(r.get("source") for r in rows)),
            "by_relation": dict(Counter(r.get("relation") for r in rows)),
            "by_polarity": dict(Counter(r.get("polarity") for r in rows)),
            "by_split": dict(Counter(r.get("split") for r in rows)),
            "bytes": size,
        }


def writers(folder: Path) -> list[str]:
    """The processes writing into a backbone's cache folder now, as ``pid N (on HOST)``: the
    live holders of its claims and of its sources' inverting marks (this process excluded).
    Reads only: a read-only cache has none."""
    me = (socket.gethostname(), os.getpid())
    paths = [*folder.glob("inverting-*"), *folder.glob("claims/*")]
    live = {str(h) for h in map(locks.holder, paths)
            if h is not None and (h.host, h.pid) != me and not locks.is_gone(h)}
    return sorted(live)


def meta_sha256(meta: dict) -> str:
    """sha256 of an entry's metadata (all but this digest itself), as JSON with sorted keys."""
    rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def sealed(meta: dict) -> dict:
    """``meta`` with its own sha256: a flipped byte in an entry's header (a relation, an
    image_hash digit) is then found like a flipped byte in its tensor."""
    meta = json.loads(json.dumps(meta))  # the digest covers what a reader will load
    return {**meta, "meta_sha256": meta_sha256(meta)}


def check_entry(tensor: torch.Tensor, meta: dict, key: str) -> None:
    """Raise ValueError unless a loaded entry is what was written: its recorded key and shape,
    finite values, and (entries written since checksums were recorded) the sha256 of its
    tensor and of its metadata."""
    if not isinstance(meta, dict):
        raise ValueError("the header holds no metadata object")
    if "meta_sha256" in meta and meta_sha256(meta) != meta["meta_sha256"]:
        raise ValueError("metadata differs from its recorded sha256")
    if meta.get("key", key) != key:
        raise ValueError(f"the file holds key {meta.get('key')}, not {key}")
    if list(tensor.shape) != meta["shape"]:
        raise ValueError(f"shape {list(tensor.shape)} != recorded {meta['shape']}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("non-finite values")
    if "sha256" in meta and tensor_sha256(tensor) != meta["sha256"]:
        raise ValueError("content differs from its recorded sha256")


# What the manifest lists of each entry (enough to select and split without opening files).
MANIFEST_FIELDS = ("key", "source", "source_id", "split", "relation", "prompt_relation",
                   "polarity", "subject", "object", "image_hash", "psnr", "shape")
