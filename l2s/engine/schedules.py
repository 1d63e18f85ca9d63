"""Noise schedules: the time grid and deterministic moves of DDPM and rectified-flow models.

A :class:`NoiseSchedule` is all the sampler, inversion and forward noising need to know about
a family's diffusion process. Both kinds run in float32 and in either direction, so one
sampling loop and one inversion routine serve every backbone:

* :class:`DDPMSchedule`: x_t = sqrt(a) x0 + sqrt(1 - a) eps with a = alpha_bar(t); the network
  predicts epsilon, v or x0, converted to epsilon; the move is deterministic DDIM (eta = 0).
* :class:`FlowMatchSchedule`: x_s = (1 - s) x0 + s noise (rectified flow, Liu et al. 2022;
  Esser et al. 2024); the network predicts the velocity noise - x0; the move is an Euler step.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

Timestep = int | float  # the family's model time: a DDPM timestep, or sigma * 1000 for flows

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class NoiseSchedule(ABC):
    """Time grid and deterministic moves of one diffusion process (float32 arithmetic)."""

    prediction: str  # what to_prediction returns and step consumes: "epsilon" or "velocity"
    max_steps: int | None = None  # the most sampling steps: the training timesteps

    @abstractmethod
    def timesteps(self, num_steps: int) -> list[Timestep]:
        """The sampling timesteps, noisiest first."""

    @abstractmethod
    def to_prediction(self, output: torch.Tensor, x: torch.Tensor, t: Timestep) -> torch.Tensor:
        """The network's raw output at (x, t) in the parameterisation ``step`` consumes."""

    @abstractmethod
    def step(self, pred: torch.Tensor, t: Timestep | None, t_next: Timestep | None,
             x: torch.Tensor) -> torch.Tensor:
        """Deterministic move from t to t_next (None: the clean end); runs both ways."""

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: Timestep) -> torch.Tensor:
        """The forward process: a sample at t from clean x0 and Gaussian noise."""


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


class DDPMSchedule(NoiseSchedule):
    """A discrete DDPM schedule sampled with deterministic DDIM, from a diffusers scheduler.

    The scheduler (``DDIMScheduler`` or any with ``alphas_cumprod`` and ``set_timesteps``)
    supplies alpha_bar and the timestep spacing; the arithmetic is ours, in float32, so
    v-prediction and x0-prediction models invert with no special case and there is no
    ``DDIMInverseScheduler`` with its ``steps_offset`` pitfalls.
    """

    prediction = "epsilon"

    def __init__(self, scheduler, prediction_type: str | None = None) -> None:
        self.scheduler = scheduler
        self.prediction_type = prediction_type or scheduler.config.prediction_type
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}: expected one "
                             f"of {', '.join(PREDICTION_TYPES)}")
        # Alphas as Python floats (float64): the DDIM arithmetic is done in fp32 whatever the
        # model, and reading one costs no tensor operation.
        self._alphas = scheduler.alphas_cumprod.double().tolist()
        self.max_steps = len(self._alphas)  # diffusers refuses a finer grid than training's
        self._final_alpha = float(getattr(scheduler, "final_alpha_cumprod", self._alphas[0]))

    def alpha(self, t: Timestep | None) -> float:
        """alpha_bar (signal fraction) at timestep t; None is the clean end of the schedule."""
        return self._final_alpha if t is None or t < 0 else self._alphas[int(t)]

    def timesteps(self, num_steps: int) -> list[int]:
        self.scheduler.set_timesteps(num_steps)
        return [int(t) for t in self.scheduler.timesteps]

    def to_prediction(self, output, x, t):
        return to_epsilon(output, x, self.alpha(t), self.prediction_type)

    def step(self, pred, t, t_next, x):
        return ddim_step(x, pred, self.alpha(t), self.alpha(t_next))

    def add_noise(self, x0, noise, t):
        a = self.alpha(t)
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * noise


def shifted_sigmas(num_steps: int, shift: float = 1.0) -> list[float]:
    """Linear sigmas 1 -> 1/n, time-shifted by ``shift``: s' = shift s / (1 + (shift - 1) s)
    (SD3, Esser et al. 2024)."""
    sig = [1 - i / num_steps for i in range(num_steps)]
    return [shift * s / (1 + (shift - 1) * s) for s in sig]


class FlowMatchSchedule(NoiseSchedule):
    """Rectified flow: x_s = (1 - s) x0 + s noise, velocity v = noise - x0, Euler moves.

    The model time is t = 1000 s (diffusers' flow-matching convention). ``sigmas(n)`` gives
    the n sampling sigmas, noisiest first (default: :func:`shifted_sigmas` with ``shift``; a
    family with resolution-dependent shifting, such as Flux-dev, passes its own). The clean
    end is s = 0. Euler backwards with the same grid is the inversion (fixed-point refined by
    :func:`l2s.inversion.loop.ddim_invert`), and ``add_noise`` is flow noising.
    """

    prediction = "velocity"

    def __init__(self, shift: float = 1.0,
                 sigmas: Callable[[int], Sequence[float]] | None = None,
                 num_train_timesteps: int = 1000) -> None:
        self.shift, self.num_train_timesteps = shift, num_train_timesteps
        self.max_steps = num_train_timesteps
        self._sigmas = sigmas or (lambda n: shifted_sigmas(n, shift))

    def sigma(self, t: Timestep | None) -> float:
        """The noise level s in [0, 1] at model time t; None is the clean end (0)."""
        return 0.0 if t is None else float(t) / self.num_train_timesteps

    def timesteps(self, num_steps: int) -> list[float]:
        return [float(s) * self.num_train_timesteps for s in self._sigmas(num_steps)]

    def to_prediction(self, output, x, t):
        return output

    def step(self, pred, t, t_next, x):
        return x + (self.sigma(t_next) - self.sigma(t)) * pred

    def add_noise(self, x0, noise, t):
        s = self.sigma(t)
        return (1 - s) * x0 + s * noise
