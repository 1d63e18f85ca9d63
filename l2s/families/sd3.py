"""The Stable Diffusion 3 / 3.5 family: preset, loader, random weights, and its Denoiser.

StableDiffusion3Pipeline's conventions: CLIP-L and CLIP-G penultimate states side by side
(77 tokens, zero-padded to T5's width), then T5 (max_sequence_length = 256 tokens): 333 text
tokens in all; pooled = both CLIPs' projections; classifier-free guidance on a [uncond; cond]
batch; model time t = 1000 sigma as is; latents (B, 16, h, w), patched 2x2 inside the
transformer. Joint attention is image-first. Recorded maps index the CLIP-L tokens (the
first 77 of the text), softmaxed over all 333 text keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0

from l2s.engine.backbone import Conditioning
from l2s.engine.loading import (
    build_random,
    clip_text_config,
    load_components,
    random_tokenizers,
    random_weights_preset,
)
from l2s.engine.registry import Family, LoadRequest, Preset, SteerDefaults, register_family
from l2s.families.joint_attention import SD3CaptureProcessor, sd3_attention_layers
from l2s.families.mmdit import MMDiTDenoiser, mmdit_dtype
from l2s.families.mmdit_configs import SD35_MEDIUM

PRESETS = (
    # 40 steps and guidance 4.5: the model card's example settings.
    Preset("sd3.5-medium", "sd3", "stabilityai/stable-diffusion-3.5-medium",
           "Stable Diffusion 3.5 Medium (2.5B MMDiT-X, CLIP-L + CLIP-G + T5-XXL, 1024 px)",
           1024, SteerDefaults(steps=40, guidance=4.5), configs=SD35_MEDIUM),
)


class SD3Denoiser(MMDiTDenoiser):
    """SD3Transformer2DModel + two CLIPs + T5 + 16-channel VAE, flow matching with CFG."""

    guidance_mode = "cfg"

    def __init__(self, transformer, vae, text_encoders, tokenizers, scheduler_config: dict, *,
                 name: str, image_size=None, max_sequence_length: int = 256,
                 fingerprint: str | None = None) -> None:
        super().__init__(transformer, vae, list(text_encoders), tokenizers[0], scheduler_config,
                         name=name, image_size=image_size, patch=transformer.config.patch_size,
                         default_size=transformer.config.sample_size
                         * 2 ** (len(vae.config.block_out_channels) - 1),
                         fingerprint=fingerprint)
        self.tokenizers = list(tokenizers)
        self.max_sequence_length = max_sequence_length
        self.latent_shape = (transformer.config.in_channels, *self.latent_hw)

    @property
    def text_len(self) -> int:
        return self.tokenizers[0].model_max_length + self.max_sequence_length  # CLIP, then T5

    def cross_attention_layers(self):
        return sd3_attention_layers(self.transformer, self.grid)

    def _make_capture(self, layer, original, sink, explicit: bool = False):
        if isinstance(original, SD3CaptureProcessor):
            mode = original.mode
        elif type(original) is JointAttnProcessor2_0:
            mode = "explicit" if explicit else "capture"
        else:
            return None
        return SD3CaptureProcessor(layer, sink, mode=mode)

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        prompts = list(prompts)
        states, pooled = [], []
        with torch.no_grad():
            for enc, tok in zip(self.text_encoders[:2], self.tokenizers[:2], strict=True):
                ids = tok(prompts, padding="max_length", max_length=self.tokenizers[0]
                          .model_max_length, truncation=True, return_tensors="pt").input_ids
                out = enc(ids.to(enc.device), output_hidden_states=True)
                pooled.append(out[0])
                states.append(out.hidden_states[-2])  # penultimate layer, as the pipeline
            t5_ids = self.tokenizers[2](prompts, padding="max_length", truncation=True,
                                        max_length=self.max_sequence_length,
                                        return_tensors="pt").input_ids
            t5 = self.text_encoders[2](t5_ids.to(self.text_encoders[2].device))[0]
        clip = torch.cat(states, dim=-1).to(self.device)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        text = torch.cat([clip, t5.to(self.device, clip.dtype)], dim=-2)  # (B, 77 + T5, D)
        return Conditioning({"states": text.to(self.dtype),
                             "pooled": torch.cat(pooled, dim=-1).to(self.device, self.dtype)})

    def model_output(self, latents, t, cond, guidance):
        timestep = self._timesteps(t, latents.shape[0])
        return self.transformer(hidden_states=latents, timestep=timestep,
                                encoder_hidden_states=cond["states"],
                                pooled_projections=cond["pooled"], return_dict=False)[0]


def load_sd3(source: str, *, name: str, device: torch.device, dtype: torch.dtype,
             image_size: int | None = None, max_sequence_length: int = 256) -> SD3Denoiser:
    """An SD3 / SD3.5 folder or hub repo in diffusers layout (with its T5 encoder)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import (
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5TokenizerFast,
    )

    dtype = mmdit_dtype(dtype)
    c = load_components(source, "Stable Diffusion 3", {
        "transformer": (SD3Transformer2DModel, {"torch_dtype": dtype}),
        "vae": (AutoencoderKL, {"torch_dtype": torch.float32}),
        "text_encoder": (CLIPTextModelWithProjection, {"torch_dtype": dtype}),
        "tokenizer": (CLIPTokenizer, {}),
        "text_encoder_2": (CLIPTextModelWithProjection, {"torch_dtype": dtype}),
        "tokenizer_2": (CLIPTokenizer, {}),
        "text_encoder_3": (T5EncoderModel, {"torch_dtype": dtype}),
        "tokenizer_3": (T5TokenizerFast, {}),
        "scheduler": (FlowMatchEulerDiscreteScheduler, {})})
    encoders = [c[f"text_encoder{s}"].to(device) for s in ("", "_2", "_3")]
    tokenizers = [c[f"tokenizer{s}"] for s in ("", "_2", "_3")]
    return SD3Denoiser(c["transformer"].to(device), c["vae"].to(device), encoders, tokenizers,
                       dict(c["scheduler"].config), name=name, image_size=image_size,
                       max_sequence_length=min(max_sequence_length,
                                               tokenizers[2].model_max_length))


def build_random_sd3(preset: Preset, *, device: torch.device, dtype: torch.dtype,
                     image_size: int | None = None, seed: int = 0) -> SD3Denoiser:
    """The preset's exact architecture with random weights, allocated once on the device."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    cfg, dtype = preset.configs, mmdit_dtype(dtype)
    clip_tok, t5_tok = random_tokenizers(cfg)
    nets = build_random({
        **{c: lambda c=c: CLIPTextModelWithProjection(clip_text_config(cfg[c], clip_tok))
           for c in ("text_encoder", "text_encoder_2")},
        "text_encoder_3": lambda: T5EncoderModel(T5Config(**cfg["text_encoder_3"])),
        "transformer": lambda: SD3Transformer2DModel(**cfg["transformer"]),
        "vae": lambda: AutoencoderKL(**cfg["vae"])}, device, dtype, seed=seed)
    transformer, vae = nets["transformer"], nets["vae"]
    encoders = [nets[c] for c in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    return SD3Denoiser(transformer, vae, encoders, [clip_tok, clip_tok, t5_tok],
                       cfg["scheduler"], name=f"{preset.name} (random weights)",
                       image_size=image_size or preset.image_size,
                       max_sequence_length=cfg["max_sequence_length"],
                       fingerprint=f"{preset.name}-random-{seed}")


def load(req: LoadRequest) -> SD3Denoiser:
    """The family's loader: the preset (or its random-weights architecture), hub id, folder."""
    if req.random_weights:
        return build_random_sd3(random_weights_preset(req.preset, PRESETS), device=req.device,
                                dtype=req.dtype, image_size=req.image_size)
    p = req.preset
    return load_sd3(req.source, name=req.model, device=req.device, dtype=req.dtype,
                    image_size=req.image_size or (p.image_size if p else None))


def from_pipeline(pipe, name: str, image_size: int | None = None,
                  text_len: int | None = None) -> SD3Denoiser:
    """A StableDiffusion3Pipeline's components behind ``Denoiser``; ``text_len``: the call's
    T5 max_sequence_length (None: the pipeline's 256, or less where its T5 tokenizer stops)."""
    return SD3Denoiser(pipe.transformer, pipe.vae,
                       [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
                       [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3],
                       dict(pipe.scheduler.config), name=name, image_size=image_size,
                       max_sequence_length=text_len or min(pipe.tokenizer_3.model_max_length,
                                                           256))


register_family(Family("sd3", load, pipelines=("StableDiffusion3Pipeline",),
                       from_pipeline=from_pipeline), PRESETS)
