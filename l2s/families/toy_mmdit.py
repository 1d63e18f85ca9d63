"""The toy-mmdit family: the tiny Flux-architecture shapes model shipped with l2s ("toy-mmdit").

Its networks and trainer live in ``l2s.toy.mmdit`` / ``l2s.toy.train``; this module adapts them
through the Flux family's ``FluxDenoiser`` (same 2x2 packing, position ids, joint-attention
capture, timestep t / 1000, no guidance embedding) with what differs in the toy:

* pixel space, no VAE: the unpacked latents are the RGB image in [-1, 1] (``MMDiTDenoiser``
  with ``vae=None``); the trainer forwards its live networks through this same adapter
  (``trainable=True``), so training, evaluation and steering share packing, time and capture;
* one toy CLIP text encoder gives both the token states the joint attention sees and the
  pooled vector of the modulation;
* the sigma grid is the toy scheduler's own spacing (shift 1), as the toy was evaluated,
  not FluxPipeline's linspace(1, 1/n);
* classifier-free guidance works (the training dropped 10% of captions), so the guidance
  mode is "cfg"; the default scale 1 samples without it, as schnell (measured on 100 prompts,
  seed 1: both present 0.92 / position 0.27 at 1, 0.94 / 0.29 at 3: not worth the 2x cost).
"""

from __future__ import annotations

import torch

from l2s.engine.backbone import BackboneError, Conditioning
from l2s.engine.loading import random_weights_preset
from l2s.engine.registry import (
    Family,
    InvertDefaults,
    LoadRequest,
    Preset,
    SteerDefaults,
    presets,
    register_family,
)
from l2s.families.flux import FluxDenoiser
from l2s.toy.world import TRAINING, WORLD

PRESET = Preset("toy-mmdit", "toy-mmdit", None,
                "tiny Flux-architecture (MMDiT) pixel-space shapes model shipped with l2s "
                "(offline)",
                32, SteerDefaults(
                    steps=20, guidance=1.0, step_size=0.04, optimizer="normalized",
                    # Tuned for the shipped (flow-inverted) classifier on 64 shapes prompts
                    # of seed 1 (docs/design.md, "Steering loop"): steps 0-4 at step size 0.04
                    # gave position 0.95 where the previous defaults (steps 0-2, 0.02) gave
                    # 0.84; stopping at p(target) >= 0.8 (loss 0.22) or 0.9 made no difference.
                    steer_until=5, loss_threshold=0.22),
                training=TRAINING, world=WORLD,
                # Plain Euler inversion: fixed-point refinement diverges on this model (PSNR
                # of 5 two-shape scenes at 20 steps: 75-120 dB plain, 15-70 dB with 2
                # refinements; at 50 steps 91-120 dB against 65-78 dB)
                inversion=InvertDefaults(fixed_point=0))


class ToyMMDiTDenoiser(FluxDenoiser):
    """The toy-mmdit (FluxTransformer2DModel on 2x2-packed 32x32 RGB) behind ``Denoiser``."""

    pipeline_is_flux = False  # the scheduler's own sigma spacing (the toy's sampling grid)
    reference_layout = None  # no published classifier reads the toy's maps
    max_text_len = None  # its CLIP text encoder's positions fix the length

    def __init__(self, transformer, text_encoder, tokenizer, scheduler_config: dict, *,
                 name: str = "toy-mmdit", image_size=None, world=None,
                 trainable: bool = False) -> None:
        super().__init__(transformer, None, text_encoder, tokenizer, text_encoder, tokenizer,
                         scheduler_config, name=name,
                         image_size=image_size or PRESET.image_size,
                         max_sequence_length=tokenizer.model_max_length, guidance=1.0)
        self.guidance_mode = "cfg"
        self.world = world
        if trainable:  # the toy trainer's networks: gradients stay on (the base freezes them)
            transformer.requires_grad_(True)
            text_encoder.requires_grad_(True)

    def pack(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, H/2 * W/2, 12), Flux's 2x2 packing."""
        return self._our_latents(images)

    def unpack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, H/2 * W/2, 12) -> images (B, 3, H, W): the inverse of ``pack``."""
        return self._vae_latents(latents)

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        ids = self._tokenizer(list(prompts), padding="max_length", truncation=True,
                              max_length=self.text_len, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.encode_ids(ids)

    def encode_ids(self, ids: torch.Tensor) -> Conditioning:
        """Conditioning from token ids (B, T), in the autograd graph when gradients are on
        (the trainer's text encoder learns with the transformer)."""
        out = self.text_encoder(ids.to(self.text_encoder.device))
        return Conditioning(
            {"states": out.last_hidden_state.to(self.device, self.dtype),
             "pooled": out.pooler_output.to(self.device, self.dtype)},
            {"text_ids": torch.zeros(self.text_len, 3, device=self.device, dtype=self.dtype)})


def available(preset: Preset) -> bool:
    from l2s.toy.mmdit import DEFAULT_MMDIT_WEIGHTS_DIR

    return (DEFAULT_MMDIT_WEIGHTS_DIR / "transformer").is_dir()


def load(req: LoadRequest) -> ToyMMDiTDenoiser:
    """The shipped toy-mmdit weights on the requested device and dtype."""
    if req.random_weights:
        random_weights_preset(req.preset, presets().values())  # refuses: trained weights only
    from l2s.families.mmdit import mmdit_dtype
    from l2s.toy.mmdit import DEFAULT_MMDIT_WEIGHTS_DIR, load_mmdit_components

    try:
        transformer, text_encoder, tokenizer, scheduler = load_mmdit_components(
            DEFAULT_MMDIT_WEIGHTS_DIR)
    except OSError as e:  # missing or corrupt weights: the message names the rebuild
        raise BackboneError(str(e)) from e
    dt = mmdit_dtype(req.dtype)
    transformer = transformer.to(req.device) if dt == transformer.dtype else transformer.to(
        req.device, dt)
    return ToyMMDiTDenoiser(transformer, text_encoder.to(req.device),
                            tokenizer, dict(scheduler.config), image_size=req.image_size,
                            world=WORLD)


register_family(Family("toy-mmdit", load, available=available), [PRESET])
