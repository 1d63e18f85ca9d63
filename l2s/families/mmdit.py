"""What the Flux.1 and SD3 families share: the flow-matching time grid their diffusers
pipelines use, the 16-channel VAE's scale and shift, joint-attention capture.

Sampling is the engine's: rectified flow x_s = (1 - s) x0 + s noise, Euler moves on the
velocity (``l2s.engine.schedules.FlowMatchSchedule``), inversion the same Euler ODE run
backwards with fixed-point refinement, ``--inversion noise`` flow noising. Only the sigma
grid is the pipelines', computed by diffusers' own FlowMatchEulerDiscreteScheduler so the
shift (and Flux-dev's resolution-dependent dynamic shift) cannot drift from theirs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from l2s.engine.backbone import (
    AttentionSink,
    CrossAttnLayer,
    Denoiser,
    checked_image_size,
    config_fingerprint,
    freeze,
    vae_scale,
)
from l2s.engine.hooks import HookError
from l2s.engine.loading import quiet_transformers
from l2s.engine.schedules import FlowMatchSchedule


def mmdit_dtype(dtype: torch.dtype) -> torch.dtype:
    """Flux and SD3 activations overflow fp16 (they were trained in bf16): a GPU's fp16
    default becomes bf16; fp32 (the CPU default) and bf16 stay."""
    return torch.bfloat16 if dtype == torch.float16 else dtype


def _calculate_shift():
    """diffusers' ``calculate_shift`` (FluxPipeline's mu), imported quietly."""
    with quiet_transformers():
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
    return calculate_shift


def pipeline_sigmas(scheduler_config: dict, num_steps: int, image_seq_len: int, *,
                    flux: bool) -> list[float]:
    """The n sampling sigmas (noisiest first) FluxPipeline / StableDiffusion3Pipeline use.

    Flux passes sigmas linspace(1, 1/n, n) and mu = calculate_shift(image tokens); SD3 lets
    the scheduler space them and passes mu only when the config asks for dynamic shifting.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    calculate_shift = _calculate_shift()
    sched = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
    cfg = sched.config
    kwargs = {}
    if flux or cfg.get("use_dynamic_shifting"):
        kwargs["mu"] = calculate_shift(
            image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15 if flux else 1.16))
    if flux:
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), **kwargs)
    else:
        sched.set_timesteps(num_steps, **kwargs)
    return [float(s) for s in sched.sigmas[:-1]]


class MMDiTDenoiser(Denoiser):
    """Shared base of the Flux and SD3 adapters: VAE, flow schedule, capture plumbing.

    Subclasses set ``latent_hw`` / ``latent_shape``, implement ``encode_prompt``,
    ``model_output``, ``_make_capture`` and the latent (un)packing around the VAE.
    ``vae`` None: a pixel-space model (the toy-mmdit), whose unpacked latents are the RGB
    image in [-1, 1].
    """

    patch = 1  # latent pixels per image token side (Flux packs 2x2; SD3 patches inside)
    pipeline_is_flux = False

    def __init__(self, transformer: nn.Module, vae: nn.Module | None,
                 text_encoders: list[nn.Module], tokenizer, scheduler_config: dict, *,
                 name: str, image_size, patch: int, default_size: int | None,
                 fingerprint: str | None) -> None:
        self.transformer, self.vae, self._tokenizer = transformer, vae, tokenizer
        self.text_encoders = text_encoders
        self.scheduler_config = dict(scheduler_config)
        self.name = name
        self.vae_scale = self._vae_scale(vae)
        self.patch = patch
        size = checked_image_size(image_size or default_size, self.vae_scale * patch)
        self.image_size = size
        self.latent_hw = (size[0] // self.vae_scale, size[1] // self.vae_scale)
        self.grid = (self.latent_hw[0] // patch, self.latent_hw[1] // patch)  # image tokens
        seq = self.grid[0] * self.grid[1]
        self.schedule = FlowMatchSchedule(
            sigmas=lambda n: pipeline_sigmas(self.scheduler_config, n, seq,
                                             flux=self.pipeline_is_flux))
        self.device, self.dtype = transformer.device, transformer.dtype
        freeze(transformer, vae, *text_encoders)
        self.fingerprint = fingerprint or config_fingerprint(transformer, vae, *text_encoders)

    # --- interface -------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def attention_model(self) -> nn.Module:
        return self.transformer

    def capture_processor(self, layer: CrossAttnLayer, original, sink: AttentionSink):
        proc = self._make_capture(layer, original, sink)
        if proc is None:
            raise HookError(f"{layer.name} runs {type(original).__name__}, whose joint "
                            "attention l2s cannot read: remove that adapter or processor "
                            "from the recorded layers")
        return proc

    def reference_processors(self) -> dict:
        """Every attention layer on an explicit-softmax processor that materialises its full
        (text + image)^2 matrix: the reference-style baseline of ``l2s speed``."""
        return {key: self._make_capture(CrossAttnLayer(key.removesuffix(".processor"), 0,
                                                       self.grid), proc, None, explicit=True)
                for key, proc in self.transformer.attn_processors.items()}

    def _make_capture(self, layer, original, sink, explicit: bool = False):
        raise NotImplementedError

    def _vae_scale(self, vae: nn.Module | None) -> int:
        """Pixels per latent cell (Qwen-Image's video VAE counts them its own way)."""
        return vae_scale(vae)

    def _timesteps(self, t, batch: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(batch,) copies of timestep t on the device: filled there from a Python number (no
        host-to-device copy), expanded from a 0-d tensor (``--compile`` passes one: reading
        its value with ``float()`` would break the compiled graph at every forward)."""
        if isinstance(t, torch.Tensor):
            return t.to(self.device, dtype or torch.float32).expand(batch)
        return torch.full((batch,), float(t), device=self.device, dtype=dtype)

    def _embedded_guidance(self, batch: int, guidance: float | None) -> torch.Tensor | None:
        """(batch,) guidance scales for a transformer that embeds the scale (Flux.1-dev,
        FLUX.2-dev), the preset's default when none is given; None for any other mode."""
        if self.guidance_mode != "embedded":
            return None
        scale = self.default_guidance if guidance is None else guidance
        return torch.full((batch,), float(scale), device=self.device, dtype=torch.float32)

    def _vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Our latents -> the VAE's (B, C, h, w) (identity unless packed)."""
        return latents

    def _our_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self._vae_latents(latents.float())
        if self.vae is not None:
            cfg = self.vae.config
            z = x / cfg.scaling_factor + (cfg.shift_factor or 0.0)
            with torch.no_grad():
                x = self.vae.decode(z.to(self.vae.device, self.vae.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() * 2 - 1
        if self.vae is None:
            return self._our_latents(x).to(self.device)
        cfg = self.vae.config
        with torch.no_grad():
            z = self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist.mean.float()
        z = (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
        return self._our_latents(z).to(self.device)
