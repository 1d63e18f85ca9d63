"""Latent update rules of a steered step, by name (`--optimizer`): a registry others add to.

An optimiser is built once per steered step on the step's latents z (A, ...) and moves the
rows still iterating: ``step(rows, z, g)`` -> their new latents. Its state, if any, lives per
image and restarts at every steered step; an image that stopped is never passed again, so its
latent and its state stay where they were. A plugin adds one with ``register_optimizer``,
from a module named by an ``l2s.optimizers`` entry point:

    from l2s.steering.optimizers import LatentOptimizer, register_optimizer

    @register_optimizer("sign")
    class Sign(LatentOptimizer):
        def step(self, rows, z, g):
            return z - self.step_size * g.sign()
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from l2s.engine.registry import Registry


class LatentOptimizer:
    """Plain gradient descent, z - step_size * g, and the interface of every update rule."""

    def __init__(self, step_size: float, z: torch.Tensor) -> None:
        self.step_size = step_size  # --step-size (SGD: alpha; Adam: learning rate)

    def step(self, rows: torch.Tensor, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """New latents of ``rows`` (M,) of the step's batch from their latents z and gradients
        g (M, ...)."""
        return z - self.step_size * g


_OPTIMIZERS: Registry[type[LatentOptimizer]] = Registry("optimizer", "l2s.optimizers",
                                                          from_worlds=False)


def register_optimizer(name: str) -> Callable[[type[LatentOptimizer]], type[LatentOptimizer]]:
    """Class decorator adding an update rule under ``name`` (``--optimizer NAME``)."""
    def add(cls: type[LatentOptimizer]) -> type[LatentOptimizer]:
        _OPTIMIZERS.register(name, cls)
        return cls

    return add


def optimizers() -> dict[str, type[LatentOptimizer]]:
    """Every registered update rule by name: the built-in ones, then the plugins'."""
    return _OPTIMIZERS.all()


register_optimizer("sgd")(LatentOptimizer)


@register_optimizer("adam")
class Adam(LatentOptimizer):
    """Adam (Kingma & Ba, 2015), betas (0.9, 0.999), its moments per image."""

    def __init__(self, step_size: float, z: torch.Tensor) -> None:
        super().__init__(step_size, z)
        self.m = torch.zeros_like(z, dtype=torch.float32)
        self.v = torch.zeros_like(z, dtype=torch.float32)
        self.n = torch.zeros(z.shape[0], device=z.device)

    def step(self, rows, z, g):
        shape = (-1, *[1] * (g.ndim - 1))
        b1, b2 = 0.9, 0.999
        m = self.m[rows] * b1 + (1 - b1) * g
        v = self.v[rows] * b2 + (1 - b2) * g * g
        n = self.n[rows] + 1
        self.m[rows], self.v[rows], self.n[rows] = m, v, n
        mh = m / (1 - b1**n).view(shape)
        vh = v / (1 - b2**n).view(shape)
        return z - self.step_size * mh / (vh.sqrt() + 1e-8)


@register_optimizer("normalized")
class Normalized(LatentOptimizer):
    """z - step_size * g / RMS(g) per image: a step of fixed size whatever the gradient's
    scale."""

    def step(self, rows, z, g):
        rms = g.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
        return z - self.step_size * g / rms.view(-1, *[1] * (g.ndim - 1))
