"""Image -> noisy-latent trajectories (DDIM inversion or forward noising) and map recording."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from l2s.engine.backbone import Denoiser
from l2s.engine.hooks import AttentionRecorder

INVERSION_METHODS = ("ddim", "noise")


@dataclass(frozen=True)
class InversionConfig:
    """How images become latents and when maps are recorded."""

    method: str = "ddim"  # "ddim": DDIM inversion; "noise": forward-noise the image per step
    steps: int = 50  # length of the DDIM schedule the recorded steps index into
    fixed_point: int = 2  # refinement iterations per DDIM inversion step (0: plain inversion)
    record_steps: tuple[int, ...] = (5, 10, 15, 20, 25, 49)  # step indices (0 = noisiest)
    map_size: int = 16  # side of the recorded, resized attention maps
    min_psnr: float = 20.0  # ddim: drop images that reconstruct worse than this (dB)

    def __post_init__(self) -> None:
        if self.method not in INVERSION_METHODS:
            raise ValueError(f"unknown inversion {self.method!r}: use one of "
                             f"{', '.join(INVERSION_METHODS)}")
        bad = [s for s in self.record_steps if not 0 <= s < self.steps]
        if bad or not self.record_steps:
            raise ValueError(f"recorded steps {bad or '()'} must lie in 0..{self.steps - 1} "
                             f"for a {self.steps}-step schedule")

    def latent_settings(self) -> dict:
        """What the cached latent trajectory depends on (not the recorded steps)."""
        return {"method": self.method, "steps": self.steps,
                "fixed_point": self.fixed_point if self.method == "ddim" else None}


@torch.no_grad()
def ddim_invert(denoiser: Denoiser, x0: torch.Tensor, cond: torch.Tensor, steps: int,
                fixed_point: int = 0) -> torch.Tensor:
    """DDIM inversion: the latents (steps, B, C, h, w) at each sampling timestep, noisiest first.

    Step j inverts the sampler's move t_j -> t_{j+1} (t_steps = the clean end): it solves
    x_j = ddim(x_{j+1}, eps(x_j, t_j)) by fixed-point iteration from eps(x_{j+1}, t_j), so the
    same timesteps and alphas as sampling are used in reverse and nothing is off by one.
    """
    ts = denoiser.timesteps(steps)
    traj = [None] * steps
    x = x0
    for j in reversed(range(steps)):
        t_from = ts[j + 1] if j + 1 < steps else None
        guess = x
        for _ in range(fixed_point + 1):
            eps = denoiser.predict_noise(guess, ts[j], cond)
            guess = denoiser.step(eps, t_from, ts[j], x)
        x = guess
        traj[j] = x
    return torch.stack(traj)


@torch.no_grad()
def reconstruct(denoiser: Denoiser, x_start: torch.Tensor, cond: torch.Tensor, steps: int
                ) -> torch.Tensor:
    """Unguided DDIM from the noisiest inverted latent back to a clean latent."""
    ts = denoiser.timesteps(steps)
    x = x_start
    for i, t in enumerate(ts):
        x = denoiser.step(denoiser.predict_noise(x, t, cond), t,
                          ts[i + 1] if i + 1 < len(ts) else None, x)
    return x


def noised_latents(denoiser: Denoiser, x0: torch.Tensor, steps: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Forward-process latents (steps, B, C, h, w): sqrt(a_t) x0 + sqrt(1 - a_t) eps per step."""
    ts = denoiser.timesteps(steps)
    out = []
    for t in ts:
        eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        a = denoiser.alpha(t)
        out.append(math.sqrt(a) * x0 + math.sqrt(1 - a) * eps)
    return torch.stack(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1], shape (B, ...)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1 / mse)


@torch.no_grad()
def record_maps(denoiser: Denoiser, latents: torch.Tensor, prompts: Sequence[str],
                groups: Sequence[Sequence[Sequence[int]]], record_steps: Sequence[int],
                steps: int, map_size: int = 16) -> torch.Tensor:
    """Maps (P, T, 2, C, S, S) for P prompts, each over its own trajectory.

    ``latents`` is (steps, P, C, h, w): prompt p reads trajectory p (repeat an image's
    trajectory for each of its prompts). One batched forward per recorded step.
    """
    ts = denoiser.timesteps(steps)
    cond = denoiser.encode_prompt(list(prompts))
    layers = denoiser.cross_attention_layers()
    out = []
    with AttentionRecorder(denoiser.attention_model, layers, [list(map(list, g)) for g in groups],
                           map_size=map_size) as rec:
        for s in record_steps:
            denoiser.predict_noise(latents[s], ts[s], cond)
            out.append(rec.stacked())  # (P, 2, C, S, S)
    return torch.stack(out, dim=1)
