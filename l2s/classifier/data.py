"""Cached attention maps in memory for training: every sample of a backbone, and the image split.

``load_maps`` reads every cache entry `l2s invert` wrote for a backbone (checking each entry's
metadata and that all entries agree in shape, timesteps and layers) into one float16 tensor;
``split_images`` splits by image, never by sample (an image's true- and wrong-caption
recordings stay on one side), by a seeded hash of its image_hash or by the split its source
recorded.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from l2s.errors import L2SError
from l2s.relations import RELATIONS

SPLITS = ("train", "val", "test")
SPLIT_MODES = ("hash", "recorded")
# Metadata every map entry must carry for training (written by `l2s invert`).
REQUIRED_META = ("relation", "polarity", "image_hash", "timesteps", "layers", "heads")


class TrainError(L2SError, ValueError):
    """Training cannot run on this data or with these settings; the message says what to do."""



@dataclass
class MapData:
    """Every training sample in memory: one per (entry, recorded timestep)."""

    maps: torch.Tensor  # (N, 2, C, S, S) float16
    t: torch.Tensor  # (N,) long: diffusion timestep of each sample
    y: torch.Tensor  # (N,) long: index of the true relation
    neg: torch.Tensor  # (N,) bool: recorded under a wrong-relation caption
    prompt_y: torch.Tensor  # (N,) long: index of the caption's relation
    image: list[str]  # (N,) image_hash of each sample
    split: list[str]  # (N,) split recorded by the source ("" if none)
    source: list[str]  # (N,) source of each sample
    timesteps: list[int]  # the recorded timesteps, in recording order
    layers: list[dict]  # [{"name", "heads"}] of the recorded layers
    cache_dir: str  # the cache folder of this backbone they were read from
    corrupt: list[str] = field(default_factory=list)  # keys of broken entries found on reading
    corrupt_kept: list[str] = field(default_factory=list)  # those left in place (read-only)
    t_input: torch.Tensor | None = None  # (N,) the network's time input, when not t itself
    # Text keys every map was softmaxed over (recorded by `l2s invert`); None: unknown (some
    # entries were written before l2s recorded it)
    text_len: int | None = None


def _fail_empty(root: Path, name: str, fingerprint: str, model: str) -> TrainError:
    others = []
    for settings in sorted(root.glob("*/settings.json")):
        try:
            s = json.loads(settings.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if settings.parent.name != fingerprint:
            others.append(f"{s.get('model')} ({settings.parent.name})")
    hint = (f"; the cache holds maps of {', '.join(others)} (a different model, weights or "
            "dtype gives a different fingerprint)" if others else "")
    return TrainError(f"no cached maps for {name} ({fingerprint}) in {root}: run "
                      f"`l2s invert --model {model}` first{hint}")


def _looks_like_cache(root: Path) -> bool:
    """Empty, or holding a folder `l2s invert` or `l2s train` wrote."""
    children = [c for c in root.iterdir() if not c.name.startswith(".")]
    return not children or any(
        c.name == "classifiers" or (c / "manifest.jsonl").exists() or (c / "settings.json").exists()
        for c in children)


def load_maps(cache_dir: str | Path | None, fingerprint: str, *, name: str, model: str,
              layers: Sequence[dict] | None = None, sources: Sequence[str] = ()) -> MapData:
    """Read every cache entry of a backbone (optionally only some sources) into memory.

    Everything is held as float16: T x 2 x C x S x S x 2 bytes per entry (SD2.1, 6 timesteps:
    1.2 MB; 20k entries: ~24 GB), which keeps the epochs free of disk reads.
    """
    from l2s.inversion.cache import AttentionCache, default_cache_dir

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if root.exists() and not root.is_dir():
        raise TrainError(f"cache folder {root} is a file, not a folder: pass the --cache-dir "
                         "`l2s invert` wrote")
    if not root.is_dir():
        raise TrainError(f"cache folder {root} does not exist: run `l2s invert --model {model}` "
                         "first, or pass the --cache-dir it wrote")
    if not (root / fingerprint / "maps").is_dir():
        if not _looks_like_cache(root):
            raise TrainError(f"{root} is not an l2s attention cache (no <fingerprint>/"
                             "manifest.jsonl inside): pass the --cache-dir `l2s invert` wrote")
        raise _fail_empty(root, name, fingerprint, model)
    cache = AttentionCache(root, fingerprint, readable_only=True)  # reading is enough
    rows = cache.manifest()
    if sources:
        have = Counter(r.get("source") for r in rows)
        rows = [r for r in rows if r.get("source") in sources]
        if not rows:
            raise TrainError(f"no cached maps of source(s) {', '.join(sources)} for {name} in "
                             f"{cache.dir}: it holds {dict(have)}; run `l2s invert --model "
                             f"{model} --data {sources[0]}` or choose --data among those")
    if not rows:
        raise _fail_empty(root, name, fingerprint, model)

    buf: torch.Tensor | None = None
    ts_list: list[int] = []
    t, y, neg, prompt_y, image, split, source = [], [], [], [], [], [], []
    layer_list: list[dict] | None = None
    shapes: Counter = Counter()
    text_lens: Counter = Counter()
    n = 0
    for row in rows:
        e = cache.get(row["key"])
        if e is None:
            continue
        meta = e.meta
        missing = [k for k in REQUIRED_META if k not in meta]
        if missing:
            raise TrainError(f"cache entry {e.key} in {cache.dir} lacks {missing}: it was not "
                             "written by `l2s invert` (or by an older version); delete it or "
                             f"rebuild with `l2s invert --model {model}`")
        for k in ("relation", "prompt_relation"):
            if meta.get(k, meta["relation"]) not in RELATIONS:
                raise TrainError(f"cache entry {e.key} has {k} {meta[k]!r}, which the "
                                 f"classifier cannot learn (classes: {', '.join(RELATIONS)}): "
                                 "remove that source's non-directional samples")
        if meta["polarity"] not in ("pos", "neg"):
            raise TrainError(f"cache entry {e.key} has polarity {meta['polarity']!r}, not pos "
                             f"or neg: rebuild it with `l2s invert --model {model}`")
        shape = tuple(e.maps.shape)
        entry_layers = [{"name": a, "heads": h} for a, h in zip(meta["layers"], meta["heads"],
                                                                  strict=True)]
        shapes[(shape, tuple(meta["timesteps"]), json.dumps(entry_layers))] += 1
        if buf is None:
            buf = torch.empty((len(rows),) + shape, dtype=torch.float16)
            ts_list, layer_list = [int(s) for s in meta["timesteps"]], entry_layers
        if len(shapes) > 1:
            continue  # keep counting variants, to report them all at once
        buf[n] = e.maps
        n += 1
        text_lens[meta.get("text_len")] += 1
        polarity = meta["polarity"]
        k = shape[0]
        t.extend(ts_list)
        y.extend([RELATIONS.index(meta["relation"])] * k)
        neg.extend([polarity == "neg"] * k)
        prompt_y.extend([RELATIONS.index(meta.get("prompt_relation", meta["relation"]))] * k)
        image.extend([meta["image_hash"]] * k)
        split.extend([meta.get("split") or ""] * k)
        source.extend([meta.get("source") or "?"] * k)
    if len(shapes) > 1:
        lines = "; ".join(f"{n_} entries of shape {s} at timesteps {list(ts)} over "
                          f"{len(json.loads(la))} layers"
                          for (s, ts, la), n_ in shapes.most_common())
        raise TrainError(f"cache entries for {name} disagree: {lines}. They were recorded with "
                         "different settings (--timesteps, map size, layers): train on one "
                         "setting with --data, or rebuild the cache with one setting")
    known = [k for k in text_lens if k is not None]
    if len(known) > 1:
        counts = ", ".join(f"{text_lens[k]} entries over {k}" for k in known)
        raise TrainError(f"cache entries for {name} were recorded over different text lengths "
                         f"({counts} tokens): maps over different key sets cannot train one "
                         "classifier; rebuild the cache at one length")
    if buf is None or n == 0:
        if cache.kept:  # a read-only cache: nothing was deleted
            raise TrainError(f"every cached entry for {name} in {cache.dir} is unreadable "
                             f"({len(cache.corrupt)}; left in place, as this run cannot change "
                             f"that cache): rebuild them with `l2s invert --model {model}` as "
                             "someone who can write it, or invert into another --cache-dir")
        raise TrainError(f"every cached entry for {name} in {cache.dir} was unreadable and has "
                         f"been deleted ({len(cache.corrupt)}): rebuild them with "
                         f"`l2s invert --model {model}`")
    if layers is not None and layer_list != list(layers):
        raise TrainError(f"the cached maps of {name} were recorded over layers "
                         f"{[la['name'] for la in layer_list][:4]}... but the backbone has "
                         f"{[la['name'] for la in layers][:4]}...: rebuild the cache with "
                         f"`l2s invert --model {model}`")
    c = buf.shape[3]
    if sum(la["heads"] for la in layer_list) != c:
        raise TrainError(f"cached maps hold {c} maps per object but their layers list "
                         f"{sum(la['heads'] for la in layer_list)} heads: rebuild the cache")
    maps = buf[:n].flatten(0, 1)  # (E, T, 2, C, S, S) -> (E*T, 2, C, S, S), no copy
    return MapData(maps, torch.tensor(t), torch.tensor(y), torch.tensor(neg),
                   torch.tensor(prompt_y), image, split, source, ts_list, layer_list,
                   str(cache.dir), list(cache.corrupt), list(cache.kept),
                   text_len=known[0] if len(text_lens) == 1 and known else None)


def hash_split(image: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split of one image: a seeded hash of its image_hash, so adding images never moves
    the ones already split."""
    u = int(hashlib.sha256(f"{seed}:{image}".encode()).hexdigest()[:15], 16) / 16**15
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


class SplitSettings(Protocol):
    """What a split needs of a run's settings (``TrainConfig`` has these fields)."""

    split: str  # "hash" (a seeded hash of each image) or "recorded" (the split invert wrote)
    seed: int
    val_fraction: float
    test_fraction: float


def split_images(data: MapData, cfg: SplitSettings) -> dict[str, torch.Tensor]:
    """Sample indices of each split; every image's samples land in exactly one split."""
    of_image: dict[str, str] = {}
    for img, rec in zip(data.image, data.split, strict=True):
        if cfg.split == "hash":
            if img not in of_image:
                of_image[img] = hash_split(img, cfg.seed, cfg.val_fraction, cfg.test_fraction)
        else:
            if rec not in SPLITS:
                raise TrainError(f"a cached sample has recorded split {rec!r}: use --split hash")
            if of_image.setdefault(img, rec) != rec:
                raise TrainError(f"image {img} is recorded in both {of_image[img]} and {rec}: "
                                 "use --split hash, which splits by image")
    which = torch.tensor([SPLITS.index(of_image[img]) for img in data.image])
    out = {s: torch.nonzero(which == i).flatten() for i, s in enumerate(SPLITS)}
    images = Counter(of_image.values())
    empty = [s for s in SPLITS if images[s] == 0]
    if empty:
        raise TrainError(f"too few images for a {'/'.join(SPLITS)} split: {len(of_image)} "
                         f"images gave {dict(images)} and none for {', '.join(empty)}; invert "
                         "more images (`l2s invert --limit ...`) or raise --val-fraction / "
                         "--test-fraction")
    return out
