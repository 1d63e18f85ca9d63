"""The `l2s invert` job: samples -> inverted latents -> dual-prompt attention maps in the cache."""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from l2s.config import (
    CONFIG_FILE,
    ConfigError,
    check_choice,
    check_config,
    check_integer,
    check_seeds,
    check_text,
    dump_yaml,
    expand_home,
    is_whole,
    load_yaml,
)
from l2s.engine.backbone import Denoiser
from l2s.engine.tokens import TokenAlignmentError, pair_tokens
from l2s.inversion.cache import (
    AttentionCache,
    CacheError,
    atomic_write_text,
    content_key,
    image_hash,
    remove_dead_temp_files,
)
from l2s.inversion.loop import (
    InversionConfig,
    ddim_invert,
    noised_latents,
    psnr,
    reconstruct,
    record_maps,
)
from l2s.launcher import check_shard, format_shard, parse_shard, resolve_shard
from l2s.relations import RELATIONS, Triplet, format_prompt


@dataclass(frozen=True)
class InvertConfig:
    """One `l2s invert` run; `settings()` is written next to the cache's manifest, and the run's
    options as config.yaml (``InvertConfig.from_yaml`` or `l2s invert --config` repeat it)."""

    data: tuple[str, ...] = ("shapes",)  # sources: gqa, folder, shapes, generated
    model: str = "toy"  # backbone preset, hub id or folder
    cache_dir: str | None = None  # cache root (None: $L2S_CACHE_DIR or ~/.cache/l2s)
    limit: int | None = None  # stop after this many source samples (per source)
    negatives: int = 1  # wrong-relation prompts per sample
    seed: int = 0  # source sampling and negative relations
    batch_size: int = 16  # images inverted together
    # (index, count): this process takes samples i % count (None: the launcher's RANK and
    # WORLD_SIZE under accelerate launch / torchrun, else every sample)
    shard: tuple[int, int] | None = None
    inversion: InversionConfig = field(default_factory=InversionConfig)
    gqa_root: str | None = None  # GQA folder (images/, *_sceneGraphs.json)
    folder: str | None = None  # folder source with annotations.jsonl
    per_relation: tuple[int, int, int] | None = None  # train/val/test per relation (None: default)
    device: str | None = None  # None: $L2S_DEVICE, the launcher's GPU, CUDA, else the CPU
    dtype: str | None = None  # float16, bfloat16, float32 (None: fp16 on CUDA, else fp32)

    def __post_init__(self) -> None:
        from l2s.inversion.sources import SOURCES

        if isinstance(self.data, str) or not isinstance(self.data, tuple | list) \
                or not self.data:
            raise ConfigError(f"--data takes one or more sources ({', '.join(SOURCES)}); from "
                              f"Python a tuple such as ('shapes',), got {self.data!r}")
        for d in self.data:
            check_choice("--data", d, SOURCES)
        check_text("--model", self.model)
        check_text("--cache-dir", self.cache_dir, optional=True, path=True)
        check_text("--gqa-root", self.gqa_root, optional=True, path=True)
        check_text("--folder", self.folder, optional=True, path=True)
        check_integer("--limit", self.limit, 1)
        check_integer("--batch-size", self.batch_size, 1, optional=False)
        check_integer("--negatives", self.negatives, 0, optional=False)
        check_seeds("--seed", self.seed)  # was: -1 a ValueError from the sampler's Random
        expand_home(self, "cache_dir", "gqa_root", "folder")
        check_text("--device", self.device, optional=True)
        check_text("--dtype", self.dtype, optional=True)
        if self.negatives > len(RELATIONS) - 1:
            raise ConfigError(f"--negatives {self.negatives}: a caption has only "
                              f"{len(RELATIONS) - 1} wrong relations, so at most "
                              f"{len(RELATIONS) - 1} distinct negatives per image")
        check_shard(self.shard)
        if self.per_relation is not None and (
                not isinstance(self.per_relation, tuple | list) or len(self.per_relation) != 3
                or any(not is_whole(n) or n < 0
                       for n in self.per_relation)):
            got = _join(self.per_relation) if isinstance(self.per_relation, tuple | list) \
                else repr(self.per_relation)
            raise ConfigError(f"--per-relation takes three counts train,val,test >= 0, got {got}")
        if not isinstance(self.inversion, InversionConfig):
            raise ConfigError("inversion must be an l2s.inversion.loop.InversionConfig, got "
                              f"{self.inversion!r}")

    def options(self) -> dict:
        """This run in `l2s invert`'s option names and values: what config.yaml holds."""
        inv = self.inversion
        values = {
            "data": list(self.data), "model": self.model,
            "cache_dir": None if self.cache_dir is None else str(self.cache_dir),
            "gqa_root": self.gqa_root and str(self.gqa_root),
            "folder": self.folder and str(self.folder), "limit": self.limit,
            "negatives": self.negatives, "timesteps": _join(inv.record_steps),
            "steps": inv.steps, "inversion": inv.method, "fixed_point": inv.fixed_point,
            "min_psnr": inv.min_psnr,
            "per_relation": None if self.per_relation is None else _join(self.per_relation),
            "batch_size": self.batch_size, "shard": format_shard(self.shard), "seed": self.seed,
            "device": self.device, "dtype": self.dtype,
        }
        if inv.map_size != InversionConfig.map_size:  # no option: only a Python run sets it
            values["map_size"] = inv.map_size
        return values

    @classmethod
    def from_options(cls, values: Mapping) -> InvertConfig:
        """The config of `l2s invert`'s option values (``options()``, a --config file)."""
        values = dict(values)
        known = set(cls().options()) | {"map_size"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown invert option(s) {', '.join(unknown)}: valid ones are "
                              f"{', '.join(sorted(known))}")
        inv_keys = {"timesteps": "record_steps", "steps": "steps", "inversion": "method",
                    "fixed_point": "fixed_point", "min_psnr": "min_psnr",
                    "map_size": "map_size"}
        inv = {field: values.pop(key) for key, field in inv_keys.items()
               if values.get(key) is not None}
        if "record_steps" in inv:
            inv["record_steps"] = parse_ints(inv["record_steps"], "--timesteps")
        if values.get("per_relation") is not None:
            values["per_relation"] = parse_ints(values["per_relation"], "--per-relation")
        if "shard" in values:
            values["shard"] = parse_shard(values["shard"])
        if "data" in values:
            values["data"] = (values["data"],) if isinstance(values["data"], str) \
                else tuple(values["data"])
        # None is "not given" (a YAML null, an unset option): the default
        return cls(**{k: v for k, v in values.items() if v is not None},
                   inversion=InversionConfig(**inv))

    @classmethod
    def from_yaml(cls, path: str | Path) -> InvertConfig:
        """The config a run wrote as config.yaml (or any --config file of `l2s invert`)."""
        return cls.from_options(load_yaml(path))


def parse_ints(text: str | Sequence[int], option: str) -> tuple[int, ...]:
    """"5,10,15" (or a list of whole numbers) -> (5, 10, 15), naming ``option`` if it is not."""
    items = text.split(",") if isinstance(text, str) else text
    try:
        if not isinstance(items, Sequence) or any(isinstance(x, bool | float) for x in items):
            raise ValueError
        return tuple(int(x) for x in items)
    except (TypeError, ValueError):
        raise ConfigError(f"{option} takes comma-separated whole numbers, got {text!r}"
                          ) from None


def _join(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


@dataclass
class InvertResult:
    """What a run did: counts of written/skipped/dropped work, and the cache's stats."""

    written: int = 0
    skipped: int = 0  # map entries already cached
    inverted: int = 0  # images inverted (latents not cached yet)
    dropped: Counter = field(default_factory=Counter)  # reason -> map entries not written
    unreadable: list = field(default_factory=list)  # image files that could not be read
    sources: dict = field(default_factory=dict)  # per-source kept/dropped reports
    corrupt_rebuilt: int = 0
    left_to_others: int = 0  # entries another process sharing the cache was writing
    others: list = field(default_factory=list)  # those processes, as ``locks.Holder`` says
    stats: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "dropped": dict(self.dropped)}


def sample_prompts(triplet: Triplet, negatives: int, rng: random.Random
                   ) -> list[tuple[str, str, str]]:
    """(prompt, prompt relation, polarity): the true caption, then captions whose relation is
    drawn uniformly from the other relations (distinct while there are enough)."""
    others = [r for r in RELATIONS if r != triplet.relation]
    picks: list[str] = []
    while len(picks) < negatives:
        pool = [r for r in others if r not in picks] or others
        picks.append(rng.choice(pool))
    out = [(format_prompt([triplet], style="plain"), triplet.relation, "pos")]
    for r in picks:
        t = Triplet(triplet.subject, r, triplet.object)
        out.append((format_prompt([t], style="plain"), r, "neg"))
    return out


def _prepare_image(img: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, h, w, 3) float in [0, 1] at the backbone's size."""
    from PIL import Image

    if img.shape[:2] != size:
        img = np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR))
    return torch.from_numpy(img.copy()).float().div(255).unsqueeze(0)


def invert(cfg: InvertConfig, denoiser: Denoiser | None = None,
           callback: Callable[[dict], None] | None = None) -> InvertResult:
    """Fill the cache for every sample of the sources; skips what exists, so it resumes.

    Writes the run's options as config.yaml beside the cache's manifest. ``callback`` gets
    one dict per batch: source, expected (an upper bound on the samples), done, written,
    skipped, dropped (and ``final: True`` after a source's last batch).
    """
    check_config("invert", cfg, InvertConfig)
    import time

    from l2s.inversion.sources import SourceOptions, SourceReport, expected_samples, iter_samples

    t_start = time.perf_counter()
    cfg = replace(cfg, inversion=cfg.inversion.resolve(cfg.model))  # the model's defaults
    if denoiser is None:
        from l2s.engine.loading import load_backbone

        denoiser = load_backbone(cfg.model, device=cfg.device, dtype=cfg.dtype)
    cache = AttentionCache(cfg.cache_dir, denoiser.fingerprint)
    if not cache.read_only:  # litter of a writer killed mid-write
        remove_dead_temp_files(cache.dir)
    inv = cfg.inversion
    shard_index, shard_count = resolve_shard(cfg.shard) or (0, 1)
    layers = denoiser.cross_attention_layers()
    ts = denoiser.timesteps(inv.steps)
    common_meta = {
        "model": denoiser.name, "fingerprint": denoiser.fingerprint,
        "inversion": asdict(inv), "timesteps": [ts[s] for s in inv.record_steps],
        "layers": [la.name for la in layers], "heads": [la.heads for la in layers],
        "map_size": inv.map_size,
        "image_size": list(denoiser.image_size),  # (H, W) px the images are inverted at
        "text_len": denoiser.text_len,  # text keys each map is softmaxed over
    }
    check_same_geometry(cache, common_meta)
    settings = json.dumps(common_meta, indent=2)
    atomic_write_text(cache.dir / "settings.json", settings)
    dump_yaml(cfg.options(), cache.dir / CONFIG_FILE)
    result = InvertResult()
    opts_kwargs = {"gqa_root": cfg.gqa_root, "folder": cfg.folder, "seed": cfg.seed}
    if cfg.per_relation is not None:
        opts_kwargs["per_relation"] = cfg.per_relation
    options = SourceOptions(**opts_kwargs)

    for source in cfg.data:
        cache.begin_source(source)
        left_before = result.left_to_others
        report = SourceReport()
        # "expected" (an upper bound on the samples) lets progress bars show an ETA.
        event = {"source": source, "expected": expected_samples(source, options, cfg.limit)}
        batch: list = []
        seen = 0
        # islice stops before drawing sample limit + 1, so the source's counts match the run's
        # (a --limit past sys.maxsize draws every sample, as islice cannot count that far)
        samples = islice(iter_samples(source, options, report, denoiser=denoiser),
                         None if cfg.limit is None else min(cfg.limit, sys.maxsize))
        for i, sample in enumerate(samples):
            seen += 1
            if i % shard_count != shard_index:
                continue
            batch.append(sample)
            if len(batch) == cfg.batch_size:
                _process(batch, denoiser, cache, cfg, common_meta, result)
                batch = []
                if callback:
                    callback({**event, "done": seen, **_counts(result)})
        if batch:
            _process(batch, denoiser, cache, cfg, common_meta, result)
        if callback:
            callback({**event, "done": seen, "final": True, **_counts(result)})
        result.sources[source] = report.to_dict()
        if result.left_to_others == left_before:  # else the mark stays until they are in
            cache.end_source(source)
    result.corrupt_rebuilt = len(cache.corrupt)
    if result.left_to_others:
        result.others = cache.writers()
    result.stats = cache.stats()
    result.seconds = time.perf_counter() - t_start
    return result


run_invert = invert  # the name before the API named every job by its command


# What every map in one backbone's cache folder shares. None is in the entry keys: the
# image size changes the image hash (new entries beside the old, mixed by `l2s train`), the
# text length changes nothing in the key (the old entries would pass for the new maps); other
# recorded timesteps (--timesteps, --steps) or map sizes give entries of another shape, which
# `l2s train` refuses to mix.
GEOMETRY = ("image_size", "text_len", "timesteps", "map_size")


def check_same_geometry(cache: AttentionCache, meta: dict) -> None:
    """Refuse a run whose image size, text length, recorded timesteps or map size differs from
    the maps already cached (as ``settings.json`` records them, or, when it is missing or
    damaged, the header of a sound cached entry; a cache from before they recorded a field is
    not checked on that field)."""
    maps = cache.dir / "maps"
    if not (maps.is_dir() and any(maps.iterdir())):
        return
    try:
        old = json.loads((cache.dir / "settings.json").read_text())
    except (OSError, ValueError):
        old = None
    if not isinstance(old, dict) or not any(k in old for k in GEOMETRY):
        old = _geometry_of_an_entry(cache)
    diff = [f"{k} {old[k]} (cached) vs {meta[k]} (this run)" for k in GEOMETRY
            if k in old and old[k] != meta[k]]
    if diff:
        raise CacheError(f"{cache.dir} holds maps of this backbone recorded at another "
                         f"{'; '.join(diff)}: maps recorded differently cannot train one "
                         "classifier; rerun with the cached settings (its config.yaml holds "
                         "them), pass another --cache-dir for this run, or delete "
                         f"{cache.dir} to rebuild it")


def _geometry_of_an_entry(cache: AttentionCache) -> dict:
    """The geometry fields of the first sound map entry (broken ones are deleted on the way);
    {} for a cache with none."""
    for path in sorted((cache.dir / "maps").glob("*/*.safetensors")):
        entry = cache.get(path.stem)
        if entry is not None:
            return {k: entry.meta[k] for k in GEOMETRY if k in entry.meta}
    return {}


def _seed_of(seed: int, source_id: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{source_id}".encode()).digest()[:8], "big")


def _counts(r: InvertResult) -> dict:
    return {"written": r.written, "skipped": r.skipped, "dropped": sum(r.dropped.values())}


def _process(samples: list, denoiser: Denoiser, cache: AttentionCache, cfg: InvertConfig,
             common_meta: dict, result: InvertResult) -> None:
    """Claim the samples whose entries are missing (or broken), then build those entries."""
    from l2s.inversion.sources import SourceError

    inv = cfg.inversion
    items = []  # (sample, image tensor, hash, prompts, keys)
    lat_keys: list[str] = []  # each item's latent key, claimed by this process
    for s in samples:
        try:
            img = _prepare_image(s.load_image(), denoiser.image_size)
        except SourceError:
            result.dropped["unreadable image"] += 1
            result.unreadable.append(s.image_path or s.source_id)
            continue
        h = image_hash((img * 255).round().to(torch.uint8).numpy())
        rng = random.Random(f"{cfg.seed}:{s.source_id}")
        triplet = Triplet(s.subject, s.relation, s.object)
        prompts = sample_prompts(triplet, cfg.negatives, rng)
        keys = [content_key(denoiser.fingerprint, h, p, s.subject, s.object,
                            inv.latent_settings(), list(inv.record_steps), inv.map_size)
                for p, _, _ in prompts]
        missing = [k for k in keys if not cache.has(k)]
        result.skipped += len(keys) - len(missing)
        if not missing:
            continue
        lat_key = content_key(denoiser.fingerprint, h, prompts[0][0], inv.latent_settings())
        if not cache.claim(lat_key):  # another process sharing the cache is on this image
            result.left_to_others += len(missing)
            continue
        items.append((s, img, h, prompts, keys))
        lat_keys.append(lat_key)
    try:
        _work(items, lat_keys, denoiser, cache, cfg, common_meta, result)
    finally:
        for k in lat_keys:
            cache.release(k)


def _work(items: list, lat_keys: list[str], denoiser: Denoiser, cache: AttentionCache,
          cfg: InvertConfig, common_meta: dict, result: InvertResult) -> None:
    """Invert (or load) the claimed images' latents, record their maps and store them."""
    if not items:
        return
    inv = cfg.inversion
    # 1. Latent trajectories: cached, else inverted together in one batch.
    # Noised latents cost nothing to redo (seeded), so only DDIM trajectories are cached.
    trajs: list = [cache.get_latents(k) if inv.method == "ddim" else None for k in lat_keys]
    todo = [i for i, t in enumerate(trajs) if t is None]
    if todo:
        x0 = denoiser.encode_image(torch.cat([items[i][1] for i in todo]))
        cond = denoiser.encode_prompt([items[i][3][0][0] for i in todo])
        if inv.method == "ddim":
            traj = ddim_invert(denoiser, x0, cond, inv.steps, inv.fixed_point)
            rec = denoiser.decode(reconstruct(denoiser, traj[0], cond, inv.steps))
            quality = psnr(rec.cpu(), torch.cat([items[i][1] for i in todo])).tolist()
        else:  # each image's noise from its own seed, whatever the batch
            traj = torch.cat([noised_latents(denoiser, x0[j:j + 1], inv.steps,
                                             torch.Generator().manual_seed(
                                                 _seed_of(cfg.seed, items[i][0].source_id)))
                              for j, i in enumerate(todo)], dim=1)
            quality = [None] * len(todo)
        for j, i in enumerate(todo):
            lat = traj[:, j].to(torch.float16)
            if inv.method == "ddim":
                cache.put_latents(lat_keys[i], lat, {"psnr": quality[j]})
            trajs[i] = (lat, {"psnr": quality[j]})
        result.inverted += len(todo)
    # 2. Maps under every prompt of every image whose reconstruction is good enough.
    prompts, groups, lat_list, metas = [], [], [], []
    for (s, _, h, ps, keys), (lat, lmeta) in zip(items, trajs, strict=True):
        q = lmeta.get("psnr")
        if q is not None and q < inv.min_psnr:
            result.dropped["low reconstruction PSNR"] += len(keys)
            continue
        for (prompt, prel, pol), key in zip(ps, keys, strict=True):
            if cache.has(key):
                continue
            try:
                st, ot = pair_tokens(denoiser.tokenizer, prompt, s.subject, s.object)
            except TokenAlignmentError:
                result.dropped["prompt does not fit the tokenizer"] += 1
                continue
            prompts.append(prompt)
            groups.append([list(st.indices), list(ot.indices)])
            lat_list.append(lat)
            metas.append((key, {
                **common_meta, "source": s.source, "source_id": s.source_id, "split": s.split,
                "relation": s.relation, "prompt": prompt, "prompt_relation": prel,
                "polarity": pol, "subject": s.subject, "object": s.object, "image_hash": h,
                "psnr": q, "subject_box": list(s.subject_box),
                "object_box": list(s.object_box)}))
    if not prompts:
        return
    latents = torch.stack(lat_list, dim=1).to(denoiser.device, torch.float32)
    maps = record_maps(denoiser, latents, prompts, groups, inv.record_steps, inv.steps,
                       inv.map_size)
    for (key, meta), m in zip(metas, maps, strict=True):
        cache.put(key, m, meta)
        result.written += 1
