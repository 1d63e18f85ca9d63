"""The Stable Diffusion 1.x/2.x family: presets, exact architectures, loaders, registration.

Loads any diffusers-layout SD folder or hub repo (``StableDiffusionPipeline``) and is the
fallback for folders without ``model_index.json`` (a folder without ``vae/`` is a pixel-space
UNet, as the toy is saved). ``--random-weights`` builds a preset's exact architecture from
the configs below. The adapter is :class:`l2s.families.unet.UNetDenoiser`.
"""

from __future__ import annotations

from pathlib import Path

import torch

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
from l2s.families.unet import UNetDenoiser, unet_layout

# Shared by SD 1.x and 2.x (the CompVis/Stability releases' scheduler configs).
SD_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
    "steps_offset": 1, "timestep_spacing": "leading",
}
_SD_UNET = {
    "in_channels": 4, "out_channels": 4, "layers_per_block": 2, "act_fn": "silu",
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
}
_SD_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}
_CLIP_TEXT = {
    "vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
    "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    "attention_dropout": 0.0, "dropout": 0.0,
}
# SD 2.x (2.1 and 2.1-base differ in sample size, prediction type and upcast_attention).
# diffusers' "attention_head_dim" here is really the head count per block: 5/10/20/20 heads
# of 64 channels (the mid block 20), so 195 cross-attention maps. Checked against the hub's
# unet/config.json: stabilityai/stable-diffusion-2-1-base has sample_size 64 and
# upcast_attention false (absent, i.e. false, in its first revision), stable-diffusion-2-1
# sample_size 96 and upcast_attention true; both attention_head_dim [5, 10, 20, 20].
_SD2_UNET = {**_SD_UNET, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
             "use_linear_projection": True}
# The SD2 text encoder keeps 23 of OpenCLIP's 24 layers (penultimate output).
_SD2_TEXT = {**_CLIP_TEXT, "hidden_size": 1024, "intermediate_size": 4096,
             "num_attention_heads": 16, "num_hidden_layers": 23, "hidden_act": "gelu",
             "projection_dim": 512}

PRESETS = (
    Preset(
        "sd1.4", "sd", "CompVis/stable-diffusion-v1-4",
        "Stable Diffusion 1.4 (CLIP ViT-L/14, epsilon prediction, 512 px)", 512,
        SteerDefaults(step_size=7.5),  # the paper: 7.5 for SD1.4
        configs={
            "unet": {**_SD_UNET, "sample_size": 64, "cross_attention_dim": 768,
                     "attention_head_dim": 8},
            "vae": {**_SD_VAE, "sample_size": 512},
            "text_encoder": {**_CLIP_TEXT, "hidden_size": 768, "intermediate_size": 3072,
                             "num_attention_heads": 12, "num_hidden_layers": 12,
                             "hidden_act": "quick_gelu", "projection_dim": 768},
            "scheduler": {**SD_SCHEDULER, "prediction_type": "epsilon"},
        },
    ),
    Preset(
        "sd2.1", "sd", "stabilityai/stable-diffusion-2-1",
        "Stable Diffusion 2.1 (OpenCLIP ViT-H, v-prediction, 768 px); the published L2S SD2 "
        "classifier does not fit it: use sd2.1-base", 768,
        SteerDefaults(),  # the paper's SD values
        configs={
            "unet": {**_SD2_UNET, "sample_size": 96, "upcast_attention": True},
            "vae": {**_SD_VAE, "sample_size": 768},
            "text_encoder": _SD2_TEXT,
            "scheduler": {**SD_SCHEDULER, "prediction_type": "v_prediction"},
        },
    ),
    Preset(
        "sd2.1-base", "sd", "stabilityai/stable-diffusion-2-1-base",
        "Stable Diffusion 2.1 base (OpenCLIP ViT-H, epsilon prediction, 512 px): the "
        "backbone of the published L2S SD2 classifier", 512,
        SteerDefaults(),  # the paper's SD values
        configs={
            "unet": {**_SD2_UNET, "sample_size": 64},
            "vae": {**_SD_VAE, "sample_size": 512},
            "text_encoder": _SD2_TEXT,
            "scheduler": {**SD_SCHEDULER, "prediction_type": "epsilon"},
        },
    ),
)

def load_sd(repo: str, *, name: str, device: torch.device, dtype: torch.dtype,
            image_size: int | None = None) -> UNetDenoiser:
    """Load a Stable Diffusion 1.x/2.x folder or hub repo (diffusers layout) under the loading
    policy (``l2s.engine.loading.load_components``: safetensors only unless allowed).

    Downloads go through the HF cache; with HF_HUB_OFFLINE=1 only cached files are used.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(repo).expanduser()
    # A local folder without vae/ is a pixel-space model (as the toy is saved).
    pixel_space = local.is_dir() and not (local / "vae").exists()
    parts = {"unet": (UNet2DConditionModel, {"torch_dtype": dtype}),
             # The VAE stays fp32 beside an fp16 UNet: SD VAEs overflow to inf/NaN in fp16
             # decoding.
             "vae": (AutoencoderKL, {"torch_dtype": torch.float32}),
             "text_encoder": (CLIPTextModel, {"torch_dtype": dtype}),
             "tokenizer": (CLIPTokenizer, {}),
             "scheduler": (DDIMScheduler, {})}
    if pixel_space:
        del parts["vae"]
    c = load_components(repo, "Stable Diffusion", parts)
    vae = c.get("vae")
    return UNetDenoiser(c["unet"].to(device), c["text_encoder"].to(device), c["tokenizer"],
                        c["scheduler"], vae.to(device) if vae is not None else None, name=name,
                        image_size=image_size)


def build_random_sd(preset: Preset, *, device: torch.device, dtype: torch.dtype,
                    image_size: int | None = None, seed: int = 0) -> UNetDenoiser:
    """The exact architecture of an SD preset with random weights and a local tokenizer."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    cfg = preset.configs
    tokenizer, _ = random_tokenizers(cfg)
    text_cfg = clip_text_config(cfg["text_encoder"], tokenizer)
    nets = build_random({"unet": lambda: UNet2DConditionModel(**cfg["unet"]),
                         "vae": lambda: AutoencoderKL(**cfg["vae"]),
                         "text_encoder": lambda: CLIPTextModel(text_cfg)},
                        device, dtype, seed=seed)
    return UNetDenoiser(nets["unet"], nets["text_encoder"], tokenizer,
                        DDIMScheduler(**cfg["scheduler"]), nets["vae"],
                        name=f"{preset.name} (random weights)",
                        image_size=image_size or preset.image_size,
                        fingerprint=f"{preset.name}-random-{seed}")


def load(req: LoadRequest) -> UNetDenoiser:
    """The family's loader: a preset (or its random-weights architecture), hub id or folder."""
    if req.random_weights:
        return build_random_sd(random_weights_preset(req.preset, PRESETS), device=req.device,
                               dtype=req.dtype, image_size=req.image_size)
    return load_sd(req.source, name=req.model, device=req.device, dtype=req.dtype,
                   image_size=req.image_size)


# The published SD classifiers read the UNet's own CLIP keys (77), whatever their count.
REFERENCE = ReferenceLayout("unet", "SD", unet_layout, presets=("sd1.4", "sd2.1-base"),
                            note="their SD2 classifier; not sd2.1, the 768 px v-prediction "
                                 "model")

def from_pipeline(pipe, name: str, image_size: int | None = None,
                  text_len: int | None = None) -> UNetDenoiser:
    """A StableDiffusionPipeline's components behind ``Denoiser`` (CLIP fixes the length)."""
    return UNetDenoiser(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, pipe.vae,
                        name=name, image_size=image_size)


register_family(Family("sd", load, pipelines=("StableDiffusionPipeline",), fallback=True,
                       reference_layout=REFERENCE, from_pipeline=from_pipeline),
                PRESETS)
