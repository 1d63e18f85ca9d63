"""Tiny random Flux.1- and SD3-shaped components for offline tests, in diffusers layout.

The transformer, VAE and CLIP sizes are the ones diffusers' own pipeline tests use
(tests/pipelines/flux, tests/pipelines/stable_diffusion_3); the T5 encoder has the sizes of
hf-internal-testing/tiny-random-t5, and every tokenizer is built locally from a word list,
so nothing comes from the hub.
"""

from __future__ import annotations

from pathlib import Path

import torch

from l2s.engine.tokenizers import build_clip_tokenizer, build_t5_tokenizer

TINY_WORDS = ("a an the of to and photo left right above below dog cat bird teddy bear "
              "cup bowl frog sneaker teapot").split()
TINY_T5_TOKENS = 32  # the tiny pipelines' max_sequence_length


def _clip_config(tokenizer, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=5,
        num_attention_heads=4, layer_norm_eps=1e-5, hidden_act="gelu", projection_dim=32,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)


def _t5(tokenizer):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="relu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _vae(latent_channels: int, sample_size: int = 32):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=sample_size, in_channels=3, out_channels=3, block_out_channels=(4,),
        layers_per_block=1, latent_channels=latent_channels, norm_num_groups=1,
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
        scaling_factor=1.5035)


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = False,
                       blocks: tuple[int, int] = (1, 1), image_size: int = 32):
    """A diffusers FluxPipeline of tiny random components (VAE factor 1, 1-channel latents
    packed 2x2 into the transformer's 4 channels), a few hundred kB in all.

    ``blocks``: (double-stream, single-stream) block counts; ``image_size``: the VAE's sample
    size, the folder's default image side (32: 16x16 maps as schnell at 256 px; 64: 32x32
    maps as dev at 512 px)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(TINY_WORDS)
    tokenizer_2 = build_t5_tokenizer(TINY_WORDS, model_max_length=TINY_T5_TOKENS)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=blocks[0], num_single_layers=blocks[1],
        attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=guidance_embeds)
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
    text_encoder_2 = _t5(tokenizer_2)
    scheduler = FlowMatchEulerDiscreteScheduler(
        **({"use_dynamic_shifting": True, "shift": 3.0} if guidance_embeds else {}))
    return FluxPipeline(scheduler=scheduler, vae=_vae(1, image_size), text_encoder=text_encoder,
                        tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                        tokenizer_2=tokenizer_2, transformer=transformer)


def tiny_sd3_pipeline(seed: int = 0):
    """A diffusers StableDiffusion3Pipeline of tiny random components (4-channel latents)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(TINY_WORDS)
    tokenizer_3 = build_t5_tokenizer(TINY_WORDS, model_max_length=TINY_T5_TOKENS)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4)
    text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(4), text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=build_clip_tokenizer(TINY_WORDS),
        text_encoder_3=_t5(tokenizer_3), tokenizer_3=tokenizer_3)


def save_tiny(folder: str | Path, kind: str = "flux", seed: int = 0, **kwargs) -> Path:
    """Write a tiny "flux" or "sd3" pipeline in diffusers layout, as a hub snapshot is."""
    make = {"flux": tiny_flux_pipeline, "sd3": tiny_sd3_pipeline}[kind]
    folder = Path(folder)
    make(seed, **kwargs).save_pretrained(folder)
    return folder
