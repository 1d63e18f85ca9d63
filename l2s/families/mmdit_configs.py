"""Exact architecture configs of the Flux.1 and SD3.5 presets (for ``--random-weights``).

Every number is the hub repo's ``<component>/config.json`` (black-forest-labs/FLUX.1-schnell,
black-forest-labs/FLUX.1-dev, stabilityai/stable-diffusion-3.5-medium), cross-checked against
Black Forest Labs' reference Flux config (hidden 3072 = 24 heads x 128, depth 19 + 38, RoPE
axes 16/56/56, vec_in_dim 768, context 4096, AE z 16, scale 0.3611, shift 0.1159). Keys are
the diffusers / transformers constructor arguments; version stamps are left out.
"""

from __future__ import annotations

# google/t5-v1_1-xxl encoder: text_encoder_2 of both Flux repos, text_encoder_3 of SD3.5.
T5_XXL = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
    "num_heads": 64, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}
# openai/clip-vit-large-patch14 text tower: Flux's text_encoder (CLIPTextModel, pooled
# output only) and SD3.5's text_encoder (CLIPTextModelWithProjection).
CLIP_L = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
    "dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}
# laion CLIP-ViT-bigG-14 text tower: SD3.5's text_encoder_2 (CLIPTextModelWithProjection).
CLIP_G = {
    **CLIP_L, "hidden_size": 1280, "intermediate_size": 5120, "projection_dim": 1280,
    "num_hidden_layers": 32, "num_attention_heads": 20, "hidden_act": "gelu",
}
# The 16-channel AutoencoderKL both families use; only scaling and shift differ.
_VAE16 = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 2,
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 1024, "force_upcast": True, "mid_block_add_attention": True,
    "use_quant_conv": False, "use_post_quant_conv": False,
}
_FLUX_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56],
}
# FLUX.1-dev's scheduler/config.json; schnell's differs only in shift 1.0, no dynamic shift.
_FLUX_SCHEDULER = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
    "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

FLUX_SCHNELL = {
    "transformer": {**_FLUX_TRANSFORMER, "guidance_embeds": False},
    "vae": {**_VAE16, "scaling_factor": 0.3611, "shift_factor": 0.1159},
    "text_encoder": CLIP_L,
    "text_encoder_2": T5_XXL,
    "scheduler": {**_FLUX_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False},
    # FluxPipeline's max_sequence_length: 512 is its default and what dev uses; schnell is
    # commonly run (and was distilled) with 256.
    "max_sequence_length": 256,
}
FLUX_DEV = {
    **FLUX_SCHNELL,
    "transformer": {**_FLUX_TRANSFORMER, "guidance_embeds": True},
    "scheduler": _FLUX_SCHEDULER,
    "max_sequence_length": 512,
}
SD35_MEDIUM = {
    "transformer": {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16,
        "num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
        "joint_attention_dim": 4096, "caption_projection_dim": 1536,
        "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
        "dual_attention_layers": list(range(13)), "qk_norm": "rms_norm",
    },
    "vae": {**_VAE16, "scaling_factor": 1.5305, "shift_factor": 0.0609},
    "text_encoder": CLIP_L,
    "text_encoder_2": CLIP_G,
    "text_encoder_3": T5_XXL,
    "scheduler": {"num_train_timesteps": 1000, "shift": 3.0},
    # StableDiffusion3Pipeline: 77 CLIP tokens, then max_sequence_length = 256 T5 tokens.
    "max_sequence_length": 256,
}
