"""The toy-mmdit model: a tiny Flux-architecture transformer on 32x32 pixel scenes.

A diffusers ``FluxTransformer2DModel`` (double- and single-stream blocks, 3-axis RoPE, no
guidance embedding, as FLUX.1 schnell) conditioned on the toy CLIP text encoder: its token
states feed the joint attention (``encoder_hidden_states``), its pooled EOS state the
modulation (``pooled_projections``). It works in pixel space: the RGB image in [-1, 1] is packed
2x2 exactly as Flux packs its VAE latents ((B, 3, 32, 32) -> (B, 256, 12)), so the "latent" is
the image itself and there is no VAE.

This module builds, saves and loads the networks. Everything that runs them is the engine's,
through the Flux family's adapter (``l2s.families.toy_mmdit.ToyMMDiTDenoiser``): packing and
position ids, sampling (``l2s.engine.sampling``, Euler on the scheduler's own sigmas, shift 1
as schnell, classifier-free guidance available since training drops 10% of captions) and the
joint-attention capture (``l2s.engine.hooks.AttentionRecorder``). The rectified-flow training
loss is ``l2s.toy.losses.flow_loss``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer

from l2s.toy.model import (
    build_toy_text_encoder,
    build_toy_tokenizer,
    load_components,
    save_components,
)

DEFAULT_MMDIT_WEIGHTS_DIR = Path(__file__).parent / "weights-mmdit"
MMDIT_REBUILD_COMMAND = "make toy-mmdit"
PATCH = 2  # 2x2 pixel packing, as Flux packs latents


@dataclass(frozen=True)
class ToyMMDiTConfig:
    """Sizes of the toy transformer and its text encoder (the same text encoder as the UNet toy)."""

    image_size: int = 32  # side of the square RGB images (pixel space: no VAE)
    heads: int = 4  # attention heads in every block
    head_dim: int = 32  # width per head; the transformer width is heads * head_dim
    rope_axes: tuple[int, int, int] = (8, 12, 12)  # RoPE dims per id axis (sum = head_dim)
    double_layers: int = 2  # double-stream (MMDiT) blocks
    single_layers: int = 4  # single-stream blocks
    text_width: int = 64  # text encoder hidden size = joint_attention_dim = pooled dim
    text_layers: int = 2
    text_heads: int = 4
    text_mlp: int = 256
    max_tokens: int = 24  # token positions incl. BOS/EOS (as the UNet toy)
    logit_mean: float = 0.0  # logit-normal timestep sampling (SD3): s = sigmoid(N(mean, std))
    logit_std: float = 1.0
    shift: float = 1.0  # sampling schedule shift (schnell: 1)


# --- components ------------------------------------------------------------------------------


def build_mmdit_scheduler(cfg: ToyMMDiTConfig) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


def build_mmdit_components(cfg: ToyMMDiTConfig, seed: int = 0) -> tuple[
        FluxTransformer2DModel, CLIPTextModel, CLIPTokenizer, FlowMatchEulerDiscreteScheduler]:
    """Fresh, randomly initialised (transformer, text_encoder, tokenizer, scheduler), seeded."""
    if sum(cfg.rope_axes) != cfg.head_dim:
        raise ValueError(f"rope_axes {cfg.rope_axes} must sum to head_dim {cfg.head_dim}")
    tokenizer = build_toy_tokenizer(cfg)
    torch.manual_seed(seed)
    text_encoder = build_toy_text_encoder(cfg, tokenizer)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=3 * PATCH * PATCH,
        num_layers=cfg.double_layers,
        num_single_layers=cfg.single_layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.text_width,
        pooled_projection_dim=cfg.text_width,
        guidance_embeds=False,
        axes_dims_rope=tuple(cfg.rope_axes),
    )
    return transformer, text_encoder, tokenizer, build_mmdit_scheduler(cfg)


def save_mmdit(directory: str | Path, transformer, text_encoder, tokenizer, scheduler) -> Path:
    """Write transformer/, text_encoder/, tokenizer/, scheduler/ (safetensors)."""
    return save_components(directory, "transformer", transformer, text_encoder, tokenizer,
                           scheduler)


def load_mmdit_components(directory: str | Path = DEFAULT_MMDIT_WEIGHTS_DIR):
    """Load (transformer, text_encoder, tokenizer, scheduler) saved by ``save_mmdit``, eval mode."""
    return load_components(directory, "transformer", FluxTransformer2DModel,
                           FlowMatchEulerDiscreteScheduler, what="toy-mmdit",
                           rebuild=MMDIT_REBUILD_COMMAND)
