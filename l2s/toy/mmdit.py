"""The toy-mmdit model: a tiny Flux-architecture transformer on 32x32 pixel scenes.

A diffusers ``FluxTransformer2DModel`` (double- and single-stream blocks, 3-axis RoPE, no
guidance embedding, as FLUX.1 schnell) conditioned on the toy CLIP text encoder: its token
states feed the joint attention (``encoder_hidden_states``), its pooled EOS state the
modulation (``pooled_projections``). It works in pixel space: the RGB image in [-1, 1] is packed
2x2 exactly as Flux packs its VAE latents (``pack``: (B, 3, 32, 32) -> (B, 256, 12)), so the
"latent" is the image itself and there is no VAE. Image token ids are (0, row, col), text ids
zero, as in Flux.

Rectified flow (``flow_loss``): x_s = (1 - s) x0 + s eps, the transformer predicts the velocity
eps - x0 at timestep s in [0, 1] (Flux's convention: the pipeline passes sigma), s drawn
logit-normal (SD3). Sampling (``generate``) integrates with diffusers'
``FlowMatchEulerDiscreteScheduler`` (shift 1, as schnell), optionally with classifier-free
guidance (the training drops 10% of captions, so it is available; schnell samples without).

``JointAttentionMaps`` is a minimal processor that records, in every block, the softmax of image
queries over text keys only, for the token groups given: the attention supervision target
(``l2s.toy.supervision``). It will give way to the Flux family's capture once that lands.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
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


# --- packing and conditioning ----------------------------------------------------------------


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): Flux's 2x2 latent packing, row-major tokens."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(x: torch.Tensor, size: int) -> torch.Tensor:
    """Inverse of ``pack`` for square images of side ``size``: (B, N, 4C) -> (B, C, H, W)."""
    b, _, d = x.shape
    g, c = size // PATCH, d // (PATCH * PATCH)
    x = x.view(b, g, g, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, size, size)


def image_ids(size: int, device=None) -> torch.Tensor:
    """(N, 3) position ids (0, row, col) of the packed image tokens, as Flux's pipeline."""
    g = size // PATCH
    rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(device)


def encode_text(text_encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states (B, T, D) for the joint attention and the pooled EOS state (B, D)."""
    out = text_encoder(ids)
    return out.last_hidden_state, out.pooler_output


def velocity(transformer, x: torch.Tensor, s: torch.Tensor, tokens: torch.Tensor,
             pooled: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity for images x (B, 3, H, W) at timesteps s (B,) in [0, 1]."""
    size = x.shape[-1]
    out = transformer(hidden_states=pack(x), encoder_hidden_states=tokens,
                      pooled_projections=pooled, timestep=s.to(x.dtype),
                      img_ids=image_ids(size, x.device),
                      txt_ids=torch.zeros(tokens.shape[1], 3, device=x.device),
                      return_dict=False)[0]
    return unpack(out, size)


def sample_timesteps(cfg: ToyMMDiTConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """Logit-normal timesteps s in (0, 1), (n,), as SD3 / Flux training."""
    return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))


def flow_loss(transformer, tokens, pooled, images, s, noise) -> torch.Tensor:
    """Rectified-flow loss: MSE between predicted and true velocity eps - x0 at x_s."""
    sv = s.view(-1, 1, 1, 1).to(images.dtype)
    x_s = (1 - sv) * images + sv * noise
    pred = velocity(transformer, x_s, s, tokens, pooled)
    return F.mse_loss(pred.float(), (noise - images).float())


@torch.no_grad()
def generate(transformer, text_encoder, tokenizer, scheduler, prompts: list[str], *,
             steps: int = 20, guidance: float = 1.0, generator: torch.Generator | None = None,
             size: int = 32) -> torch.Tensor:
    """Euler flow-matching sampling: images (B, H, W, 3) in [0, 1] on the CPU.

    The noise is drawn on the CPU from ``generator`` (same images on every device);
    ``guidance`` > 1 adds classifier-free guidance against the empty caption.
    """
    device = next(transformer.parameters()).device
    dtype = next(transformer.parameters()).dtype
    captions = list(prompts) + ([""] * len(prompts) if guidance > 1 else [])
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids.to(device)
    tokens, pooled = encode_text(text_encoder, ids)
    x = torch.randn(len(prompts), 3, size, size, generator=generator).to(device, dtype)
    scheduler.set_timesteps(steps, device=device)
    for t in scheduler.timesteps:
        xin = torch.cat([x, x]) if guidance > 1 else x
        s = (t / scheduler.config.num_train_timesteps).expand(len(xin))
        v = velocity(transformer, xin, s, tokens.to(dtype), pooled.to(dtype))
        if guidance > 1:
            cond, uncond = v.chunk(2)
            v = uncond + guidance * (cond - uncond)
        x = scheduler.step(v, t, x).prev_sample
    return ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu()


# --- attention capture for supervision -------------------------------------------------------


def _rope(x: torch.Tensor, freqs) -> torch.Tensor:
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, freqs, sequence_dim=1)


class _JointMapProcessor:
    """Flux attention (as diffusers' FluxAttnProcessor, unfused projections, SDPA) that also
    hands the image-query x text-key softmax (over text keys only) to a recorder."""

    def __init__(self, recorder: JointAttentionMaps) -> None:
        self.recorder = recorder

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        def heads(t):
            return t.unflatten(-1, (-1, attn.head_dim))

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(
            attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:  # double-stream block: text tokens come first
            eq = attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states)))
            ev = heads(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([eq, q], 1), torch.cat([ek, k], 1), torch.cat([ev, v], 1)
        if image_rotary_emb is not None:
            q, k = _rope(q, image_rotary_emb), _rope(k, image_rotary_emb)
        self.recorder._record(q, k)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        t = encoder_hidden_states.shape[1]
        txt, img = out[:, :t], out[:, t:]
        return attn.to_out[1](attn.to_out[0](img.contiguous())), attn.to_add_out(txt.contiguous())


class JointAttentionMaps:
    """Context manager: while active, every block of ``transformer`` records, per token group,
    the map over image tokens of the image-query x text-key softmax (softmax over the text keys
    only), averaged over the group's tokens and normalised to sum 1 over the image.

    ``weights`` (B or 1, T, G) averages token columns into groups (``l2s.engine.hooks.
    token_weights``). ``stacked()`` -> (B, G, blocks * heads, S, S), with gradients.
    """

    def __init__(self, transformer, weights: torch.Tensor, text_len: int, size: int) -> None:
        self.transformer, self.weights = transformer, weights
        self.text_len, self.grid = text_len, size // PATCH
        self.maps: list[torch.Tensor] = []

    def __enter__(self) -> JointAttentionMaps:
        self._saved = self.transformer.attn_processors
        proc = _JointMapProcessor(self)
        self.transformer.set_attn_processor({name: proc for name in self._saved})
        return self

    def __exit__(self, *exc) -> None:
        self.transformer.set_attn_processor(self._saved)

    def _record(self, q: torch.Tensor, k: torch.Tensor) -> None:
        t = self.text_len
        scores = torch.einsum("bihd,bthd->bhit", q[:, t:].float(), k[:, :t].float())
        probs = (scores * q.shape[-1] ** -0.5).softmax(-1)  # (B, H, I, T)
        maps = torch.einsum("bhit,btg->bghi", probs, self.weights.to(probs.device))
        maps = maps / maps.sum(-1, keepdim=True).clamp_min(1e-12)
        self.maps.append(maps.unflatten(-1, (self.grid, self.grid)))

    def stacked(self) -> torch.Tensor:
        return torch.cat(self.maps, dim=2)
