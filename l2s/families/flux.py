"""The Flux.1 family (schnell, dev): presets, loader, random weights, and its Denoiser.

FluxPipeline's conventions, kept so a seed gives diffusers' image: latents (B, C, h, w)
packed 2x2 into tokens (B, h/2 * w/2, 4C) (our latents are the packed ones); T5 states
(max_sequence_length tokens) are the text the joint attention sees and the recorded maps
index; CLIP gives only the pooled vector; model time t = 1000 sigma goes in as t / 1000;
dev gets the guidance scale as an input ("embedded"), schnell none; no CFG batch.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from l2s.engine.backbone import Conditioning, vae_scale
from l2s.engine.hub import config_json
from l2s.engine.loading import (
    build_random,
    clip_text_config,
    load_components,
    random_tokenizers,
    random_weights_preset,
)
from l2s.engine.registry import (
    Family,
    LoadRequest,
    Preset,
    ReferenceLayout,
    SteerDefaults,
    register_family,
)
from l2s.families.joint_attention import (
    FluxCaptureProcessor,
    flux_attention_layers,
)
from l2s.families.mmdit import MMDiTDenoiser, mmdit_dtype
from l2s.families.mmdit_configs import FLUX_DEV, FLUX_SCHNELL

PRESETS = (
    Preset("flux-schnell", "flux", "black-forest-labs/FLUX.1-schnell",
           "FLUX.1-schnell (12B MMDiT, T5-XXL; timestep-distilled: 4 steps, no guidance; 256 px)",
           256, SteerDefaults(steps=4, guidance=0.0, steer_until=1),  # step 0 only (the paper)
           configs=FLUX_SCHNELL),
    Preset("flux-dev", "flux", "black-forest-labs/FLUX.1-dev",
           "FLUX.1-dev (12B MMDiT, T5-XXL; guidance-distilled: embedded scale 3.5; 512 px)",
           512, SteerDefaults(guidance=3.5), configs=FLUX_DEV),
)

_PRESETS = {p.name: p for p in PRESETS}


class FluxDenoiser(MMDiTDenoiser):
    """FluxTransformer2DModel + CLIP (pooled) + T5 (states) + 16-channel VAE, flow matching.

    ``layers``: which joint-attention layers are recorded, "all" 57 (19 double-stream, then
    38 single-stream blocks) or "double" (the 19 double-stream ones).
    """

    pipeline_is_flux = True
    reference_layout = "flux"  # published Flux classifiers: channel = layer x 24 + head
    max_text_len = 512  # FluxPipeline refuses a longer max_sequence_length
    # No cuDNN attention: on torch 2.11 + CUDA 13 (H200) its backward died in every Flux
    # steering iteration (illegal memory access, docs/design.md); flash / memory-efficient ran.
    sdpa_backends = ("flash", "mem_efficient", "math")

    def __init__(self, transformer, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 scheduler_config: dict, *, name: str, image_size=None,
                 max_sequence_length: int = 512, layers: str = "all",
                 guidance: float = 3.5, fingerprint: str | None = None) -> None:
        super().__init__(transformer, vae, [text_encoder, text_encoder_2], tokenizer_2,
                         scheduler_config, name=name, image_size=image_size, patch=2,
                         # The VAE's sample size: 1024 for FLUX.1, FluxPipeline's default
                         # (a pixel-space model without VAE must be given image_size).
                         default_size=vae.config.sample_size if vae is not None else None,
                         fingerprint=fingerprint)
        self.text_encoder, self.clip_tokenizer = text_encoder, tokenizer
        self.text_encoder_2 = text_encoder_2
        # The T5 length (``text_len``): what prompts are padded to, the keys every map spans;
        # prompts longer are refused. ``set_text_len`` changes it (a classifier's length).
        tokenizer_2.model_max_length = max_sequence_length
        self.guidance_mode = "embedded" if transformer.config.guidance_embeds else "none"
        self.default_guidance = guidance
        channels = transformer.config.in_channels  # = 4 x the VAE's latent channels
        self.latent_shape = (self.grid[0] * self.grid[1], channels)
        self.layers = layers
        flux_attention_layers(transformer, self.grid, layers)  # validates the layer set
        ids = torch.zeros(*self.grid, 3)
        ids[..., 1] += torch.arange(self.grid[0])[:, None]
        ids[..., 2] += torch.arange(self.grid[1])[None, :]
        self._img_ids = ids.reshape(-1, 3).to(self.device, self.dtype)  # (N, 3): (0, row, col)

    def cross_attention_layers(self):
        return flux_attention_layers(self.transformer, self.grid, self.layers)

    def _make_capture(self, layer, original, sink, explicit: bool = False):
        if isinstance(original, FluxCaptureProcessor):  # e.g. the reference baseline's
            mode = original.mode
        elif type(original) is FluxAttnProcessor:
            mode = "explicit" if explicit else "capture"
        else:
            return None
        return FluxCaptureProcessor(layer, sink, self.text_len, mode=mode, original=original)

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        clip_ids = self.clip_tokenizer(
            list(prompts), padding="max_length", truncation=True, return_tensors="pt",
            max_length=self.clip_tokenizer.model_max_length).input_ids
        t5_ids = self._tokenizer(list(prompts), padding="max_length", truncation=True,
                                 max_length=self.text_len, return_tensors="pt").input_ids
        with torch.no_grad():
            pooled = self.text_encoder(clip_ids.to(self.text_encoder.device)).pooler_output
            states = self.text_encoder_2(t5_ids.to(self.text_encoder_2.device))[0]
        return Conditioning(
            {"states": states.to(self.device, self.dtype), "pooled": pooled.to(self.device,
                                                                                self.dtype)},
            {"text_ids": torch.zeros(self.text_len, 3, device=self.device, dtype=self.dtype)})

    def model_output(self, latents, t, cond, guidance):
        b = latents.shape[0]
        g = self._embedded_guidance(b, guidance)
        timestep = self._timesteps(t, b, latents.dtype) / 1000
        return self.transformer(
            hidden_states=latents, timestep=timestep, guidance=g,
            pooled_projections=cond["pooled"], encoder_hidden_states=cond["states"],
            txt_ids=cond["text_ids"], img_ids=self._img_ids, return_dict=False)[0]

    def prepare_latents(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        # FluxPipeline draws (B, C, h, w) and packs it: same draw, same seed -> same image.
        c = self.latent_shape[1] // 4
        z = torch.randn((batch, c, *self.latent_hw), generator=generator, dtype=torch.float32)
        return self._our_latents(z).to(self.device)

    def _our_latents(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h/2 * w/2, 4C): each 2x2 patch one token (FluxPipeline order)."""
        b, c, h, w = z.shape
        z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return z.reshape(b, (h // 2) * (w // 2), c * 4)

    def _vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, ch = latents.shape
        h, w = self.grid
        z = latents.view(b, h, w, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return z.reshape(b, ch // 4, h * 2, w * 2)


def load_flux(source: str, *, name: str, device: torch.device, dtype: torch.dtype,
              preset: Preset | None = None, image_size: int | None = None) -> FluxDenoiser:
    """A FLUX.1 folder or hub repo in diffusers layout (FluxPipeline's components), loaded as
    ``preset`` (its image size, T5 length and guidance) or, when no preset names it, as its
    look-alike preset (``look_alike``): that preset's token grid (the map resolution its
    published classifier read) at this model's own pixels per token (VAE scale x 2), its T5
    length capped by the tokenizer, its guidance. ``image_size`` overrides the size."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    dtype = mmdit_dtype(dtype)
    c = load_components(source, "Flux", {
        "transformer": (FluxTransformer2DModel, {"torch_dtype": dtype}),
        "vae": (AutoencoderKL, {"torch_dtype": torch.float32}),
        "text_encoder": (CLIPTextModel, {"torch_dtype": dtype}),
        "tokenizer": (CLIPTokenizer, {}),
        "text_encoder_2": (T5EncoderModel, {"torch_dtype": dtype}),
        "tokenizer_2": (T5TokenizerFast, {}),
        "scheduler": (FlowMatchEulerDiscreteScheduler, {})})
    transformer, vae, tokenizer_2 = c["transformer"], c["vae"], c["tokenizer_2"]
    if preset is not None:
        image_size = image_size or preset.image_size
    else:
        preset = _PRESETS[look_alike(transformer.config)]
        image_size = image_size or token_grid(preset) * vae_scale(vae) * 2  # 2x2 cells a token
    # A tokenizer limited below the preset's T5 length (a tiny test model's) caps it.
    max_len = min(preset.configs["max_sequence_length"], tokenizer_2.model_max_length)
    return FluxDenoiser(transformer.to(device), vae.to(device), c["text_encoder"].to(device),
                        c["tokenizer"], c["text_encoder_2"].to(device), tokenizer_2,
                        dict(c["scheduler"].config),
                        name=name, image_size=image_size, max_sequence_length=max_len,
                        guidance=preset.defaults.guidance or 3.5)


def token_grid(preset: Preset) -> int:
    """Image tokens a side at the preset's image size (flux-schnell 16, flux-dev 32): the map
    resolution its published classifier was trained on."""
    levels = len(preset.configs["vae"]["block_out_channels"])
    return preset.image_size // (2 ** (levels - 1) * 2)


def build_random_flux(preset: Preset, *, device: torch.device, dtype: torch.dtype,
                      image_size: int | None = None, seed: int = 0) -> FluxDenoiser:
    """A preset's exact architecture with random weights, each tensor allocated once, in
    its dtype, on the device (``l2s.engine.materialise``)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    cfg, dtype = preset.configs, mmdit_dtype(dtype)
    max_len = cfg["max_sequence_length"]
    tokenizer, tokenizer_2 = random_tokenizers(cfg)
    clip_cfg = clip_text_config(cfg["text_encoder"], tokenizer)
    nets = build_random({
        "transformer": lambda: FluxTransformer2DModel(**cfg["transformer"]),
        "text_encoder_2": lambda: T5EncoderModel(T5Config(**cfg["text_encoder_2"])),
        "text_encoder": lambda: CLIPTextModel(clip_cfg),
        "vae": lambda: AutoencoderKL(**cfg["vae"])}, device, dtype, seed=seed)
    return FluxDenoiser(nets["transformer"], nets["vae"], nets["text_encoder"], tokenizer,
                        nets["text_encoder_2"], tokenizer_2,
                        cfg["scheduler"], name=f"{preset.name} (random weights)",
                        image_size=image_size or preset.image_size, max_sequence_length=max_len,
                        guidance=preset.defaults.guidance,
                        fingerprint=f"{preset.name}-random-{seed}")


def load(req: LoadRequest) -> FluxDenoiser:
    """The family's loader: a preset (or its random-weights architecture), hub id or folder."""
    if req.random_weights:
        return build_random_flux(random_weights_preset(req.preset, PRESETS), device=req.device,
                                 dtype=req.dtype, image_size=req.image_size)
    return load_flux(req.source, name=req.model, device=req.device, dtype=req.dtype,
                     preset=req.preset, image_size=req.image_size)


def look_alike(transformer_config) -> str:
    """The preset a Flux model no preset names is taken for: flux-dev when its transformer
    takes a guidance input (guidance-distilled, as FLUX.1-dev: embedded scale 3.5,
    FluxPipeline's default and the reference's), else flux-schnell (4 steps, step 0 steered,
    256 px); SD's defaults (guidance 7.5) fit neither."""
    return "flux-dev" if transformer_config.get("guidance_embeds") else "flux-schnell"


def like_preset(source: str) -> str | None:
    """``look_alike`` of a folder or hub id, from its transformer config (a folder, or a repo
    in the HF cache; None when that is not on disk)."""
    cfg = config_json(source, "transformer/config.json")
    return None if cfg is None else look_alike(cfg)


def flux_layout(layers):
    """The published Flux classifiers' layout: the 19 double-stream then 38 single-stream
    blocks, 24 heads each, channel = layer x 24 + head (l2s's forward order already); 16x16
    maps (schnell at 256 px) are used as they are, larger ones (dev at 512 px: 32x32) resized
    bilinearly and renormalised."""
    from l2s.classifier.layout import LayoutError, MapLayout

    if not any(la.name.startswith("single_transformer_blocks.") for la in layers):
        raise LayoutError("the published Flux classifiers read all 57 blocks, double- and "
                          "single-stream: record every layer (FluxDenoiser layers='all')")
    return MapLayout("flux", None, "bilinear", "resized")


def flux_shaped(arch) -> bool:
    """The published Flux classifiers' sizes (extractor 4 layers, feed-forward 512)."""
    return arch.extractor_layers == 4 and arch.extractor_ff == 512


# Their maps were softmaxed over 512 T5 keys (the reference's run.py), schnell's as dev's.
REFERENCE = ReferenceLayout("flux", "Flux", flux_layout, text_len=512, shaped=flux_shaped,
                            shape="extractor 4 layers, ff 512",
                            presets=("flux-schnell", "flux-dev"))

def from_pipeline(pipe, name: str, image_size: int | None = None,
                  text_len: int | None = None) -> FluxDenoiser:
    """A FluxPipeline's components behind ``Denoiser``; ``text_len``: the call's
    max_sequence_length (None: FluxPipeline's 512, or less where its T5 tokenizer stops)."""
    return FluxDenoiser(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                        pipe.text_encoder_2, pipe.tokenizer_2, dict(pipe.scheduler.config),
                        name=name, image_size=image_size,
                        max_sequence_length=text_len or min(
                            pipe.tokenizer_2.model_max_length, FluxDenoiser.max_text_len))


register_family(Family("flux", load, pipelines=("FluxPipeline",), like_preset=like_preset,
                       reference_layout=REFERENCE, from_pipeline=from_pipeline),
                PRESETS)
