"""Benchmarks: seeded prompt suites, resumable generation, per-image scoring and summaries."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from l2s.engine.backbone import Denoiser
from l2s.engine.sampling import seeded_latents, to_uint8
from l2s.relations import RELATIONS, Triplet, format_prompt, geneval_relations

SUITES = ("shapes",)


class BenchError(ValueError):
    """A benchmark run cannot start or resume as asked."""


@dataclass(frozen=True)
class BenchConfig:
    """Everything that decides a benchmark's results; written next to them as config.json."""

    suite: str = "shapes"  # prompt suite: "shapes" (the toy world)
    model: str = "toy"  # backbone preset, hub id or folder
    methods: tuple[str, ...] = ("plain",)  # generation methods to compare on the same seeds
    prompts: int = 200  # number of prompts
    images: int = 1  # images per prompt
    seed: int = 0  # picks the prompt set and every image's noise seed
    steps: int | None = None  # sampling steps (None: the model's default)
    guidance: float | None = None  # classifier-free guidance scale (None: the model's default)
    classifier: str | None = None  # l2s: classifier card (None: the model's default)
    # steered methods: fraction (< 1) or count of steered steps (None: the model's)
    steer_until: float | None = None
    iterations: int = 16  # steered methods: max gradient iterations per step
    step_size: float | None = None  # steered methods: latent step (None: the model's)
    loss_threshold: float | None = None  # steered methods: early exit (None: the model's)
    batch_size: int = 100  # images generated in one batch
    out: str = "out/bench"  # folder for config.json, results.jsonl, images and contact sheets

    def identity(self) -> dict:
        """The fields a resumed run must share with the run it continues."""
        return {k: v for k, v in asdict(self).items()
                if k not in ("methods", "prompts", "batch_size", "out")}


@dataclass(frozen=True)
class BenchPrompt:
    """One benchmark prompt and the relation it asks for."""

    index: int
    prompt: str
    triplet: Triplet


def shapes_prompts(n: int, seed: int) -> list[BenchPrompt]:
    """Prompts "a A REL a B" over the toy categories; prompt i depends only on (seed, i)."""
    from l2s.toy.scenes import CATEGORY_NAMES

    out = []
    for i in range(n):
        rng = random.Random(seed * 1_000_003 + i)
        a, b = rng.sample(CATEGORY_NAMES, 2)
        t = Triplet(a, rng.choice(RELATIONS), b)
        out.append(BenchPrompt(i, format_prompt([t], style="plain"), t))
    return out


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The noise seed of one image: the same for every method, batch size and resume."""
    return seed * 10_000_000 + prompt_index * 1000 + image_index


def score_shapes(image: np.ndarray, triplet: Triplet) -> dict:
    """Detect the two requested objects and apply GenEval's position rule (missing = wrong)."""
    from l2s.toy.detector import detect, objects_touch, oversized

    found = detect(image, categories=[triplet.subject, triplet.object])
    a, b = found.get(triplet.subject), found.get(triplet.object)
    both = a is not None and b is not None
    correct = both and triplet.relation in geneval_relations(a.box, b.box)
    size = max(image.shape[:2])
    fused = both and (objects_touch(a, b) or oversized(a, size) or oversized(b, size))
    return {
        "detections": {d.category: {"box": list(d.box), "confidence": round(d.confidence, 4)}
                       for d in found.values()},
        "both_present": both, "correct": bool(correct), "fused": bool(fused),
    }


def summarise(records: list[dict]) -> dict:
    """Fractions over all images of a method: both present, position accuracy, fused."""
    n = len(records)
    if n == 0:
        return {"n_images": 0, "both_present": 0.0, "position_accuracy": 0.0, "fused": 0.0}
    return {
        "n_images": n,
        "both_present": sum(r["both_present"] for r in records) / n,
        "position_accuracy": sum(r["correct"] for r in records) / n,
        "fused": sum(r["fused"] for r in records) / n,
    }


# A method factory gets (denoiser, config) once and returns the batch generator
# (prompts, triplets, seeds) -> images (B, H, W, 3) in [0, 1].
MethodFactory = Callable[[Denoiser, "BenchConfig"], Callable[..., torch.Tensor]]


def _steer_method(name: str) -> MethodFactory:
    """plain / l2s / centroid, and l2s-verify: plain first, the images the detector fails
    regenerated with l2s from the same seeds (``l2s.verify``)."""
    def factory(denoiser: Denoiser, cfg: BenchConfig):
        from l2s.steer import build_loss, generate, steer_settings
        from l2s.verify import generate_verified

        verify = name == "l2s-verify"
        loss, _ = build_loss("l2s" if verify else name, denoiser, cfg.model, cfg.classifier)
        settings = steer_settings(cfg.model, steps=cfg.steps, guidance=cfg.guidance,
                                  steer_until=cfg.steer_until, iterations=cfg.iterations,
                                  step_size=cfg.step_size, loss_threshold=cfg.loss_threshold)

        def run(prompts, triplets, seeds):
            latents = seeded_latents(denoiser, seeds)
            if verify:
                return generate_verified(denoiser, prompts, [[t] for t in triplets], latents,
                                         settings, loss).images
            images, _ = generate(denoiser, prompts, [[t] for t in triplets], latents,
                                 settings, loss)
            return images

        return run

    return factory


METHODS: dict[str, MethodFactory] = {m: _steer_method(m)
                                     for m in ("plain", "l2s", "centroid", "l2s-verify")}


@dataclass
class BenchResult:
    """Summary per method (the `--json` document) and where the files are."""

    suite: str
    methods: dict[str, dict]
    out: Path
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"suite": self.suite, "methods": self.methods}


def _read_records(path: Path) -> list[dict]:
    """Finished records; lines cut by an interrupted run are dropped (and so redone)."""
    if not path.exists():
        return []
    text = path.read_text()
    records, bad = [], 0
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    if bad or not text.endswith("\n"):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(path)
    return records


def _append_records(path: Path, records: list[dict]) -> None:
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _check_resume(cfg: BenchConfig, out: Path) -> None:
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        old_id = {k: old.get(k) for k in cfg.identity()}
        if old_id != cfg.identity():
            diff = {k: (old_id[k], v) for k, v in cfg.identity().items() if old_id[k] != v}
            raise BenchError(f"{out} holds a run with other settings {diff}: pass another --out "
                             "or delete that folder")
    out.mkdir(parents=True, exist_ok=True)
    tmp = cfg_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(cfg), indent=2))
    tmp.replace(cfg_path)


def contact_sheet(images: list[np.ndarray], records: list[dict], triplets: list[Triplet],
                  path: Path, columns: int = 10, scale: int = 4) -> None:
    """A PNG grid of images with the subject (white) and object (grey) boxes; green frame if
    the relation holds, red if not."""
    if not images:
        return
    h, w = images[0].shape[:2]
    cw, ch = w * scale + 4, h * scale + 4
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * cw, rows * ch), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for i, (img, rec, t) in enumerate(zip(images, records, triplets, strict=True)):
        x0, y0 = (i % columns) * cw, (i // columns) * ch
        tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
        sheet.paste(tile, (x0 + 2, y0 + 2))
        frame = (0, 200, 0) if rec["correct"] else (220, 0, 0)
        draw.rectangle([x0, y0, x0 + cw - 1, y0 + ch - 1], outline=frame, width=2)
        for name, colour in ((t.subject, (255, 255, 255)), (t.object, (150, 150, 150))):
            det = rec["detections"].get(name)
            if det:
                x1, y1, x2, y2 = (v * scale for v in det["box"])
                draw.rectangle([x0 + 2 + x1, y0 + 2 + y1, x0 + 1 + x2, y0 + 1 + y2],
                               outline=colour)
    sheet.save(path)


def run_bench(cfg: BenchConfig, denoiser: Denoiser | None = None,
              callback: Callable[[dict], None] | None = None) -> BenchResult:
    """Generate and score every (prompt, image) of the suite for each method; resumable.

    Finished images (lines of results.jsonl) are never recomputed; ``callback`` receives
    {"method", "done", "total"} after each batch.
    """
    if cfg.suite not in SUITES:
        raise BenchError(f"unknown suite {cfg.suite!r}: available suites are {', '.join(SUITES)}")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise BenchError(f"unknown method {unknown[0]!r}: available methods are "
                         f"{', '.join(METHODS)}")
    if cfg.prompts < 1 or cfg.images < 1 or cfg.images > 999:
        raise BenchError("--prompts must be >= 1 and --images between 1 and 999")
    out = Path(cfg.out)
    _check_resume(cfg, out)
    if denoiser is None:
        from l2s.engine.loading import load_backbone

        denoiser = load_backbone(cfg.model)
    prompts = shapes_prompts(cfg.prompts, cfg.seed)
    jobs = [(p, k) for p in prompts for k in range(cfg.images)]
    results_path = out / "results.jsonl"
    records = _read_records(results_path)
    summaries, seconds = {}, {}
    for method in cfg.methods:
        done = {(r["prompt_index"], r["image_index"]): r for r in records
                if r["method"] == method}
        todo = [(p, k) for p, k in jobs if (p.index, k) not in done]
        img_dir = out / "images" / method
        img_dir.mkdir(parents=True, exist_ok=True)
        generator = METHODS[method](denoiser, cfg) if todo else None
        t0 = time.perf_counter()
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            seeds = [image_seed(cfg.seed, p.index, k) for p, k in batch]
            imgs = generator([p.prompt for p, _ in batch], [p.triplet for p, _ in batch], seeds)
            new = []
            for (p, k), s, img in zip(batch, seeds, to_uint8(imgs), strict=True):
                Image.fromarray(img).save(img_dir / f"{p.index:04d}_{k:03d}.png")
                rec = {"method": method, "prompt_index": p.index, "image_index": k,
                       "prompt": p.prompt, "subject": p.triplet.subject,
                       "relation": p.triplet.relation, "object": p.triplet.object,
                       "seed": s, **score_shapes(img, p.triplet)}
                new.append(rec)
                done[(p.index, k)] = rec
            _append_records(results_path, new)
            if callback:
                callback({"method": method, "done": len(done), "total": len(jobs)})
        seconds[method] = time.perf_counter() - t0
        mine = [done[(p.index, k)] for p, k in jobs]
        summaries[method] = summarise(mine)
        _sheet(out, method, mine[:60], {p.index: p.triplet for p in prompts})
    return BenchResult(cfg.suite, summaries, out, seconds)


def _sheet(out: Path, method: str, records: list[dict], triplets: dict[int, Triplet]) -> None:
    imgs = [np.asarray(Image.open(out / "images" / method /
                                  f"{r['prompt_index']:04d}_{r['image_index']:03d}.png"))
            for r in records]
    contact_sheet(imgs, records, [triplets[r["prompt_index"]] for r in records],
                  out / f"contact_{method}.png")
