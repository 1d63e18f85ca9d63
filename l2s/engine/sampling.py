"""DDIM arithmetic as pure functions, and the guided sampling loop over any Denoiser."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from l2s.engine.backbone import Denoiser

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def to_epsilon(
    output: torch.Tensor, x_t: torch.Tensor, alpha_t: float, prediction_type: str
) -> torch.Tensor:
    """Convert a network output to epsilon, given alpha_bar at its timestep.

    x_t = sqrt(a) x0 + sqrt(1-a) eps;  v = sqrt(a) eps - sqrt(1-a) x0  (Salimans & Ho, 2022).
    """
    a = torch.as_tensor(alpha_t, dtype=torch.float32)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - a.sqrt() * output) / (1 - a).sqrt().clamp_min(1e-8)
    raise ValueError(f"unknown prediction_type {prediction_type!r}: expected one of "
                     f"{', '.join(PREDICTION_TYPES)}")


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: float, alpha_next: float
              ) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) move from alpha_bar_t to alpha_bar_next (Song et al., 2021).

    The same formula runs forwards (denoising) and backwards (inversion): only the order of
    the alphas changes, which is why inversion here is exact for an exact eps.
    """
    x0 = (x_t - (1 - alpha_t) ** 0.5 * eps) / alpha_t**0.5
    return alpha_next**0.5 * x0 + (1 - alpha_next) ** 0.5 * eps


def guided_noise(
    denoiser: Denoiser,
    latents: torch.Tensor,
    t: int,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """Classifier-free guided epsilon; both branches in one batch (Ho & Salimans, 2022)."""
    if guidance == 1.0:
        return denoiser.predict_noise(latents, t, cond)
    eps = denoiser.predict_noise(torch.cat([latents, latents]), t, torch.cat([uncond, cond]))
    eps_u, eps_c = eps.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def seeded_latents(denoiser: Denoiser, seeds: list[int]) -> torch.Tensor:
    """One latent per seed, each from its own generator (independent of the batch size)."""
    return torch.cat([denoiser.prepare_latents(1, torch.Generator().manual_seed(s))
                      for s in seeds])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, H, W, 3) in [0, 1] -> uint8 arrays for PNGs and the detector."""
    return (images.float().cpu().numpy() * 255).round().astype(np.uint8)


# A step callback sees {"step", "t", "t_next", "latents", "cond", "uncond"} before the guided
# prediction of each step and may return replacement latents (how steering plugs in).
StepCallback = Callable[[dict], "torch.Tensor | None"]


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
) -> torch.Tensor:
    """Generate images (B, H, W, 3) in [0, 1] with guided DDIM; one image per prompt."""
    cond = denoiser.encode_prompt(prompts)
    uncond = denoiser.encode_prompt([""] * len(prompts))
    x = denoiser.prepare_latents(len(prompts), generator) if latents is None else latents
    ts = denoiser.timesteps(steps)
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else None
        if callback is not None:
            new = callback({"step": i, "t": t, "t_next": t_next, "latents": x,
                            "cond": cond, "uncond": uncond})
            if new is not None:
                x = new
        eps = guided_noise(denoiser, x, t, cond, uncond, guidance)
        x = denoiser.step(eps, t, t_next, x)
    return denoiser.decode(x)
