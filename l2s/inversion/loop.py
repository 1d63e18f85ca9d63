"""Image -> noisy-latent trajectories (inversion or forward noising) and map recording.

Everything goes through the Denoiser's schedule, so the same code inverts a DDPM family (DDIM
inversion) and a rectified-flow family (Euler inversion), and noises either.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from l2s.config import ConfigError, check_integer, check_number, is_whole
from l2s.engine.backbone import Conditioning, Denoiser
from l2s.engine.hooks import AttentionRecorder
from l2s.engine.registry import invert_defaults
from l2s.engine.sampling import denoise

INVERSION_METHODS = ("ddim", "noise")


@dataclass(frozen=True)
class InversionConfig:
    """How images become latents and when maps are recorded."""

    # "ddim": invert the deterministic sampler (DDIM; Euler for flow families);
    # "noise": forward-noise the image at each step (the schedule's add_noise).
    method: str = "ddim"
    steps: int = 50  # length of the DDIM schedule the recorded steps index into
    # refinement iterations per DDIM inversion step (0: plain inversion; None: the model's,
    # l2s.engine.registry.InvertDefaults, filled in by ``resolve``)
    fixed_point: int | None = None
    record_steps: tuple[int, ...] = (5, 10, 15, 20, 25, 49)  # step indices (0 = noisiest)
    map_size: int = 16  # side of the recorded, resized attention maps
    min_psnr: float = 20.0  # ddim: drop images that reconstruct worse than this (dB)

    def __post_init__(self) -> None:
        if self.method not in INVERSION_METHODS:
            raise ConfigError(f"unknown inversion {self.method!r}: use one of "
                              f"{', '.join(INVERSION_METHODS)}")
        check_integer("--steps", self.steps, 1, optional=False)
        # each refinement is one more network call per step: past a few nothing improves, and
        # 10^9 ran for days without a word
        check_integer("--fixed-point", self.fixed_point, 0, high=100)
        check_integer("--map-size", self.map_size, 1, optional=False)
        check_number("--min-psnr", self.min_psnr, -math.inf)
        if not isinstance(self.record_steps, tuple | list) or any(
                not is_whole(s) for s in self.record_steps):
            raise ConfigError(f"--timesteps takes whole step indices, got {self.record_steps!r}")
        bad = [s for s in self.record_steps if not 0 <= s < self.steps]
        if bad or not self.record_steps:
            raise ConfigError(f"recorded steps {bad or '()'} must lie in 0..{self.steps - 1} "
                              f"for a {self.steps}-step schedule")
        twice = sorted({s for s in self.record_steps if list(self.record_steps).count(s) > 1})
        if twice:  # each would be recorded, stored and trained on again
            raise ConfigError(f"--timesteps lists step {twice[0]} more than once: give each "
                              "recorded step once")

    def resolve(self, model: str) -> InversionConfig:
        """This config with every "model default" (None) filled in from ``model``'s
        inversion defaults."""
        if self.fixed_point is not None:
            return self
        return replace(self, fixed_point=invert_defaults(model).fixed_point)

    def latent_settings(self) -> dict:
        """What the cached latent trajectory depends on (not the recorded steps)."""
        return {"method": self.method, "steps": self.steps,
                "fixed_point": self.fixed_point if self.method == "ddim" else None}


@torch.no_grad()
def ddim_invert(denoiser: Denoiser, x0: torch.Tensor, cond: Conditioning, steps: int,
                fixed_point: int = 0, guidance: float = 1.0) -> torch.Tensor:
    """Invert the sampler: the latents (steps, B, ...) at each sampling timestep, noisiest first.

    Step j inverts the sampler's move t_j -> t_{j+1} (t_steps = the clean end): it solves
    x_j = step(x_{j+1}, pred(x_j, t_j)) by fixed-point iteration from pred(x_{j+1}, t_j), so
    the same timesteps as sampling are used in reverse and nothing is off by one. With a DDPM
    schedule this is DDIM inversion; with a flow schedule, Euler inversion (Mokady et al. 2023;
    fixed-point refinement as in Pan et al. 2023).
    """
    ts = denoiser.timesteps(steps)
    traj = [None] * steps
    x = x0.float()
    for j in reversed(range(steps)):
        t_from = ts[j + 1] if j + 1 < steps else None
        guess = x
        for _ in range(fixed_point + 1):
            pred = denoiser.predict(guess, ts[j], cond, guidance=guidance)
            guess = denoiser.step(pred, t_from, ts[j], x)
        x = guess
        traj[j] = x
    return torch.stack(traj)


def reconstruct(denoiser: Denoiser, x_start: torch.Tensor, cond: Conditioning, steps: int,
                guidance: float = 1.0) -> torch.Tensor:
    """The sampler (unguided by default) from the noisiest inverted latent to a clean one."""
    return denoise(denoiser, x_start, cond, steps=steps, guidance=guidance)


def noised_latents(denoiser: Denoiser, x0: torch.Tensor, steps: int,
                   generator: torch.Generator) -> torch.Tensor:
    """Forward-process latents (steps, B, ...): the schedule's add_noise at every step."""
    out = []
    for t in denoiser.timesteps(steps):
        eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        out.append(denoiser.add_noise(x0, eps, t))
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

    ``latents`` is (steps, P, ...): prompt p reads trajectory p (repeat an image's
    trajectory for each of its prompts). One batched forward per recorded step.
    """
    ts = denoiser.timesteps(steps)
    cond = denoiser.encode_prompt(list(prompts))
    layers = denoiser.cross_attention_layers()
    out = []
    with AttentionRecorder(denoiser, layers, [list(map(list, g)) for g in groups],
                           map_size=map_size) as rec:
        for s in record_steps:
            denoiser.predict(latents[s], ts[s], cond)
            out.append(rec.stacked())  # (P, 2, C, S, S)
    return torch.stack(out, dim=1)
