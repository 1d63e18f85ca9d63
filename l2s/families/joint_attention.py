"""Map capture in MMDiT joint attention (Flux.1 and SD3): processors, layer lists, layer order.

Flux and SD3 have no cross-attention: text and image tokens attend jointly. The map of a text
token is read the way the Learn-to-Steer reference reads Flux: the image-query x text-key
block of the attention logits (after QK-norm and, for Flux, RoPE), softmaxed over the text
keys only. The block's output still comes from the fused SDPA kernel, so the full
(text + image)^2 matrix is never materialised; only the (image x text) block is, and only in
recorded layers. ``mode="explicit"`` does the opposite for the reference-style speed
baseline: the full matrix, softmaxed explicitly, in every layer it is installed in.

Sequence layouts (diffusers 0.42):

* Flux double-stream blocks (``transformer_blocks.i.attn``): [text; image], text first;
  single-stream blocks (``single_transformer_blocks.j.attn``) get the concatenated
  sequence without ``encoder_hidden_states``, so the processor is told the text length.
* SD3 joint blocks (``transformer_blocks.i.attn``): [image; text], image first. The
  ``attn2`` of SD3.5's dual-attention blocks is image-only self-attention: never recorded.

Layer order, which fixes classifier channel order (channel = layer index x heads + head):
Flux: the 19 double-stream blocks, then the 38 single-stream blocks, each in block order
(57 x 24 heads = 1368 channels); SD3: the joint blocks in order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    _get_qkv_projections,
)

from l2s.engine.backbone import CrossAttnLayer

CAPTURE_MODES = ("capture", "explicit")
FLUX_LAYER_SETS = ("all", "double")  # all 57 blocks, or the 19 double-stream blocks

# Receives (layer, probs (B, heads, Q_image, T_text)), still in the autograd graph.
Sink = Callable[[CrossAttnLayer, torch.Tensor], None]


def text_key_probs(q_img: torch.Tensor, k_txt: torch.Tensor) -> torch.Tensor:
    """Softmax over text keys of image-query x text-key logits: (B, S, H, D) x (B, T, H, D)
    -> (B, H, S, T), with SDPA's default scale 1/sqrt(D)."""
    logits = torch.einsum("bshd,bthd->bhst", q_img, k_txt) * q_img.shape[-1] ** -0.5
    return logits.softmax(dim=-1)


def _explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                        ) -> torch.Tensor:
    """Attention with the full matrix materialised: (B, S, H, D) -> (B, S, H, D)."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, S, D)
    probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, S, S)
    return (probs @ v).transpose(1, 2)


def setup_capture(proc, layer: CrossAttnLayer, sink: Sink | None, text_len: int, mode: str,
                  original) -> None:
    """What every diffusers-processor capture (Flux, FLUX.2, Qwen-Image) holds: the layer,
    sink, text length and mode, and the original processor's attention backend and
    context-parallel settings (kept, so its kernel choice stays)."""
    if mode not in CAPTURE_MODES:
        raise ValueError(f"unknown capture mode {mode!r}: use {', '.join(CAPTURE_MODES)}")
    proc.layer, proc.sink, proc.text_len, proc.mode = layer, sink, text_len, mode
    if original is not None:
        proc._attention_backend = original._attention_backend
        proc._parallel_config = original._parallel_config


class FluxCaptureProcessor(FluxAttnProcessor):
    """FluxAttnProcessor that also hands a sink the image x text-key maps of its layer.

    ``text_len`` is the T5 sequence length; double-stream blocks read it from
    ``encoder_hidden_states`` and check it, single-stream blocks rely on it.
    """

    def __init__(self, layer: CrossAttnLayer, sink: Sink | None, text_len: int, *,
                 mode: str = "capture", original: FluxAttnProcessor | None = None) -> None:
        super().__init__()
        setup_capture(self, layer, sink, text_len, mode, original)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        query, key, value, e_query, e_key, e_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)  # (B, S, H, D)
        text_len = self.text_len
        if attn.added_kv_proj_dim is not None:
            text_len = encoder_hidden_states.shape[1]
            e_query, e_key, e_value = (x.unflatten(-1, (-1, attn.head_dim))
                                       for x in (e_query, e_key, e_value))
            e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
            query = torch.cat([e_query, query], dim=1)
            key = torch.cat([e_key, key], dim=1)
            value = torch.cat([e_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if text_len != self.text_len:
            raise ValueError(f"{self.layer.name}: text has {text_len} tokens, the processor "
                             f"was told {self.text_len}")
        if self.sink is not None:
            # [text; image]: image queries after the text, text keys before the image.
            self.sink(self.layer, text_key_probs(query[:, text_len:], key[:, :text_len]))
        if self.mode == "explicit":
            out = _explicit_attention(query, key, value)
        else:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                        backend=self._attention_backend,
                                        parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        e_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(e_out.contiguous())


class SD3CaptureProcessor(JointAttnProcessor2_0):
    """JointAttnProcessor2_0 (SD3) that also hands a sink the image x text-key maps."""

    def __init__(self, layer: CrossAttnLayer, sink: Sink | None, *, mode: str = "capture"
                 ) -> None:
        super().__init__()
        if mode not in CAPTURE_MODES:
            raise ValueError(f"unknown capture mode {mode!r}: use {', '.join(CAPTURE_MODES)}")
        self.layer, self.sink, self.mode = layer, sink, mode

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 *args, **kwargs):
        batch, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):  # (B, S, H*D) -> (B, S, H, D)
            return x.view(batch, -1, heads, x.shape[-1] // heads)

        query, key, value = (split(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        # diffusers applies the QK norms on (B, H, S, D); RMS / layer norm over D is the same
        # on (B, S, H, D).
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            e_query, e_key, e_value = (split(f(encoder_hidden_states)) for f in
                                       (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                e_query = attn.norm_added_q(e_query)
            if attn.norm_added_k is not None:
                e_key = attn.norm_added_k(e_key)
            if self.sink is not None:  # [image; text]: image queries x text keys
                self.sink(self.layer, text_key_probs(query, e_key))
            query = torch.cat([query, e_query], dim=1)
            key = torch.cat([key, e_key], dim=1)
            value = torch.cat([value, e_value], dim=1)
        if self.mode == "explicit":
            out = _explicit_attention(query, key, value)
        else:
            out = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (query, key, value))
                                                 ).transpose(1, 2)
        out = out.reshape(batch, -1, heads * query.shape[-1]).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        out, e_out = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            e_out = attn.to_add_out(e_out)
        return attn.to_out[1](attn.to_out[0](out)), e_out


def flux_attention_layers(transformer, grid: tuple[int, int], layers: str = "all"
                          ) -> list[CrossAttnLayer]:
    """Flux's joint-attention layers in forward order: double-stream, then single-stream.

    ``grid`` is the packed latent grid (image px / 16 per side); ``layers`` "double" keeps
    only the 19 double-stream blocks (recording, and a forward, can stop there).
    """
    if layers not in FLUX_LAYER_SETS:
        raise ValueError(f"unknown Flux layer set {layers!r}: use {', '.join(FLUX_LAYER_SETS)}")
    heads = transformer.config.num_attention_heads
    names = [f"transformer_blocks.{i}.attn" for i in range(len(transformer.transformer_blocks))]
    if layers == "all":
        names += [f"single_transformer_blocks.{j}.attn"
                  for j in range(len(transformer.single_transformer_blocks))]
    return [CrossAttnLayer(n, heads, grid) for n in names]


def sd3_attention_layers(transformer, grid: tuple[int, int]) -> list[CrossAttnLayer]:
    """SD3's joint-attention layers (``attn`` of every block) in forward order."""
    heads = transformer.config.num_attention_heads
    return [CrossAttnLayer(f"transformer_blocks.{i}.attn", heads, grid)
            for i in range(len(transformer.transformer_blocks))]
