"""The Stable Diffusion XL family: preset, exact architecture, loaders, and its Denoiser.

StableDiffusionXLPipeline's conventions: two CLIP text encoders (CLIP ViT-L, then OpenCLIP
ViT-bigG with its projection) each read the prompt with their own tokenizer, padded to 77
tokens; their penultimate hidden states are joined along the feature axis, (B, 77, 768 +
1280), so the UNet's cross-attention keys are 77 token positions, each carrying both
encoders' features. The two tokenizers share CLIP's vocabulary and merges (only the padding
token differs: "<|endoftext|>" and "!"), so position i is the same BPE piece of the prompt
in both: 0 is the start token, 1..n the prompt's pieces in order, n + 1 the end token, then
padding. A map of token i is one word's map for both encoders, and token alignment reads the
first tokenizer's offsets. The UNet also gets bigG's pooled projection and six size ids
(original size, crop top-left, target size: (H, W, 0, 0, H, W)) through its "text_time"
added embedding. Classifier-free guidance on an [uncond; cond] batch; SDXL base's
unconditional branch is all zeros (states and pooled: the pipeline's
``force_zeros_for_empty_prompt``), not the encoded empty prompt. Sampling is DDIM on the
scheduler's alphas, as for SD (the hub's EulerDiscreteScheduler config gives the same
timesteps and noise levels). The adapter is :class:`UNetDenoiser` with the text side
replaced; capture is the UNet's (``families/unet.py``).
"""

from __future__ import annotations

import copy

import torch

from l2s.engine.backbone import BackboneError, Conditioning, config_fingerprint, freeze
from l2s.engine.hub import config_json
from l2s.engine.loading import (
    build_random,
    clip_text_config,
    load_components,
    random_tokenizers,
    random_weights_preset,
)
from l2s.engine.registry import Family, LoadRequest, Preset, SteerDefaults, register_family
from l2s.families.sd import SD_SCHEDULER
from l2s.families.unet import UNetDenoiser

# The hub's configs of stabilityai/stable-diffusion-xl-base-1.0 (unet/, vae/, text_encoder/,
# text_encoder_2/): what --random-weights builds. 70 cross-attention layers: 4 + 20 down,
# 10 mid, 30 + 6 up (transformer depths 1/2/10 per level, no attention at the first level),
# 10 or 20 heads of 64 channels: 1300 maps per token, at 64x64 and 32x32 for 1024 px.
_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "act_fn": "silu", "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,  # 6 size ids x 256 + bigG's 1280
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
    "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
}
_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.13025, "force_upcast": True, "sample_size": 1024,
}
_CLIP = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
         "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
         "attention_dropout": 0.0, "dropout": 0.0}
SDXL_BASE = {
    "unet": _UNET,
    "vae": _VAE,
    "text_encoder": {**_CLIP, "hidden_size": 768, "intermediate_size": 3072,  # CLIP ViT-L
                     "num_attention_heads": 12, "num_hidden_layers": 12,
                     "hidden_act": "quick_gelu", "projection_dim": 768},
    "text_encoder_2": {**_CLIP, "hidden_size": 1280, "intermediate_size": 5120,  # bigG
                       "num_attention_heads": 20, "num_hidden_layers": 32,
                       "hidden_act": "gelu", "projection_dim": 1280},
    "scheduler": {**SD_SCHEDULER, "prediction_type": "epsilon"},
}

PRESETS = (
    Preset(
        "sdxl", "sdxl", "stabilityai/stable-diffusion-xl-base-1.0",
        "Stable Diffusion XL base 1.0 (CLIP ViT-L + OpenCLIP ViT-bigG, epsilon prediction, "
        "1024 px); steering defaults not yet tuned on real weights", 1024,
        # Sampling: StableDiffusionXLPipeline's defaults, which the model card's example uses
        # (50 steps, guidance 5). Steering: SD2.x's values from the paper. SDXL keeps SD's
        # noise schedule and epsilon prediction, so a latent step of a given size is the same
        # fraction of the noise at every timestep, and like SD2.x it reads OpenCLIP states
        # through linear projections. Its 128x128 latents have 4x the cells of SD at 512 px
        # and each 16x16 map cell averages 4x more queries, so the gradient per latent cell is
        # likely smaller: 5 errs on the gentle side. Not tuned on real weights.
        SteerDefaults(steps=50, guidance=5.0, step_size=5.0, iterations=16, steer_from=0,
                      steer_until=0.5),
        configs=SDXL_BASE,
    ),
)


class SDXLDenoiser(UNetDenoiser):
    """SDXL's UNet (with its "text_time" added embedding) + two CLIP encoders + VAE, DDIM on
    its DDPM schedule, CFG as StableDiffusionXLPipeline does it."""

    def __init__(self, unet, text_encoders, tokenizers, scheduler, vae, *, name: str,
                 image_size=None, fingerprint: str | None = None,
                 zero_uncond: bool = True) -> None:
        te, te2 = text_encoders
        if unet.config.addition_embed_type != "text_time":
            raise BackboneError(f"{name!r} is not an SDXL UNet (addition_embed_type "
                                f"{unet.config.addition_embed_type!r}, not 'text_time')")
        super().__init__(unet, te, tokenizers[0], scheduler, vae, name=name,
                         image_size=image_size,
                         fingerprint=fingerprint or config_fingerprint(unet, te, te2, vae))
        self.text_encoder_2, self.tokenizer_2 = te2, tokenizers[1]
        freeze(te2)
        # The pipeline's force_zeros_for_empty_prompt: "" (the unconditional prompt the
        # sampling loop encodes) becomes zero states and a zero pooled vector, SDXL base's
        # caption-dropout input; False encodes "" as any prompt.
        self.zero_uncond = zero_uncond

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        prompts = list(prompts)
        states = []
        with torch.no_grad():
            for enc, tok in ((self.text_encoder, self._tokenizer),
                             (self.text_encoder_2, self.tokenizer_2)):
                ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
                          truncation=True, return_tensors="pt").input_ids
                out = enc(ids.to(enc.device), output_hidden_states=True)
                states.append(out.hidden_states[-2].to(self.device))  # penultimate layer
        pooled = out.text_embeds.to(self.device)  # the second encoder's projection (B, 1280)
        text = torch.cat(states, dim=-1)  # (B, 77, 768 + 1280): one position, both encoders
        if self.zero_uncond:
            keep = torch.tensor([p != "" for p in prompts], device=self.device)
            text = torch.where(keep[:, None, None], text, 0.0)
            pooled = torch.where(keep[:, None], pooled, 0.0)
        h, w = self.image_size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], device=self.device).expand(len(prompts), 6)
        return Conditioning({"states": text.to(self.dtype), "pooled": pooled.to(self.dtype),
                             "time_ids": time_ids.to(self.dtype)})

    def unet_inputs(self, cond: Conditioning) -> dict:
        return {"encoder_hidden_states": cond["states"],
                "added_cond_kwargs": {"text_embeds": cond["pooled"],
                                      "time_ids": cond["time_ids"]}}


def load_sdxl(source: str, *, name: str, device: torch.device, dtype: torch.dtype,
              image_size: int | None = None) -> SDXLDenoiser:
    """An SDXL folder or hub repo in diffusers layout, under the loading policy."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    c = load_components(source, "Stable Diffusion XL", {
        "unet": (UNet2DConditionModel, {"torch_dtype": dtype}),
        # fp32: SDXL's VAE overflows in fp16 (its config's force_upcast)
        "vae": (AutoencoderKL, {"torch_dtype": torch.float32}),
        "text_encoder": (CLIPTextModel, {"torch_dtype": dtype}),
        "tokenizer": (CLIPTokenizer, {}),
        "text_encoder_2": (CLIPTextModelWithProjection, {"torch_dtype": dtype}),
        "tokenizer_2": (CLIPTokenizer, {}),
        "scheduler": (DDIMScheduler, {})})
    index = config_json(source, "model_index.json") or {}
    return SDXLDenoiser(c["unet"].to(device),
                        [c["text_encoder"].to(device), c["text_encoder_2"].to(device)],
                        [c["tokenizer"], c["tokenizer_2"]], c["scheduler"],
                        c["vae"].to(device), name=name, image_size=image_size,
                        zero_uncond=bool(index.get("force_zeros_for_empty_prompt", True)))


def build_random_sdxl(preset: Preset, *, device: torch.device, dtype: torch.dtype,
                      image_size: int | None = None, seed: int = 0) -> SDXLDenoiser:
    """The preset's exact architecture with random weights, allocated once on the device."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = preset.configs
    tokenizer, _ = random_tokenizers(cfg)
    tokenizer_2 = copy.deepcopy(tokenizer)
    tokenizer_2.pad_token = "!"  # as the hub's tokenizer_2
    nets = build_random({
        "unet": lambda: UNet2DConditionModel(**cfg["unet"]),
        "vae": lambda: AutoencoderKL(**cfg["vae"]),
        "text_encoder": lambda: CLIPTextModel(clip_text_config(cfg["text_encoder"], tokenizer)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(
            clip_text_config(cfg["text_encoder_2"], tokenizer_2))}, device, dtype, seed=seed)
    return SDXLDenoiser(nets["unet"], [nets["text_encoder"], nets["text_encoder_2"]],
                        [tokenizer, tokenizer_2], DDIMScheduler(**cfg["scheduler"]),
                        nets["vae"], name=f"{preset.name} (random weights)",
                        image_size=image_size or preset.image_size,
                        fingerprint=f"{preset.name}-random-{seed}")


def load(req: LoadRequest) -> SDXLDenoiser:
    """The family's loader: the preset (or its random-weights architecture), hub id, folder."""
    if req.random_weights:
        return build_random_sdxl(random_weights_preset(req.preset, PRESETS), device=req.device,
                                 dtype=req.dtype, image_size=req.image_size)
    return load_sdxl(req.source, name=req.model, device=req.device, dtype=req.dtype,
                     image_size=req.image_size)


def from_pipeline(pipe, name: str, image_size: int | None = None,
                  text_len: int | None = None) -> SDXLDenoiser:
    """A StableDiffusionXLPipeline's components behind ``Denoiser`` (CLIP fixes the length)."""
    if pipe.text_encoder is None or pipe.text_encoder_2 is None:
        raise BackboneError("l2s steers SDXL pipelines with both text encoders; this one has "
                            "only one")
    return SDXLDenoiser(pipe.unet, [pipe.text_encoder, pipe.text_encoder_2],
                        [pipe.tokenizer, pipe.tokenizer_2], pipe.scheduler, pipe.vae,
                        name=name, image_size=image_size,
                        zero_uncond=pipe.config.force_zeros_for_empty_prompt)


# A folder or hub id of this family no preset names (an SDXL fine-tune) gets sdxl's defaults.
register_family(Family("sdxl", load, pipelines=("StableDiffusionXLPipeline",),
                       like_preset=lambda source: "sdxl", from_pipeline=from_pipeline),
                PRESETS)
