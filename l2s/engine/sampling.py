"""The one sampling loop over any Denoiser, guidance, and seeded latents / image helpers.

Every generation in l2s (plain sampling, steering, DDIM / flow reconstruction, the benchmark)
runs :func:`denoise`; observers and steering plug in through its per-step callback (as in
k-diffusion's samplers), never through a second loop.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from l2s.engine.backbone import Conditioning, Denoiser
from l2s.engine.schedules import Timestep
from l2s.errors import L2SError


def uses_uncond(denoiser: Denoiser, guidance: float) -> bool:
    """Whether guidance at this scale needs the unconditional branch (a CFG batch): scales
    above 1 only, diffusers' rule (``do_classifier_free_guidance``: guidance_scale > 1); at
    1 or below the conditional prediction is used alone."""
    return denoiser.guidance_mode == "cfg" and guidance > 1.0


def guided_prediction(
    denoiser: Denoiser,
    latents: torch.Tensor,
    t: Timestep,
    cond: Conditioning,
    uncond: Conditioning | None,
    guidance: float,
) -> torch.Tensor:
    """The guided prediction at one step, float32.

    CFG families run both branches in one batch and mix them (Ho & Salimans, 2022), which is
    linear, so it holds for epsilon and velocity alike, at scales above 1 (``uses_uncond``);
    "embedded" families get the scale as a network input; "none" ignores it.
    """
    if not uses_uncond(denoiser, guidance):
        return denoiser.predict(latents, t, cond, guidance=guidance)
    pred = denoiser.predict(torch.cat([latents, latents]), t, Conditioning.cat([uncond, cond]))
    pred_u, pred_c = pred.chunk(2)
    return pred_u + guidance * (pred_c - pred_u)


# Called before each step's guided prediction with {"step", "steps", "t", "t_next",
# "latents", "cond", "uncond", "guidance", "denoiser"}; returning a tensor replaces the
# latents (how steering plugs in), None leaves them.
StepCallback = Callable[[dict], "torch.Tensor | None"]


@torch.no_grad()
def denoise(
    denoiser: Denoiser,
    latents: torch.Tensor,
    cond: Conditioning,
    *,
    steps: int,
    guidance: float,
    uncond: Conditioning | None = None,
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Run the schedule from ``latents`` (noisiest) to clean float32 latents.

    ``uncond`` is encoded from "" when CFG needs it and none is given. The callback runs
    under ``no_grad``; a steering callback opens ``torch.enable_grad()`` itself.
    """
    if uses_uncond(denoiser, guidance) and uncond is None:
        uncond = denoiser.encode_prompt([""] * len(cond))
    ts = denoiser.timesteps(steps)
    x = latents.float()
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else None
        if callback is not None:
            new = callback({"step": i, "steps": len(ts), "t": t, "t_next": t_next,
                            "latents": x, "cond": cond, "uncond": uncond,
                            "guidance": guidance, "denoiser": denoiser})
            if new is not None:
                x = new.float()
        pred = guided_prediction(denoiser, x, t, cond, uncond, guidance)
        x = denoiser.step(pred, t, t_next, x)
    return x


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    prompts: list[str],
    *,
    steps: int = 50,
    guidance: float = 7.5,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    cond: Conditioning | None = None,
) -> torch.Tensor:
    """Generate images (B, H, W, 3) in [0, 1]; one image per prompt.

    ``cond`` skips encoding the prompts when the caller already has their conditioning.
    """
    cond = denoiser.encode_prompt(prompts) if cond is None else cond
    x = denoiser.prepare_latents(len(prompts), generator) if latents is None else latents
    return denoiser.decode(denoise(denoiser, x, cond, steps=steps, guidance=guidance,
                                   callback=callback))


def seeded_latents(denoiser: Denoiser, seeds: list[int]) -> torch.Tensor:
    """One latent per seed, each from its own generator (independent of the batch size)."""
    return torch.cat([denoiser.prepare_latents(1, torch.Generator().manual_seed(s))
                      for s in seeds])


class GenerationError(L2SError, ArithmeticError):
    """Generation diverged: the images hold NaN or infinite values."""


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, H, W, 3) in [0, 1] -> uint8 arrays for PNGs and the detector.

    Raises GenerationError on NaN or infinite values, which would otherwise become a black
    image saved and scored with exit 0."""
    a = images.float().cpu().numpy()
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).reshape(len(a), -1).any(1).sum())
        raise GenerationError(
            f"generation diverged: {bad} of {len(a)} images hold NaN or infinite values (a "
            "--guidance or --step-size far too large for this model makes the latents "
            "overflow): use smaller values (the model's defaults work)")
    return (a * 255).round().astype(np.uint8)
