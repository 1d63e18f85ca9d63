"""The FLUX.2 family ([klein] and [dev]): presets, loader, random weights, and its Denoiser.

Flux2KleinPipeline / Flux2Pipeline's conventions (diffusers 0.42), kept so a seed gives
diffusers' image:

* Text: one LLM (klein: Qwen3, dev: Mistral Small 3.1) reads the prompt inside its chat
  template (klein: the user turn and the generation prompt with thinking off; dev: the
  pipeline's system message, then the user turn), padded to ``max_sequence_length`` (512)
  tokens (Qwen3 on the right, Mistral on the left); the states are three hidden layers
  stacked on the feature axis (klein 9/18/27 of 36, dev 10/20/30 of 40: the quarter points
  of the encoder's depth). Text position ids are (0, 0, 0, l).
* Latents: the VAE's 32-channel latents patchified 2x2 to 128 channels, batch-normalised
  with the VAE's running statistics, one token per patch: our latents are (B, h/2 * w/2,
  128), drawn as the pipelines draw them, (B, 128, h/2, w/2) then flattened.
* Schedule: rectified flow, sigmas linspace(1, 1/n, n) shifted by diffusers' scheduler with
  mu = ``compute_empirical_mu(image tokens, steps)`` (FLUX.2's own, step-count dependent).
* Guidance: dev embeds the scale (``guidance_mode="embedded"``); klein's distilled models
  (``is_distilled`` in model_index.json) take none; klein base runs classifier-free guidance.

Maps: joint attention as Flux.1 (text first; 5 + 20 double/single-stream blocks for klein
4B, 8 + 48 for dev), image queries x text keys softmaxed over all text keys. The prompt's
words are found inside the template (``ChatTokenizer``); system, template and padding tokens
map to no word. The capture's softmax (``TextKeySoftmax``) keeps no (image x text) tensor
for the backward, so a recorded layer holds only the recorded tokens' maps, not one column
per text token.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux2 import (
    Flux2AttnProcessor,
    Flux2ParallelSelfAttnProcessor,
    _get_qkv_projections,
)

from l2s.engine.backbone import BackboneError, Conditioning, CrossAttnLayer
from l2s.engine.hub import config_json
from l2s.engine.loading import (
    build_random,
    load_components,
    quiet_transformers,
    random_weights_preset,
)
from l2s.engine.registry import Family, LoadRequest, Preset, SteerDefaults, register_family
from l2s.engine.schedules import FlowMatchSchedule
from l2s.engine.tokens import TokenAlignmentError
from l2s.families.joint_attention import (
    Sink,
    _explicit_attention,
    flux_attention_layers,
    setup_capture,
    text_key_probs,
)
from l2s.families.mmdit import MMDiTDenoiser, mmdit_dtype

CHATS = ("qwen3", "mistral")  # klein's and dev's text encoders and chat templates

# Exact architectures (for --random-weights), as published: FLUX.2 [dev] is diffusers'
# Flux2Transformer2DModel default (8 + 48 blocks, 48 heads x 128, context 3 x 5120);
# [klein] 4B has hidden 3072 = 24 heads x 128, 5 double + 20 single blocks, context
# 3 x 2560 (Qwen3-4B), no guidance embedding (cross-checked against independent FLUX.2
# ports; the hub files themselves could not be read offline). The VAE is
# AutoencoderKLFlux2's defaults, which diffusers gives as FLUX.2's.
_FLUX2_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 32, "layers_per_block": 2,
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "norm_num_groups": 32,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 1024, "mid_block_add_attention": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "batch_norm_eps": 1e-4, "patch_size": [2, 2],
}
_FLUX2_SCHEDULER = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
    "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
    "max_image_seq_len": 4096, "time_shift_type": "exponential",
}
KLEIN_4B = {
    "chat": "qwen3", "is_distilled": True, "max_sequence_length": 512,
    "transformer": {
        "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20,
        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 7680,
        "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32],
        "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": False},
    # Qwen/Qwen3-4B
    "text_encoder": {
        "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000, "tie_word_embeddings": True, "hidden_act": "silu"},
    "vae": _FLUX2_VAE, "scheduler": _FLUX2_SCHEDULER,
}
DEV = {
    "chat": "mistral", "is_distilled": False, "max_sequence_length": 512,
    "transformer": {
        "patch_size": 1, "in_channels": 128, "num_layers": 8, "num_single_layers": 48,
        "attention_head_dim": 128, "num_attention_heads": 48, "joint_attention_dim": 15360,
        "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "axes_dims_rope": [32, 32, 32, 32],
        "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": True},
    # mistralai/Mistral-Small-3.1-24B-Instruct-2503's language model (the Pixtral vision
    # tower of Mistral3ForConditionalGeneration reads no text and is not built)
    "text_encoder": {
        "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 32768,
        "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 1000000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "hidden_act": "silu"},
    "vae": _FLUX2_VAE, "scheduler": _FLUX2_SCHEDULER,
}

# Steering defaults: not yet tuned on real FLUX.2 weights. Reasoned from Flux.1: klein 4B is
# step-distilled to 4 steps as flux-schnell is, so it is steered as schnell is (step 0
# only, 16 iterations, step size 5); dev is guidance-distilled as flux-dev is, so it keeps
# flux-dev's steering (the first half of its steps) with FLUX.2-dev's 50 steps and scale 4.
PRESETS = (
    Preset("flux2-klein", "flux2", "black-forest-labs/FLUX.2-klein-4B",
           "FLUX.2 [klein] 4B, the smallest released klein (4B MMDiT, Qwen3-4B; step-distilled:"
           " 4 steps, no guidance; 1024 px; steering defaults not yet tuned on real weights)",
           1024, SteerDefaults(steps=4, guidance=1.0, steer_until=1), configs=KLEIN_4B),
    Preset("flux2-dev", "flux2", "black-forest-labs/FLUX.2-dev",
           "FLUX.2 [dev] (32B MMDiT, Mistral Small 3.1 24B; guidance-distilled: embedded "
           "scale 4, 50 steps; 1024 px; steering defaults not yet tuned on real weights)",
           1024, SteerDefaults(steps=50, guidance=4.0), configs=DEV),
)


class TextKeySoftmax(torch.autograd.Function):
    """``text_key_probs`` (B, H, S, T) whose backward keeps no (S x T) tensor: it saves the
    image queries and text keys (which the attention's own backward holds anyway) and
    recomputes the probabilities when the gradient comes. A recorded layer then holds only
    what the recorder keeps of its maps (the recorded tokens' groups), not one (S x T) block
    per layer, as the softmax's saved output would be."""

    @staticmethod
    def forward(ctx, q_img: torch.Tensor, k_txt: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q_img, k_txt)
        return text_key_probs(q_img, k_txt)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k = ctx.saved_tensors  # (B, S, H, D), (B, T, H, D)
        p = text_key_probs(q, k)
        # softmax backward: dL/dlogit = p * (g - sum_t g p), then the logits' scaled QK^T
        dlogits = p * (grad - (grad * p).sum(-1, keepdim=True)) * q.shape[-1] ** -0.5
        return (torch.einsum("bhst,bthd->bshd", dlogits, k),
                torch.einsum("bhst,bshd->bthd", dlogits, q))


def text_key_probs_light(q_img: torch.Tensor, k_txt: torch.Tensor) -> torch.Tensor:
    """Softmax over text keys of image-query x text-key logits (``text_key_probs``), through
    ``TextKeySoftmax`` when a gradient is wanted."""
    if torch.is_grad_enabled() and (q_img.requires_grad or k_txt.requires_grad):
        return TextKeySoftmax.apply(q_img, k_txt)
    return text_key_probs(q_img, k_txt)


class _Capture:
    """What both FLUX.2 capture processors share: handing the sink its maps, then attending
    (their settings: ``setup_capture``)."""

    def _attend(self, query, key, value, attention_mask):
        """Hands the sink the maps ([text; image]: image queries x text keys), then attends."""
        t = self.text_len
        if self.sink is not None:
            self.sink(self.layer, text_key_probs_light(query[:, t:], key[:, :t]))
        if self.mode == "explicit":
            out = _explicit_attention(query, key, value)
        else:
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                        backend=self._attention_backend,
                                        parallel_config=self._parallel_config)
        return out.flatten(2, 3).to(query.dtype)


class Flux2CaptureProcessor(_Capture, Flux2AttnProcessor):
    """Flux2AttnProcessor (double-stream blocks) that also hands a sink its image x text maps."""

    def __init__(self, layer: CrossAttnLayer, sink: Sink | None, text_len: int, *,
                 mode: str = "capture", original: Flux2AttnProcessor | None = None) -> None:
        super().__init__()
        setup_capture(self, layer, sink, text_len, mode, original)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        query, key, value, e_query, e_key, e_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)  # (B, S, H, D)
        text_len = encoder_hidden_states.shape[1]
        if text_len != self.text_len:
            raise ValueError(f"{self.layer.name}: text has {text_len} tokens, the processor "
                             f"was told {self.text_len}")
        e_query, e_key, e_value = (x.unflatten(-1, (-1, attn.head_dim))
                                   for x in (e_query, e_key, e_value))
        e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
        query, key, value = (torch.cat(pair, dim=1) for pair in
                             ((e_query, query), (e_key, key), (e_value, value)))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self._attend(query, key, value, attention_mask)
        e_out, out = out.split_with_sizes([text_len, out.shape[1] - text_len], dim=1)
        return attn.to_out[1](attn.to_out[0](out)), attn.to_add_out(e_out)


class Flux2SingleCaptureProcessor(_Capture, Flux2ParallelSelfAttnProcessor):
    """Flux2ParallelSelfAttnProcessor (single-stream blocks: [text; image] in one sequence,
    QKV fused with the MLP input) that also hands a sink its image x text maps."""

    def __init__(self, layer: CrossAttnLayer, sink: Sink | None, text_len: int, *,
                 mode: str = "capture",
                 original: Flux2ParallelSelfAttnProcessor | None = None) -> None:
        super().__init__()
        setup_capture(self, layer, sink, text_len, mode, original)

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv],
                               dim=-1)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self._attend(query, key, value, attention_mask)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's shift mu (diffusers' ``compute_empirical_mu``, imported quietly)."""
    with quiet_transformers():
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
    return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)


def flux2_sigmas(scheduler_config: dict, num_steps: int, image_seq_len: int) -> list[float]:
    """The n sampling sigmas (noisiest first) both FLUX.2 pipelines use: linspace(1, 1/n, n)
    (or the scheduler's own with ``use_flow_sigmas``) shifted by diffusers' scheduler with
    mu = ``empirical_mu(image tokens, n)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
    mu = empirical_mu(image_seq_len, num_steps)
    if sched.config.get("use_flow_sigmas"):
        sched.set_timesteps(num_steps, mu=mu)
    else:
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    return [float(s) for s in sched.sigmas[:-1]]


def text_layers(text_encoder, joint_attention_dim: int) -> tuple[int, ...]:
    """The hidden layers whose states are stacked: as many as the transformer's context
    width holds (3 for both releases), at the fractions i / (n + 1) of the encoder's depth;
    this is (9, 18, 27) of Qwen3-4B's 36 and (10, 20, 30) of Mistral Small's 40, the
    pipelines' defaults, and (1,) of a 2-layer test encoder."""
    cfg = text_encoder.config
    cfg = getattr(cfg, "text_config", None) or cfg
    n, rest = divmod(joint_attention_dim, cfg.hidden_size)
    if rest or n < 1:
        raise BackboneError(f"the transformer reads {joint_attention_dim} text features, not a "
                            f"multiple of the text encoder's {cfg.hidden_size}: this text "
                            "encoder does not belong to this transformer")
    depth = cfg.num_hidden_layers
    return tuple(depth * (i + 1) // (n + 1) for i in range(n))


class ChatTokenizer:
    """An LLM tokenizer as token alignment needs it: a prompt's tokens at their positions in
    the text sequence the transformer sees (inside the chat template, padded as the pipeline
    pads), with character offsets into the prompt itself; system, template and padding tokens
    get (0, 0), so no word maps to them.

    ``chat`` "qwen3" renders Flux2KleinPipeline's conversation (one user turn, generation
    prompt, thinking off) and tokenises it with the tokenizer's special tokens; "mistral"
    renders Flux2Pipeline's (its system message, then the user turn) and tokenises without
    (its template writes BOS itself), as ``apply_chat_template`` does.
    """

    def __init__(self, tokenizer, chat: str, max_length: int = 512) -> None:
        if chat not in CHATS:
            raise ValueError(f"unknown chat template {chat!r}: use {', '.join(CHATS)}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise BackboneError(f"the {type(tokenizer).__name__} has no chat template, which "
                                "FLUX.2 encodes prompts with: load the pipeline's own tokenizer")
        self.tokenizer, self.chat = tokenizer, chat
        self.model_max_length = max_length  # the text length (set_text_len changes it)
        self.add_special_tokens = chat == "qwen3"

    def render(self, prompt: str) -> str:
        """The text the pipeline tokenises for ``prompt``."""
        if self.chat == "qwen3":
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False,
                add_generation_prompt=True, enable_thinking=False)
        with quiet_transformers():
            from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE, format_input
        return self.tokenizer.apply_chat_template(
            format_input([prompt], SYSTEM_MESSAGE)[0], tokenize=False,
            add_generation_prompt=False)

    def _encode(self, texts: list[str], **kwargs):
        return self.tokenizer(texts, padding="max_length", truncation=True,
                              max_length=self.model_max_length,
                              add_special_tokens=self.add_special_tokens, **kwargs)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), each (B, text length): what the text encoder reads."""
        enc = self._encode([self.render(p) for p in prompts], return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def __call__(self, prompt: str, return_offsets_mapping: bool = False,
                 add_special_tokens: bool = True, **_) -> dict:
        """The padded sequence's ids and, per token, its characters of ``prompt`` ((0, 0) for
        tokens outside it); refuses a prompt whose template overflows the text length."""
        text = self.render(prompt)
        start = text.rfind(prompt)
        if start < 0:
            raise TokenAlignmentError(f"the chat template does not contain the prompt {prompt!r}"
                                      " verbatim, so its words cannot be located")
        whole = self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"]
        if len(whole) > self.model_max_length:
            raise TokenAlignmentError(
                f"the prompt takes {len(whole)} tokens inside the chat template but the text "
                f"encoder reads at most {self.model_max_length}: shorten the prompt")
        enc = self._encode([text], return_offsets_mapping=True)
        end = start + len(prompt)
        offsets = [(max(a, start) - start, min(b, end) - start) if a < end and b > start
                   else (0, 0) for a, b in enc["offset_mapping"][0]]
        return {"input_ids": enc["input_ids"][0], "offset_mapping": offsets}

    def convert_ids_to_tokens(self, ids):
        return self.tokenizer.convert_ids_to_tokens(ids)


class Flux2Denoiser(MMDiTDenoiser):
    """Flux2Transformer2DModel + one LLM text encoder + AutoencoderKLFlux2, flow matching.

    ``chat``: "qwen3" (klein) or "mistral" (dev); ``distilled``: a klein model distilled to
    take no guidance (else klein runs CFG; dev always embeds its scale); ``layers``: "all"
    (double-stream, then single-stream blocks) or "double".
    """

    reference_layout = None  # no published L2S classifiers for FLUX.2
    max_text_len = 512  # both pipelines' max_sequence_length
    # As Flux.1 (the same attention shapes): no cuDNN attention, whose backward died in Flux
    # steering on torch 2.11 + CUDA 13 (docs/design.md); not yet run on FLUX.2 itself.
    sdpa_backends = ("flash", "mem_efficient", "math")

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler_config: dict, *,
                 chat: str, name: str, image_size=None, max_sequence_length: int = 512,
                 distilled: bool = False, layers: str = "all", guidance: float = 4.0,
                 fingerprint: str | None = None) -> None:
        if not isinstance(tokenizer, ChatTokenizer):
            tokenizer = ChatTokenizer(tokenizer, chat, max_sequence_length)
        super().__init__(transformer, vae, [text_encoder], tokenizer, scheduler_config,
                         name=name, image_size=image_size, patch=2,
                         # the VAE's sample size: 1024, the pipelines' default (128 x 8)
                         default_size=vae.config.sample_size, fingerprint=fingerprint)
        self.text_encoder = text_encoder
        self.text_layers = text_layers(text_encoder, transformer.config.joint_attention_dim)
        seq = self.grid[0] * self.grid[1]
        self.schedule = FlowMatchSchedule(
            sigmas=lambda n: flux2_sigmas(self.scheduler_config, n, seq))
        if transformer.config.guidance_embeds:
            self.guidance_mode = "embedded"
        else:
            self.guidance_mode = "none" if distilled else "cfg"
        self.default_guidance = guidance
        self.latent_shape = (seq, transformer.config.in_channels)
        self.layers = layers
        flux_attention_layers(transformer, self.grid, layers)  # validates the layer set
        ids = torch.cartesian_prod(torch.arange(1), torch.arange(self.grid[0]),
                                   torch.arange(self.grid[1]), torch.arange(1))
        self._img_ids = ids.to(self.device)  # (N, 4): (0, row, col, 0), row-major

    def cross_attention_layers(self):
        return flux_attention_layers(self.transformer, self.grid, self.layers)

    def _make_capture(self, layer, original, sink, explicit: bool = False):
        if isinstance(original, Flux2CaptureProcessor | Flux2SingleCaptureProcessor):
            mode = original.mode
        elif type(original) in (Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor):
            mode = "explicit" if explicit else "capture"
        else:
            return None
        make = (Flux2SingleCaptureProcessor if layer.name.startswith("single_")
                else Flux2CaptureProcessor)
        return make(layer, sink, self.text_len, mode=mode, original=original)

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        ids, mask = self._tokenizer.encode(list(prompts))
        enc = self.text_encoder
        with torch.no_grad():
            out = enc(input_ids=ids.to(enc.device), attention_mask=mask.to(enc.device),
                      output_hidden_states=True, use_cache=False)
            h = torch.stack([out.hidden_states[k] for k in self.text_layers], dim=1)
        b, n, length, d = h.shape  # (B, layers, T, D) -> (B, T, layers x D), layer-major
        states = h.permute(0, 2, 1, 3).reshape(b, length, n * d)
        text_ids = torch.cartesian_prod(*(torch.arange(1),) * 3, torch.arange(length))
        return Conditioning({"states": states.to(self.device, self.dtype)},
                            {"text_ids": text_ids.to(self.device)})

    def model_output(self, latents, t, cond, guidance):
        b = latents.shape[0]
        g = self._embedded_guidance(b, guidance)
        timestep = self._timesteps(t, b, latents.dtype) / 1000
        return self.transformer(
            hidden_states=latents, timestep=timestep, guidance=g,
            encoder_hidden_states=cond["states"], txt_ids=cond["text_ids"],
            img_ids=self._img_ids, return_dict=False)[0]

    def prepare_latents(self, batch: int, generator: torch.Generator | None) -> torch.Tensor:
        # The pipelines draw (B, 128, h/2, w/2) and flatten it: same draw, same image.
        z = torch.randn((batch, self.latent_shape[1], *self.grid), generator=generator,
                        dtype=torch.float32)
        return z.flatten(2).transpose(1, 2).to(self.device)

    def _normalisation(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's batch-norm mean and std of patchified latents, (1, 4C, 1, 1)."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        var = bn.running_var.view(1, -1, 1, 1).to(like.device, like.dtype)
        return mean, torch.sqrt(var + self.vae.config.batch_norm_eps)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, _, c = latents.shape
        z = latents.float().transpose(1, 2).reshape(b, c, *self.grid)  # (B, 4C, h/2, w/2)
        mean, std = self._normalisation(z)
        z = z * std + mean
        # unpatchify: channel (c, i, j) of cell (y, x) -> pixel (2y + i, 2x + j) of channel c
        z = z.reshape(b, c // 4, 2, 2, *self.grid).permute(0, 1, 4, 2, 5, 3)
        z = z.reshape(b, c // 4, 2 * self.grid[0], 2 * self.grid[1])
        with torch.no_grad():
            x = self.vae.decode(z.to(self.vae.device, self.vae.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() * 2 - 1
        with torch.no_grad():
            z = self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist.mode()
        b, c, h, w = z.shape  # patchify 2x2, as the pipelines' _patchify_latents
        z = z.float().view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        z = z.reshape(b, c * 4, h // 2, w // 2)
        mean, std = self._normalisation(z)
        z = (z - mean) / std
        return z.flatten(2).transpose(1, 2).to(self.device)


def _chat_of(text_encoder) -> str:
    return "mistral" if "mistral" in type(text_encoder).__name__.lower() else "qwen3"


def load_flux2(source: str, *, name: str, device: torch.device, dtype: torch.dtype,
               preset: Preset | None = None, image_size: int | None = None) -> Flux2Denoiser:
    """A FLUX.2 folder or hub repo in diffusers layout: Flux2KleinPipeline (Qwen3) or
    Flux2Pipeline (Mistral3), told apart by model_index.json."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2Transformer2DModel,
    )
    from transformers import AutoTokenizer

    index = config_json(source, "model_index.json") or {}
    klein = index.get("_class_name", "Flux2KleinPipeline") == "Flux2KleinPipeline"
    if klein:
        from transformers import Qwen3ForCausalLM as Encoder
    else:
        from transformers import Mistral3ForConditionalGeneration as Encoder
    dtype = mmdit_dtype(dtype)
    c = load_components(source, "FLUX.2", {
        "transformer": (Flux2Transformer2DModel, {"torch_dtype": dtype}),
        "vae": (AutoencoderKLFlux2, {"torch_dtype": torch.float32}),
        "text_encoder": (Encoder, {"torch_dtype": dtype}),
        "tokenizer": (AutoTokenizer, {}),
        "scheduler": (FlowMatchEulerDiscreteScheduler, {})})
    return Flux2Denoiser(
        c["transformer"].to(device), c["vae"].to(device), c["text_encoder"].to(device),
        c["tokenizer"], dict(c["scheduler"].config), chat="qwen3" if klein else "mistral",
        name=name, image_size=image_size or (preset.image_size if preset else None),
        distilled=bool(index.get("is_distilled", False)),
        guidance=preset.defaults.guidance if preset else 4.0)


def build_random_flux2(preset: Preset, *, device: torch.device, dtype: torch.dtype,
                       image_size: int | None = None, seed: int = 0) -> Flux2Denoiser:
    """A preset's exact architecture with random weights, each tensor allocated once on the
    device (``l2s.engine.materialise``); the tokenizer is a byte-level BPE of a few words
    with the preset's chat template (random weights read nothing)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel

    cfg, dtype = preset.configs, mmdit_dtype(dtype)
    tokenizer = random_chat_tokenizer(cfg["chat"], cfg["text_encoder"]["vocab_size"])
    if cfg["chat"] == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        def encoder():
            return Qwen3ForCausalLM(Qwen3Config(**cfg["text_encoder"]))
    else:
        from transformers import MistralConfig, MistralForCausalLM

        def encoder():  # the language model of Mistral3ForConditionalGeneration
            return MistralForCausalLM(MistralConfig(**cfg["text_encoder"]))
    nets = build_random({
        "transformer": lambda: Flux2Transformer2DModel(**cfg["transformer"]),
        "text_encoder": encoder,
        "vae": lambda: AutoencoderKLFlux2(**cfg["vae"])}, device, dtype, seed=seed)
    return Flux2Denoiser(nets["transformer"], nets["vae"], nets["text_encoder"], tokenizer,
                         cfg["scheduler"], chat=cfg["chat"],
                         name=f"{preset.name} (random weights)",
                         image_size=image_size or preset.image_size,
                         max_sequence_length=cfg["max_sequence_length"],
                         distilled=cfg["is_distilled"], guidance=preset.defaults.guidance,
                         fingerprint=f"{preset.name}-random-{seed}")


# Chat templates of the two text encoders, as far as FLUX.2 uses them: Qwen3's (a user
# turn, the generation prompt, an empty think block when thinking is off) and Mistral
# Small 3.1's (BOS, the system prompt, the user turn), for content given as a string or as
# a list of text parts.
_CONTENT = ("{%- if m.content is string %}{{- m.content }}{%- else %}{%- for c in m.content %}"
            "{{- c.text }}{%- endfor %}{%- endif %}")
QWEN3_TEMPLATE = (
    "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}" + _CONTENT
    + "{{- '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and not "
    "enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
MISTRAL_TEMPLATE = (
    "{{- bos_token }}{%- for m in messages %}{%- if m.role == 'system' %}"
    "{{- '[SYSTEM_PROMPT]' }}" + _CONTENT + "{{- '[/SYSTEM_PROMPT]' }}"
    "{%- elif m.role == 'user' %}{{- '[INST]' }}" + _CONTENT + "{{- '[/INST]' }}"
    "{%- else %}" + _CONTENT + "{{- eos_token }}{%- endif %}{%- endfor %}")
_SPECIALS = {"qwen3": ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
             "mistral": ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]",
                         "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")}


def random_chat_tokenizer(chat: str, vocab_size: int | None = None, words=()):
    """A byte-level BPE tokenizer built in memory (no download) that spells ``words`` (and
    the system message's) as single tokens, with the text encoder's special tokens, padding
    side and chat template: Qwen2Tokenizer for "qwen3", a left-padding fast tokenizer for
    "mistral". Any text tokenises (bytes are the fallback)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    from l2s.engine.loading import RANDOM_WEIGHTS_WORDS

    with quiet_transformers():
        from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE
    specials = _SPECIALS[chat]
    corpus = [*RANDOM_WEIGHTS_WORDS, *words, *SYSTEM_MESSAGE.split()]
    corpus = [f"{w} {w}" for w in corpus]  # each word alone and after a space
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=100_000, min_frequency=1, special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if chat == "qwen3":
        import json

        model = json.loads(bpe.to_str())["model"]
        tok = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])
        tok.add_special_tokens({"additional_special_tokens": list(specials[1:])})
        tok.padding_side = "right"
    else:
        from tokenizers import decoders

        bpe.decoder = decoders.ByteLevel()
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                      eos_token="</s>", pad_token="<pad>",
                                      additional_special_tokens=list(specials[4:]),
                                      padding_side="left")
    tok.chat_template = QWEN3_TEMPLATE if chat == "qwen3" else MISTRAL_TEMPLATE
    tok.model_max_length = 512
    if vocab_size is not None and len(tok) > vocab_size:
        raise ValueError(f"{len(tok)} tokens do not fit a vocabulary of {vocab_size}")
    return tok


def load(req: LoadRequest) -> Flux2Denoiser:
    """The family's loader: a preset (or its random-weights architecture), hub id or folder."""
    if req.random_weights:
        return build_random_flux2(random_weights_preset(req.preset, PRESETS), device=req.device,
                                  dtype=req.dtype, image_size=req.image_size)
    return load_flux2(req.source, name=req.model, device=req.device, dtype=req.dtype,
                      preset=req.preset, image_size=req.image_size)


def like_preset(source: str) -> str | None:
    """The preset whose defaults a FLUX.2 folder or hub id no preset names gets: flux2-dev for
    a Flux2Pipeline (guidance-distilled Mistral model), flux2-klein for a distilled klein;
    None (the generic defaults) for a klein base model, which runs CFG with many steps."""
    index = config_json(source, "model_index.json")
    if index is None:
        return None
    if index.get("_class_name") == "Flux2Pipeline":
        return "flux2-dev"
    return "flux2-klein" if index.get("is_distilled") else None


def from_pipeline(pipe, name: str, image_size: int | None = None,
                  text_len: int | None = None) -> Flux2Denoiser:
    """A Flux2Pipeline's or Flux2KleinPipeline's components behind ``Denoiser``;
    ``text_len``: the call's max_sequence_length (None: the pipelines' 512)."""
    return Flux2Denoiser(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                         dict(pipe.scheduler.config), chat=_chat_of(pipe.text_encoder),
                         name=name, image_size=image_size,
                         max_sequence_length=text_len or Flux2Denoiser.max_text_len,
                         distilled=bool(getattr(pipe.config, "is_distilled", False)))


register_family(Family("flux2", load, pipelines=("Flux2KleinPipeline", "Flux2Pipeline"),
                       like_preset=like_preset, from_pipeline=from_pipeline), PRESETS)
