"""Denoiser adapter for diffusers UNets (Stable Diffusion 1.x/2.x and the pixel-space toy).

Shared by the ``sd`` and ``toy`` families: a ``UNet2DConditionModel`` + CLIP text encoder + a
DDPM schedule sampled with DDIM, with an optional VAE, and the capture processor that reads
the cross-attention (``attn2``) probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn

from l2s.engine.backbone import (
    AttentionSink,
    BackboneError,
    Conditioning,
    CrossAttnLayer,
    Denoiser,
    checked_image_size,
    config_fingerprint,
    freeze,
    vae_scale,
)
from l2s.engine.hooks import HookError
from l2s.engine.schedules import DDPMSchedule


def unet_cross_attention_layers(unet: UNet2DConditionModel, latent_hw: tuple[int, int]
                                ) -> list[CrossAttnLayer]:
    """Every `attn2` layer of a UNet with heads and query resolution for this latent size.

    UNet2DConditionModel halves the resolution after every down block but the last, and
    doubles it after every up block but the last; the mid block runs at the coarsest level.
    """
    n_down = len(unet.config.down_block_types)
    n_up = len(unet.config.up_block_types)
    h, w = latent_hw
    layers = []
    for proc_name in unet.attn_processors:
        name = proc_name.removesuffix(".processor")
        if not name.endswith("attn2"):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "mid_block":
            level = n_down - 1
        elif parts[0] == "up_blocks":
            level = n_up - 1 - int(parts[1])
        else:
            raise BackboneError(f"unexpected attention layer {name!r} in this UNet "
                                f"(diffusers {diffusers.__version__})")
        f = 2**level
        # Downsampling convs use stride 2 with padding 1, so odd sizes round up.
        res = (-(-h // f), -(-w // f))
        order = ({"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[parts[0]],
                 int(parts[1]) if parts[0] != "mid_block" else 0)
        layers.append((order, CrossAttnLayer(name, unet.get_submodule(name).heads, res)))
    # attn_processors lists the mid block last; forward order is down, mid, up.
    return [la for _, la in sorted(layers, key=lambda x: x[0])]


# --- attention capture ----------------------------------------------------------------------
# Processors computing plain softmax attention: replacing one by the explicit path changes
# nothing but the kernel (and the probabilities are then computed once, not twice).
_PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


def _text_probs(attn, hidden_states, context, attention_mask, temb):
    """(probs (B*heads, HW, T), (input shape, keys' states)) of an attention layer, as
    AttnProcessor computes them (``get_attention_scores`` honours ``upcast_attention``)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape = hidden_states.shape
    if hidden_states.ndim == 4:
        b, c, h, w = shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    cross = context is not None
    context = context if cross else hidden_states
    batch, seq_len = context.shape[:2]
    attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if cross and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    key = attn.to_k(context)
    query, key = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key)
    probs = attn.get_attention_scores(query, key, attention_mask)
    return probs, (shape, context)


def _sink_4d(sink: AttentionSink, layer: CrossAttnLayer, probs: torch.Tensor, heads: int
             ) -> None:
    bh, hw, seq_len = probs.shape
    sink(layer, probs.view(bh // heads, heads, hw, seq_len))


class _ExplicitCrossAttention:
    """Explicit-softmax cross-attention (as diffusers' AttnProcessor) that also hands the
    probabilities to the sink: replaces a plain processor, one softmax serves both."""

    def __init__(self, layer: CrossAttnLayer, sink: AttentionSink) -> None:
        self.layer, self.sink = layer, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        residual = hidden_states
        probs, (shape, context) = _text_probs(attn, hidden_states, encoder_hidden_states,
                                              attention_mask, temb)
        _sink_4d(self.sink, self.layer, probs, attn.heads)
        value = attn.head_to_batch_dim(attn.to_v(context))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if len(shape) == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(*shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class _WrappedCrossAttention:
    """Any other processor (LoRA-patched projections, IP-Adapter, xformers, sliced...) runs
    unchanged; the text probabilities are computed beside it from the layer's own q/k
    projections. Costs one extra QK^T on recorded layers, and keeps the adapter working."""

    def __init__(self, inner, layer: CrossAttnLayer, sink: AttentionSink) -> None:
        self.inner, self.layer, self.sink = inner, layer, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if getattr(attn, "add_k_proj", None) is not None:
            raise HookError(f"{self.layer.name} uses {type(self.inner).__name__} with added "
                            "key/value projections, whose attention l2s cannot read: remove "
                            "that adapter from the recorded layers")
        context = encoder_hidden_states
        if isinstance(context, tuple):  # IP-Adapter: (text states, image-prompt states)
            context = context[0]
        elif context is not None and hasattr(self.inner, "num_tokens"):
            context = context[:, :context.shape[1] - self.inner.num_tokens[0]]
        if context is None:
            raise HookError(f"{self.layer.name} got no text states: it is not a "
                            "cross-attention layer")
        probs, _ = _text_probs(attn, hidden_states, context, attention_mask, temb)
        _sink_4d(self.sink, self.layer, probs, attn.heads)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                          *args, **kwargs)


def unet_capture_processor(layer: CrossAttnLayer, original, sink: AttentionSink):
    """The processor that records ``layer`` while doing what ``original`` does."""
    if type(original) in _PLAIN_PROCESSORS:
        return _ExplicitCrossAttention(layer, sink)
    return _WrappedCrossAttention(original, layer, sink)


class UNetAttention:
    """A bare UNet's attention side, all an ``AttentionRecorder`` needs (e.g. in training,
    where the UNet must not be frozen as ``UNetDenoiser`` freezes it)."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        self.attention_model = unet

    def capture_processor(self, layer: CrossAttnLayer, original, sink: AttentionSink):
        return unet_capture_processor(layer, original, sink)


def unet_layout(layers: Sequence[CrossAttnLayer]):
    """The published SD classifiers' layout over a UNet's cross-attention layers: channels
    regrouped by map resolution, coarsest first, bilinear resizing, every map renormalised."""
    from l2s.classifier.layout import MapLayout, resolution_order

    return MapLayout("unet", resolution_order(layers), "bilinear", "always")


class UNetDenoiser(Denoiser):
    """A UNet2DConditionModel + CLIP text encoder + DDIM-sampled DDPM schedule, optional VAE.

    With ``vae=None`` the UNet works in pixel space (latents are images in [-1, 1]): the toy.
    """

    reference_layout = "unet"  # published SD classifiers: channels by resolution, ascending

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder: nn.Module,
        tokenizer,
        scheduler,
        vae: AutoencoderKL | None = None,
        *,
        name: str,
        image_size: int | tuple[int, int] | None = None,
        fingerprint: str | None = None,
        world=None,
    ) -> None:
        self.unet, self.text_encoder, self._tokenizer, self.vae = unet, text_encoder, tokenizer, vae
        self.scheduler = scheduler
        self.schedule = DDPMSchedule(scheduler)
        self.prediction_type = self.schedule.prediction_type
        self.name = name
        self.world = world  # l2s.engine.registry.World of a closed-vocabulary model
        self.vae_scale = vae_scale(vae)
        image_size = checked_image_size(
            unet.config.sample_size * self.vae_scale if image_size is None else image_size,
            self.vae_scale * 2 ** (len(unet.config.down_block_types) - 1))  # one per level
        self.image_size = image_size
        self.latent_hw = (image_size[0] // self.vae_scale, image_size[1] // self.vae_scale)
        self.latent_shape = (unet.config.in_channels, *self.latent_hw)
        self.device = unet.device
        self.dtype = unet.dtype
        self.fingerprint = fingerprint or config_fingerprint(unet, text_encoder, vae)
        freeze(unet, text_encoder, vae)
        self._layers = unet_cross_attention_layers(unet, self.latent_hw)
        if not self._layers:
            raise BackboneError(f"{name!r} has no cross-attention layers, so there is nothing "
                                "to record or steer: use a text-conditioned UNet")

    # --- interface -------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def attention_model(self) -> nn.Module:
        return self.unet

    def cross_attention_layers(self) -> list[CrossAttnLayer]:
        return list(self._layers)

    def capture_processor(self, layer: CrossAttnLayer, original, sink: AttentionSink):
        return unet_capture_processor(layer, original, sink)

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        tok = self._tokenizer
        enc = tok(list(prompts), padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt")
        ids = enc.input_ids.to(self.text_encoder.device)
        with torch.no_grad():
            emb = self.text_encoder(ids)[0]
        return Conditioning({"states": emb.to(self.dtype)})

    def model_output(self, latents, t, cond, guidance):
        if not isinstance(t, torch.Tensor):
            # A Python timestep makes diffusers copy it to the device (torch.tensor), which
            # synchronises a GPU at every forward; a fill launched on the device does not.
            # The dtype is the one diffusers would give it (get_time_embed).
            from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device

            dtype = torch.float64 if isinstance(t, float) else torch.int64
            t = torch.full((), t, device=latents.device,
                           dtype=maybe_adjust_dtype_for_device(dtype, latents.device))
        return self.unet(latents, t, **self.unet_inputs(cond)).sample

    def unet_inputs(self, cond: Conditioning) -> dict:
        """The UNet's keyword inputs besides latents and time: SD's text states (SDXL adds
        its pooled vector and size ids, ``families/sdxl.py``)."""
        return {"encoder_hidden_states": cond["states"]}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents.float()
        if self.vae is not None:
            with torch.no_grad():
                x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() * 2 - 1
        if self.vae is not None:
            with torch.no_grad():
                dist = self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist
                x = dist.mean.float() * self.vae.config.scaling_factor
        return x.to(self.device)
