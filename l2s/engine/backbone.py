"""The one denoiser interface every backbone adapter implements (toy, SD UNet, later Flux)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn


class BackboneError(RuntimeError):
    """A backbone could not be loaded or used; the message says what to do."""


@dataclass(frozen=True)
class CrossAttnLayer:
    """One cross-attention layer the hooks can record."""

    name: str  # module path, e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    heads: int  # attention heads in this layer
    resolution: tuple[int, int]  # (h, w) of its query grid at the backbone's image size


class Denoiser(ABC):
    """A text-conditioned denoiser seen through the operations l2s needs.

    Inversion, steering and benchmarks talk only to this interface, so they never branch on
    the model family. Every method works on batches; latents are (B, C, h, w).
    """

    name: str  # preset name, hub id or local path it was loaded from
    fingerprint: str  # model id + config/weights hash: keys caches and classifier cards
    image_size: tuple[int, int]  # (H, W) in pixels of generated images
    prediction_type: str  # what the network predicts: "epsilon", "v_prediction" or "sample"
    device: torch.device
    dtype: torch.dtype
    # Object words a closed-vocabulary model (the toy) can draw; None: open vocabulary.
    known_objects: tuple[str, ...] | None = None

    @property
    @abstractmethod
    def tokenizer(self):
        """The prompt tokenizer (a transformers fast tokenizer with offset mappings)."""

    @property
    @abstractmethod
    def attention_model(self) -> nn.Module:
        """The module whose attention processors the hooks replace (diffusers API)."""

    @abstractmethod
    def cross_attention_layers(self) -> list[CrossAttnLayer]:
        """All cross-attention layers, in forward order, with heads and resolution."""

    @abstractmethod
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, T, D) for the prompts; "" is the unconditional prompt."""

    @abstractmethod
    def prepare_latents(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        """Initial Gaussian latents (B, C, h, w) for the backbone's image size."""

    @abstractmethod
    def timesteps(self, num_steps: int) -> list[int]:
        """The sampling timesteps, noisiest first."""

    @abstractmethod
    def predict_noise(
        self, latents: torch.Tensor, t: int, text_emb: torch.Tensor
    ) -> torch.Tensor:
        """The network's noise estimate epsilon (B, C, h, w), whatever it predicts natively."""

    @abstractmethod
    def step(self, eps: torch.Tensor, t: int | None, t_next: int | None, latents: torch.Tensor
             ) -> torch.Tensor:
        """One deterministic scheduler move from t to t_next; None is the clean end.

        Runs in either direction: inversion calls it with t_next noisier than t.
        """

    @abstractmethod
    def alpha(self, t: int | None) -> float:
        """alpha_bar (signal fraction) at timestep t; None is the clean end of the schedule."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, H, W, 3) float in [0, 1] from clean latents."""

    @abstractmethod
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Clean latents (B, C, h, w) from images (B, H, W, 3) float in [0, 1]."""
