"""Adapter for diffusers UNet backbones (Stable Diffusion 1.x/2.x and the pixel-space toy)."""

from __future__ import annotations

import hashlib
import json

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from torch import nn

from l2s.engine.backbone import BackboneError, CrossAttnLayer, Denoiser
from l2s.engine.sampling import ddim_step, to_epsilon


def _incidental_config_key(key: str) -> bool:
    return key.startswith("_") or key.endswith("_version") or key in ("dtype", "torch_dtype")


def config_fingerprint(*modules: nn.Module | None) -> str:
    """A short stable hash of a model's identity: its configs and a sample of its weights.

    The name it was loaded by is left out on purpose: the same weights reached as a preset,
    a hub id or a folder share caches and classifiers.
    """
    h = hashlib.sha256(b"l2s-backbone")
    for m in modules:
        if m is None:
            continue
        cfg = getattr(m, "config", None)
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
        # Version stamps and the load dtype say how, not what, was loaded: transformers writes
        # "transformers_version" and "dtype" into to_dict(), so they would split caches
        # between machines with other library versions or a GPU (fp16).
        cfg = {k: v for k, v in cfg.items() if not _incidental_config_key(k)}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        # A few values of every parameter tensor: cheap, yet changes when weights change.
        for pname, p in m.named_parameters():
            h.update(pname.encode())
            # Rounded to fp16 so a model loaded in fp16 or fp32 gets the same fingerprint.
            h.update(p.detach().flatten()[:8].half().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def unet_cross_attention_layers(unet: UNet2DConditionModel, latent_hw: tuple[int, int]
                                ) -> list[CrossAttnLayer]:
    """Every `attn2` layer of a UNet with heads and query resolution for this latent size.

    UNet2DConditionModel halves the resolution after every down block but the last, and
    doubles it after every up block but the last; the mid block runs at the coarsest level.
    """
    n_down = len(unet.config.down_block_types)
    n_up = len(unet.config.up_block_types)
    h, w = latent_hw
    layers = []
    for proc_name in unet.attn_processors:
        name = proc_name.removesuffix(".processor")
        if not name.endswith("attn2"):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "mid_block":
            level = n_down - 1
        elif parts[0] == "up_blocks":
            level = n_up - 1 - int(parts[1])
        else:
            raise BackboneError(f"unexpected attention layer {name!r} in this UNet "
                                f"(diffusers {diffusers.__version__})")
        f = 2**level
        # Downsampling convs use stride 2 with padding 1, so odd sizes round up.
        res = (-(-h // f), -(-w // f))
        order = ({"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[parts[0]],
                 int(parts[1]) if parts[0] != "mid_block" else 0)
        layers.append((order, CrossAttnLayer(name, unet.get_submodule(name).heads, res)))
    # attn_processors lists the mid block last; forward order is down, mid, up.
    return [la for _, la in sorted(layers, key=lambda x: x[0])]


class UNetDenoiser(Denoiser):
    """A UNet2DConditionModel + CLIP text encoder + DDIM schedule, with an optional VAE.

    With ``vae=None`` the UNet works in pixel space (latents are images in [-1, 1]): the toy.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: nn.Module,
        tokenizer,
        scheduler: DDIMScheduler,
        vae: AutoencoderKL | None = None,
        *,
        name: str,
        image_size: int | tuple[int, int] | None = None,
        fingerprint: str | None = None,
        known_objects: tuple[str, ...] | None = None,
    ) -> None:
        self.unet, self.text_encoder, self._tokenizer, self.vae = unet, text_encoder, tokenizer, vae
        self.scheduler = scheduler
        self.name = name
        self.known_objects = known_objects
        self.vae_scale = 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)
        if image_size is None:
            image_size = unet.config.sample_size * self.vae_scale
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        multiple = self.vae_scale * 2 ** (len(unet.config.down_block_types) - 1)
        if image_size[0] % multiple or image_size[1] % multiple:
            raise BackboneError(f"image size {image_size[0]}x{image_size[1]} is not a multiple "
                                f"of {multiple} px, which this backbone needs; pick e.g. "
                                f"{(image_size[0] // multiple) * multiple or multiple}")
        self.image_size = image_size
        self.latent_hw = (image_size[0] // self.vae_scale, image_size[1] // self.vae_scale)
        self.prediction_type = scheduler.config.prediction_type
        self.device = unet.device
        self.dtype = unet.dtype
        self.fingerprint = fingerprint or config_fingerprint(unet, text_encoder, vae)
        for m in (unet, text_encoder, vae):
            if m is not None:
                m.requires_grad_(False).eval()
        self._layers = unet_cross_attention_layers(unet, self.latent_hw)
        if not self._layers:
            raise BackboneError(f"{name!r} has no cross-attention layers, so there is nothing "
                                "to record or steer: use a text-conditioned UNet")
        # Alphas in float64 on the CPU: the DDIM arithmetic is done in fp32 whatever the model.
        self._alphas = scheduler.alphas_cumprod.double()
        self._final_alpha = float(scheduler.final_alpha_cumprod)

    # --- interface -------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def attention_model(self) -> nn.Module:
        return self.unet

    def cross_attention_layers(self) -> list[CrossAttnLayer]:
        return list(self._layers)

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        tok = self._tokenizer
        enc = tok(list(prompts), padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt")
        ids = enc.input_ids.to(self.text_encoder.device)
        with torch.no_grad():
            emb = self.text_encoder(ids)[0]
        return emb.to(self.dtype)

    def prepare_latents(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        shape = (batch, self.unet.config.in_channels, *self.latent_hw)
        x = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32)
        return x.to(self.device, self.dtype)

    def timesteps(self, num_steps: int) -> list[int]:
        self.scheduler.set_timesteps(num_steps)
        return [int(t) for t in self.scheduler.timesteps]

    def alpha(self, t: int | None) -> float:
        return self._final_alpha if t is None or t < 0 else float(self._alphas[t])

    def predict_noise(self, latents: torch.Tensor, t: int, text_emb: torch.Tensor
                      ) -> torch.Tensor:
        out = self.unet(latents.to(self.dtype), t, encoder_hidden_states=text_emb).sample
        return to_epsilon(out.float(), latents.float(), self.alpha(t), self.prediction_type)

    def step(self, eps: torch.Tensor, t: int | None, t_next: int | None, latents: torch.Tensor
             ) -> torch.Tensor:
        x = ddim_step(latents.float(), eps.float(), self.alpha(t), self.alpha(t_next))
        return x.to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents.float()
        if self.vae is not None:
            with torch.no_grad():
                x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() * 2 - 1
        if self.vae is not None:
            with torch.no_grad():
                dist = self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist
                x = dist.mean.float() * self.vae.config.scaling_factor
        return x.to(self.device, self.dtype)
