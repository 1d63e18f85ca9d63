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
several processes can do at once. An entry that fails to load or has the wrong shape is
deleted and reported, and the job that wanted it rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


class CacheError(RuntimeError):
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


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """``write(tmp)`` into a temp file beside ``path``, then rename it into place: readers
    and interrupted runs never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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

    def __init__(self, root: str | Path | None, fingerprint: str) -> None:
        self.root = Path(root) if root else default_cache_dir()
        self.fingerprint = fingerprint
        self.dir = self.root / fingerprint
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / ".write-probe"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise CacheError(f"cache folder {self.dir} is not writable ({e.strerror}): pass "
                             "--cache-dir to a writable folder") from e
        self.manifest_path = self.dir / "manifest.jsonl"
        self.corrupt: list[str] = []  # keys found broken and deleted during this session

    # --- paths ---------------------------------------------------------------------------
    def map_path(self, key: str) -> Path:
        return self.dir / "maps" / key[:2] / f"{key}.safetensors"

    def latent_path(self, key: str) -> Path:
        return self.dir / "latents" / key[:2] / f"{key}.safetensors"

    # --- maps ----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return self.map_path(key).exists()

    def put(self, key: str, maps: torch.Tensor, meta: dict) -> None:
        """Store an entry atomically, then list it in the manifest."""
        if maps.ndim != 5 or maps.shape[1] != 2:
            raise ValueError(f"maps must be (T, 2, C, S, S), got {tuple(maps.shape)}")
        meta = {**meta, "key": key, "shape": list(maps.shape)}
        _atomic_save({"maps": maps.detach().to(torch.float16).cpu()}, self.map_path(key), meta)
        line = (json.dumps({k: meta[k] for k in MANIFEST_FIELDS if k in meta}) + "\n").encode()
        fd = os.open(self.manifest_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line)  # one write per line: concurrent appenders never interleave
        finally:
            os.close(fd)

    def _read(self, path: Path, name: str, key: str) -> tuple[torch.Tensor, dict] | None:
        """(tensor, metadata) of a cache file; None if absent. A file that fails to load or
        whose tensor disagrees with its recorded shape is deleted and its key recorded."""
        if not path.exists():
            return None
        try:
            tensor = load_file(path)[name]
            with safe_open(path, "pt") as f:
                meta = json.loads(f.metadata()["l2s"])
            if list(tensor.shape) != meta["shape"] or meta.get("key", key) != key:
                raise ValueError(f"shape {list(tensor.shape)} != recorded {meta['shape']} "
                                 "or the file belongs to another key")
        except (SafetensorError, OSError, ValueError, KeyError, TypeError,
                json.JSONDecodeError):
            path.unlink(missing_ok=True)
            self.corrupt.append(key)
            return None
        return tensor, meta

    def get(self, key: str) -> Entry | None:
        """The entry, or None if absent; a corrupt entry is deleted, recorded and None."""
        got = self._read(self.map_path(key), "maps", key)
        return None if got is None else Entry(key, *got)

    def manifest(self) -> list[dict]:
        """Manifest records of entries whose files exist (last line per key wins)."""
        if not self.manifest_path.exists():
            return []
        rows: dict[str, dict] = {}
        for line in self.manifest_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["key"]] = row
        return [r for k, r in rows.items() if self.map_path(k).exists()]

    def entries(self) -> Iterator[Entry]:
        """Every readable entry listed in the manifest (corrupt ones are dropped)."""
        for row in self.manifest():
            e = self.get(row["key"])
            if e is not None:
                yield e

    # --- latents -------------------------------------------------------------------------
    def put_latents(self, key: str, latents: torch.Tensor, meta: dict) -> None:
        """One image's inverted DDIM trajectory (steps, C, h, w), stored as fp16."""
        _atomic_save({"latents": latents.detach().to(torch.float16).cpu()}, self.latent_path(key),
                     {**meta, "key": key, "shape": list(latents.shape)})

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


# What the manifest lists of each entry (enough to select and split without opening files).
MANIFEST_FIELDS = ("key", "source", "source_id", "split", "relation", "prompt_relation",
                   "polarity", "subject", "object", "image_hash", "psnr", "shape")
