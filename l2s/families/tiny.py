"""Tiny random SD-shaped components built from small configs, for offline tests and demos."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from l2s.engine.tokenizers import build_clip_tokenizer
from l2s.families.sd import SD_SCHEDULER
from l2s.families.unet import UNetDenoiser

TINY_WORDS = ("a an the of to and photo left right above below dog cat bird teddy bear "
              "hair drier cup bowl frog sneaker teapot").split()


def tiny_sd_components(prediction_type: str = "epsilon", seed: int = 0, sample_size: int = 16):
    """(unet, vae, text_encoder, tokenizer, scheduler) shaped like SD, a few MB in all.

    Two cross-attention levels (2 heads, then 4) so per-layer heads and resolutions differ.
    """
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(TINY_WORDS, model_max_length=32)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=(2, 4),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, layers_per_block=1, sample_size=sample_size * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": prediction_type})
    return unet, vae, text_encoder, tokenizer, scheduler


def tiny_sd(prediction_type: str = "epsilon", seed: int = 0, image_size: int | None = None
            ) -> UNetDenoiser:
    """A tiny SD-shaped Denoiser (latent space, VAE factor 2) with random weights."""
    unet, vae, text_encoder, tokenizer, scheduler = tiny_sd_components(prediction_type, seed)
    return UNetDenoiser(unet, text_encoder, tokenizer, scheduler, vae, name="tiny-sd",
                        image_size=image_size)


def save_tiny_sd(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Write the tiny components in diffusers layout, as a hub snapshot would be."""
    folder = Path(folder)
    unet, vae, text_encoder, tokenizer, scheduler = tiny_sd_components(prediction_type, seed)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler.save_pretrained(folder / "scheduler")
    return folder
