"""Generate images for a prompt, steering its spatial relations when a classifier exists."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from l2s.engine.backbone import Denoiser
from l2s.engine.loading import load_backbone
from l2s.engine.presets import generation_defaults
from l2s.engine.sampling import sample
from l2s.relations import Triplet, parse


class PromptError(ValueError):
    """The prompt asks for something this backbone cannot draw or read."""


@dataclass(frozen=True)
class SteerConfig:
    """Settings of one `l2s steer` run; written into its report."""

    prompt: str  # the text prompt, relations included ("a circle to the left of a square")
    model: str = "toy"  # backbone preset, hub id or local folder
    num_images: int = 1  # images generated in one batch, seeds seed..seed+n-1
    seed: int = 0  # noise seed of the first image
    steps: int | None = None  # DDIM steps (None: the model's default)
    guidance: float | None = None  # classifier-free guidance (None: the model's default)
    out: str | None = None  # folder for PNGs and report.json (None: write nothing)


@dataclass
class SteerResult:
    """Images (N, H, W, 3) uint8 and the JSON report of the run."""

    images: np.ndarray
    report: dict
    paths: list[Path] = field(default_factory=list)


def check_prompt(denoiser: Denoiser, triplets: list[Triplet]) -> None:
    """A closed-vocabulary model must know every object the relations name."""
    if denoiser.known_objects is None:
        return
    for t in triplets:
        for name in (t.subject, t.object):
            if name not in denoiser.known_objects:
                raise PromptError(
                    f"{name!r} is not in the {denoiser.name} model's vocabulary: known objects "
                    f"are {', '.join(denoiser.known_objects)}; use --model sd2.1 for open "
                    "vocabulary")


def steer(config: SteerConfig, denoiser: Denoiser | None = None) -> SteerResult:
    """Run `l2s steer`: parse relations, generate, write images and a report.

    Until a relation classifier is installed for the backbone, images are generated plainly
    and the report's ``notice`` says so.
    """
    triplets = parse(config.prompt)
    if denoiser is None:
        denoiser = load_backbone(config.model)
    check_prompt(denoiser, triplets)
    steps, guidance = generation_defaults(config.model, config.steps, config.guidance)
    steerable = [t for t in triplets if t.steerable]
    notice = (f"no relation classifier is installed for {config.model!r} yet: generated "
              "without steering" if steerable else
              "no steerable relation in the prompt: plain generation")
    seeds = [config.seed + i for i in range(config.num_images)]
    latents = torch.cat([denoiser.prepare_latents(1, torch.Generator().manual_seed(s))
                         for s in seeds])
    t0 = time.perf_counter()
    images = sample(denoiser, [config.prompt] * config.num_images, steps=steps,
                    guidance=guidance, latents=latents)
    total = time.perf_counter() - t0
    arr = (images.float().cpu().numpy() * 255).round().astype(np.uint8)
    report = {
        "prompt": config.prompt,
        "triplets": [{"subject": t.subject, "relation": t.relation, "object": t.object,
                      "steerable": t.steerable} for t in triplets],
        "settings": {**asdict(config), "steps": steps, "guidance": guidance},
        "seeds": seeds,
        "method": "plain",
        "notice": notice,
        "steps": [],
        "total_s": round(total, 4),
    }
    paths = []
    if config.out:
        from PIL import Image

        out = Path(config.out)
        out.mkdir(parents=True, exist_ok=True)
        for s, img in zip(seeds, arr, strict=True):
            paths.append(out / f"image_{s:04d}.png")
            Image.fromarray(img).save(paths[-1])
        report["images"] = [str(p) for p in paths]
        (out / "report.json").write_text(json.dumps(report, indent=2))
    return SteerResult(arr, report, paths)
