"""Self-distillation data: steered images of relation prompts that the relation classifier
accepts, written in chunks so a killed run resumes where it stopped.

Prompts are "a A REL a B" (the shapes suite's wording) over the model's objects minus the
held-out ones: no pair containing a held-out object is ever generated, so the benchmark can
measure the LoRA on pairs it never saw. Each chunk is generated with l2s steering from seeded
noise, then each image is judged by the relation classifier (never the benchmark's judge):
the image is noised again to the last steered step and the classifier reads the maps of one
forward; the image is kept when every relation's loss is under that step's early-exit
threshold.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from l2s.engine.backbone import Denoiser
from l2s.engine.sampling import seeded_latents, to_uint8
from l2s.relations import RELATIONS, Triplet, format_prompt, with_article
from l2s.steering.loop import Steerer, SteerSettings, generate
from l2s.steering.losses import RelationLoss

CHUNK_PATTERN = "chunk-{:05d}.safetensors"
PRESERVE_FILE = "preserve.safetensors"  # plain single-object images (recipe self's prior)
PRESERVE_OFFSET = 100_000_000  # their image indices: far above any steered image's


@dataclass(frozen=True)
class DistillPrompt:
    prompt: str
    triplet: Triplet


def pair_prompt(names: Sequence[str], rng: random.Random) -> DistillPrompt:
    a, b = rng.sample(list(names), 2)
    t = Triplet(a, rng.choice(RELATIONS), b)
    return DistillPrompt(format_prompt([t], style="plain"), t)


def distill_prompts(objects: Sequence[str], hold_out: Sequence[str], n: int, seed: int,
                    start: int = 0) -> list[DistillPrompt]:
    """Prompts start..start+n-1 over ``objects`` without ``hold_out``; prompt i depends only
    on (seed, i)."""
    names = [o for o in objects if o not in set(hold_out)]
    return [pair_prompt(names, random.Random(seed * 1_000_003 + i))
            for i in range(start, start + n)]


def image_seed(seed: int, i: int) -> int:
    """The noise seed of distillation image i (apart from the benchmark's seed * 10^7 + ...:
    an odd offset keeps the two families of seeds from meeting)."""
    return 7_919 + seed * 1_000_003 + 2 * i + 1


def classifier_accepts(denoiser: Denoiser, images: torch.Tensor, prompts: Sequence[str],
                       triplets: Sequence[Sequence[Triplet]], loss: RelationLoss,
                       settings: SteerSettings, seeds: Sequence[int]) -> list[bool]:
    """The relation classifier's verdict on finished images (B, H, W, 3) in [0, 1]: each image
    noised to the last steered step (seeded noise), one truncated forward, every relation's
    loss at most that step's early-exit threshold."""
    st = Steerer(denoiser, list(prompts), [list(t) for t in triplets], loss, settings)
    active = st.plan.active
    ok = [True] * len(prompts)
    if not active:
        return ok
    step = max(settings.steered_steps() - 1, settings.steer_from)
    t = denoiser.timesteps(settings.steps)[step]
    x0 = denoiser.encode_image(images.to(denoiser.device))
    noise = seeded_latents(denoiser, [s + 1 for s in seeds])
    x_t = denoiser.add_noise(x0.float(), noise.to(x0.device), t)
    aidx = st.index(active)
    with torch.no_grad(), st.recorder() as rec, rec.truncated():
        rec.set_weights(st.token_weights(active))
        denoiser.predict(x_t[aidx], t, st.cond.select(aidx), guidance=settings.guidance)
    with torch.no_grad():
        scores = st.plan.score(loss, rec.stacked(), active, t, step)
    held = (scores.loss <= settings.threshold(step)).tolist()
    for a, h in zip(scores.rows, held, strict=True):
        ok[active[a]] = ok[active[a]] and h
    return ok


def chunk_path(folder: Path, index: int) -> Path:
    return folder / CHUNK_PATTERN.format(index)


def read_chunk(path: Path) -> tuple[torch.Tensor, list[str], list[bool]] | None:
    """(images uint8 (B, H, W, 3), prompts, accepted) of a chunk; None when it is damaged."""
    try:
        tensors = load_file(str(path))
        meta = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError, SafetensorError):
        return None
    return tensors["images"], meta["prompts"], [bool(a) for a in tensors["accepted"].tolist()]


def write_chunk(path: Path, images: torch.Tensor, accepted: Sequence[bool], texts: list[str],
                seeds: list[int], made_by: dict | None) -> None:
    """Write a data file (uint8 images and their acceptance) and its JSON (prompts, seeds,
    what made them), each atomically: what ``read_chunk`` and ``_made_for`` read back."""
    from l2s.inversion.cache import atomic_write, atomic_write_text

    atomic_write_text(path.with_suffix(".json"), json.dumps(
        {"prompts": texts, "seeds": seeds, "made_by": made_by}) + "\n")
    atomic_write(path, lambda tmp: save_file(
        {"images": images.contiguous(),
         "accepted": torch.tensor(list(accepted), dtype=torch.uint8)}, tmp))


def _made_for(path: Path, texts: list[str], seeds: list[int], made_by: dict | None) -> bool:
    """Whether the chunk at ``path`` holds these prompts and seeds, made by ``made_by``
    (a chunk an older l2s wrote without it is judged by its prompts and seeds alone)."""
    try:
        meta = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("prompts") != texts or meta.get("seeds") != seeds:
        return False
    return "made_by" not in meta or meta["made_by"] == json.loads(json.dumps(made_by))


def generate_chunks(denoiser: Denoiser, loss: RelationLoss, settings: SteerSettings,
                    folder: Path, *, objects: Sequence[str], hold_out: Sequence[str],
                    images: int, chunk: int, seed: int, made_by: dict | None = None,
                    callback: Callable[[dict], None] | None = None) -> dict:
    """Generate (or find) every chunk of ``images`` steered images in ``folder``; returns
    {"generated", "accepted"} counts over all chunks. A chunk found there is kept only if it
    holds the prompts and seeds this run draws and was made by ``made_by`` (the classifier
    and steering settings): a run with another hold-out, seed or classifier regenerates it."""
    folder.mkdir(parents=True, exist_ok=True)
    n_chunks = -(-images // chunk)
    total = accepted = 0
    if callback:  # the display starts its clock here, before the first chunk
        callback({"phase": "data", "done": 0, "total": images, "accepted": 0})
    for c in range(n_chunks):
        start, n = c * chunk, min(chunk, images - c * chunk)
        path = chunk_path(folder, c)
        ps = distill_prompts(objects, hold_out, n, seed, start)
        seeds = [image_seed(seed, i) for i in range(start, start + n)]
        texts, trips = [p.prompt for p in ps], [[p.triplet] for p in ps]
        found = read_chunk(path) if path.is_file() else None
        if found is not None and not _made_for(path, texts, seeds, made_by):
            found = None  # another run's chunk (other hold-out, seed or classifier): redo it
        if found is None:
            imgs, _ = generate(denoiser, texts, trips, seeded_latents(denoiser, seeds),
                               settings, loss)
            ok = classifier_accepts(denoiser, imgs, texts, trips, loss, settings, seeds)
            u8 = torch.as_tensor(to_uint8(imgs))
            write_chunk(path, u8, ok, texts, seeds, made_by)
            found = (u8, texts, ok)
        total += len(found[1])
        accepted += sum(found[2])
        if callback:
            callback({"phase": "data", "done": total, "total": images, "accepted": accepted})
    return {"generated": total, "accepted": accepted}


def load_accepted(folder: Path, chunks: int) -> tuple[torch.Tensor, list[str], list[int]]:
    """Every accepted image (N, H, W, 3) uint8, its prompt and its noise seed, from the first
    ``chunks`` chunks."""
    imgs, prompts, seeds = [], [], []
    for c in range(chunks):
        path = chunk_path(folder, c)
        found = read_chunk(path)
        if found is None:
            continue
        u8, texts, ok = found
        chunk_seeds = json.loads(path.with_suffix(".json").read_text())["seeds"]
        keep = [i for i, a in enumerate(ok) if a]
        imgs.append(u8[keep])
        prompts += [texts[i] for i in keep]
        seeds += [chunk_seeds[i] for i in keep]
    return (torch.cat(imgs) if imgs else torch.zeros(0, dtype=torch.uint8)), prompts, seeds


def preserve_prompts(objects: Sequence[str], per_object: int) -> list[str]:
    """``per_object`` prompts naming each object alone ("a ring"), held-out ones included."""
    return [with_article(o) for o in objects for _ in range(per_object)]


def preserved_images(denoiser: Denoiser, settings: SteerSettings, folder: Path, *,
                     objects: Sequence[str], per_object: int, seed: int,
                     made_by: dict | None = None,
                     callback: Callable[[dict], None] | None = None
                     ) -> tuple[torch.Tensor, list[str], list[int]]:
    """The base model's plain images (N, H, W, 3) uint8 of every object alone, their prompts
    and noise seeds: generated once into ``folder`` (kept there while prompts, seeds and
    ``made_by`` match), the prior that keeps a LoRA drawing every object (recipe self trains
    them beside the steered images; an object no distilled prompt names is otherwise
    forgotten). They name no pair and no relation, so held-out pairs stay unseen."""
    from l2s.engine.sampling import sample

    texts = preserve_prompts(objects, per_object)
    seeds = [image_seed(seed, PRESERVE_OFFSET + i) for i in range(len(texts))]
    path = folder / PRESERVE_FILE
    found = read_chunk(path) if path.is_file() else None
    if found is not None and _made_for(path, texts, seeds, made_by):
        return found[0], texts, seeds
    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    if callback:  # the display starts its clock here, before the first batch
        callback({"phase": "preserve", "done": 0, "total": len(texts)})
    for start in range(0, len(texts), 50):
        with torch.no_grad():
            imgs = sample(denoiser, texts[start:start + 50], steps=settings.steps,
                          guidance=settings.guidance,
                          latents=seeded_latents(denoiser, seeds[start:start + 50]))
        parts.append(torch.as_tensor(to_uint8(imgs)))
        if callback:
            callback({"phase": "preserve", "done": start + len(parts[-1]),
                      "total": len(texts)})
    u8 = torch.cat(parts)
    write_chunk(path, u8, [True] * len(texts), texts, seeds, made_by)
    return u8, texts, seeds
