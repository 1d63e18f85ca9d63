"""The toy text-to-image model: a tiny pixel-space UNet and CLIP text encoder for 32x32 scenes.

The components are ordinary diffusers/transformers classes built from configs, so every engine
code path (attention processors, schedulers, ``from_pretrained``) runs on them unchanged.
``build_toy_components`` makes fresh random ones; ``save_toy`` / ``load_toy_components`` move
them to and from a folder in the usual subfolder layout (unet/, text_encoder/, tokenizer/,
scheduler/). Training lives in ``l2s.toy.train``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from l2s.engine.tokenizers import build_clip_tokenizer

# Where the committed weights live, and how to rebuild them when they are missing.
DEFAULT_WEIGHTS_DIR = Path(__file__).parent / "weights"
REBUILD_COMMAND = ("make toy-model` (or `python -m l2s.toy.train --out runs/toy --resume "
                   "--export l2s/toy/weights")



@dataclass(frozen=True)
class ToyModelConfig:
    """Sizes of the toy UNet, text encoder and noise schedule."""

    image_size: int = 32  # side of the square RGB images, in pixels (pixel space: no VAE)
    unet_channels: tuple[int, ...] = (32, 64, 64)  # UNet widths at 32x32, 16x16, 8x8
    layers_per_block: int = 1  # resnets per down block (up blocks get one more)
    attention_heads: int = 4  # heads in every cross-attention layer (16x16, 8x8 and mid)
    norm_groups: int = 8  # GroupNorm groups; must divide every UNet width
    text_width: int = 64  # text encoder hidden size = the UNet's cross_attention_dim
    text_layers: int = 2  # transformer layers in the text encoder
    text_heads: int = 4  # attention heads in the text encoder
    text_mlp: int = 256  # text encoder MLP width
    # Token positions incl. BOS/EOS: the longest training caption (a relation plus three more
    # objects, with commas) is 24 tokens; longer prompts are truncated.
    max_tokens: int = 24
    train_timesteps: int = 1000  # discrete noise levels of the schedule
    beta_schedule: str = "squaredcos_cap_v2"  # cosine schedule, suited to 32x32 images
    prediction_type: str = "sample"  # UNet output: "sample" (x0), "v_prediction" or "epsilon"
    timestep_spacing: str = "trailing"  # DDIM step spacing; trailing starts sampling at t = T-1


def _vocabulary() -> tuple[str, ...]:
    # Imported lazily so building a tokenizer for tests does not need the scene module at import.
    from l2s.toy.scenes import VOCABULARY

    return tuple(VOCABULARY)


def build_toy_tokenizer(cfg: ToyModelConfig) -> CLIPTokenizer:
    """The word-level CLIP tokenizer over the toy vocabulary: one token per known word.

    The tokenizers shipped with the weights (``weights/tokenizer``, ``weights-mmdit/tokenizer``)
    were built before ``build_clip_tokenizer`` kept that promise: they spell "triangle" as 6
    pieces (every other vocabulary word as one token, with the ids this builds). The shipped
    models were trained with them, so they stay: the supervision and the recorded maps average
    a word's pieces (``l2s.engine.tokens.phrase_tokens``), so "triangle" still has one map.
    """
    return build_clip_tokenizer(_vocabulary(), model_max_length=cfg.max_tokens)


def build_toy_scheduler(cfg: ToyModelConfig) -> DDIMScheduler:
    """The DDIM scheduler the toy model is trained and sampled with."""
    return DDIMScheduler(
        num_train_timesteps=cfg.train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        timestep_spacing=cfg.timestep_spacing,
        clip_sample=True,  # images live in [-1, 1]; clipping the x0 estimate keeps colours flat
        clip_sample_range=1.0,
        set_alpha_to_one=True,
        steps_offset=0,
    )


def build_toy_text_encoder(cfg, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A fresh toy CLIP text encoder (``cfg``: any toy config with the text_* sizes and
    max_tokens), initialised from torch's global random state."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_width,
            intermediate_size=cfg.text_mlp,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=cfg.max_tokens,
            projection_dim=cfg.text_width,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_toy_components(
    cfg: ToyModelConfig, seed: int = 0
) -> tuple[UNet2DConditionModel, CLIPTextModel, CLIPTokenizer, DDIMScheduler]:
    """Fresh, randomly initialised (unet, text_encoder, tokenizer, scheduler), seeded."""
    tokenizer = build_toy_tokenizer(cfg)
    torch.manual_seed(seed)
    text_encoder = build_toy_text_encoder(cfg, tokenizer)
    n = len(cfg.unet_channels)
    # Full resolution is plain convolution; cross-attention only where objects are a few cells.
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    unet = UNet2DConditionModel(
        sample_size=cfg.image_size,
        in_channels=3,
        out_channels=3,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(cfg.unet_channels),
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_groups,
        cross_attention_dim=cfg.text_width,
        # diffusers reads this legacy-named argument as the number of heads.
        attention_head_dim=cfg.attention_heads,
    )
    return unet, text_encoder, tokenizer, build_toy_scheduler(cfg)


def save_components(directory: str | Path, net_name: str, net, text_encoder, tokenizer,
                    scheduler) -> Path:
    """Write a toy's four components as <net_name>/, text_encoder/, tokenizer/, scheduler/
    (networks as safetensors); the UNet toy and the toy-mmdit share this layout."""
    directory = Path(directory)
    net.save_pretrained(directory / net_name, safe_serialization=True)
    text_encoder.save_pretrained(directory / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(directory / "tokenizer")
    scheduler.save_pretrained(directory / "scheduler")
    return directory


def load_components(directory: str | Path, net_name: str, net_class, scheduler_class, *,
                    what: str, rebuild: str) -> tuple:
    """(net, text_encoder, tokenizer, scheduler) written by ``save_components``, networks in
    eval mode; a missing or unreadable file is named with the command that rebuilds it."""
    directory = Path(directory)
    required = (f"{net_name}/config.json", f"{net_name}/diffusion_pytorch_model.safetensors",
                "text_encoder/config.json", "text_encoder/model.safetensors",
                "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
                "scheduler/scheduler_config.json")
    for name in required:
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{what} model file {directory / name} is missing; rebuild "
                                    f"the weights with `{rebuild}`")
    try:
        # shipped weights are safetensors: never unpickle a .bin put beside them
        net = net_class.from_pretrained(directory / net_name, use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(directory / "text_encoder",
                                                     use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
        scheduler = scheduler_class.from_pretrained(directory / "scheduler")
    except Exception as err:  # safetensors, json and config errors share no base class
        raise OSError(f"{what} model in {directory} could not be loaded ({err}); rebuild the "
                      f"weights with `{rebuild}`") from err
    return net.eval(), text_encoder.eval(), tokenizer, scheduler


def save_toy(
    directory: str | Path,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    scheduler: DDIMScheduler,
) -> Path:
    """Write the four components as unet/, text_encoder/, tokenizer/, scheduler/ (safetensors)."""
    return save_components(directory, "unet", unet, text_encoder, tokenizer, scheduler)


def load_toy_components(
    directory: str | Path = DEFAULT_WEIGHTS_DIR,
) -> tuple[UNet2DConditionModel, CLIPTextModel, CLIPTokenizer, DDIMScheduler]:
    """Load (unet, text_encoder, tokenizer, scheduler) saved by ``save_toy``, in eval mode."""
    return load_components(directory, "unet", UNet2DConditionModel, DDIMScheduler, what="toy",
                           rebuild=REBUILD_COMMAND)

