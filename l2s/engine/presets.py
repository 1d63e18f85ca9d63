"""Named backbones: hub ids and the exact architecture configs of the SD presets."""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class Preset:
    """A backbone users can name with ``--model``."""

    name: str  # what users type
    family: str  # adapter family: "toy" or "sd"
    repo_id: str | None  # hub id (None: shipped inside the package)
    description: str  # one line for `l2s models`
    image_size: int  # default generation size in pixels
    steps: int  # default DDIM steps
    guidance: float  # default classifier-free guidance scale
    step_size: float  # default steering step size (method.md: 7.5 for SD1.4, 5 for SD2.1)
    # Early-exit loss: None = method.md's schedule (1e-5 rising to 7e-5); a number = fixed.
    loss_threshold: float | None = None
    # Exact architecture configs for --random-weights: component -> config kwargs.
    configs: dict = field(default_factory=dict, compare=False, repr=False)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("toy", "toy", None, "tiny pixel-space shapes model shipped with l2s (offline)",
               32, 20, 3.0, 5.0,
               # The toy stops once its classifier agrees: p(target) >= 0.9.
               loss_threshold=0.105),
        Preset(
            "sd1.4", "sd", "CompVis/stable-diffusion-v1-4",
            "Stable Diffusion 1.4 (CLIP ViT-L/14, epsilon prediction, 512 px)", 512, 50, 7.5, 7.5,
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
            "Stable Diffusion 2.1 (OpenCLIP ViT-H, v-prediction, 768 px)", 768, 50, 7.5, 5.0,
            configs={
                # diffusers' "attention_head_dim" here is really the head count per block.
                "unet": {**_SD_UNET, "sample_size": 96, "cross_attention_dim": 1024,
                         "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True,
                         "upcast_attention": True},
                "vae": {**_SD_VAE, "sample_size": 768},
                # The SD2 text encoder keeps 23 of OpenCLIP's 24 layers (penultimate output).
                "text_encoder": {**_CLIP_TEXT, "hidden_size": 1024, "intermediate_size": 4096,
                                 "num_attention_heads": 16, "num_hidden_layers": 23,
                                 "hidden_act": "gelu", "projection_dim": 512},
                "scheduler": {**SD_SCHEDULER, "prediction_type": "v_prediction"},
            },
        ),
    )
}


def generation_defaults(model: str, steps: int | None = None, guidance: float | None = None
                        ) -> tuple[int, float]:
    """Steps and guidance: the ones given, else the preset's, else SD's 50 and 7.5."""
    p = PRESETS.get(model)
    return (steps or (p.steps if p else 50),
            guidance if guidance is not None else (p.guidance if p else 7.5))
