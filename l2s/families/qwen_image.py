"""The Qwen-Image family: preset, loader, random weights, its Denoiser and map capture.

QwenImagePipeline's conventions (diffusers 0.42), kept so a seed gives diffusers' image:

* Text: each prompt is put in the pipeline's chat template (a system line asking for
  colour, shape, size, quantity and spatial relationships, then the prompt as the user
  turn, then the assistant header), encoded by Qwen2.5-VL, and the last hidden states of
  its tokens are kept after the first 34 (``TEMPLATE_DROP``, the pipeline's
  ``prompt_template_encode_start_idx``: the system part and the user header). What is left
  is the prompt's own tokens followed by the 5 template tokens that close the turn; the
  pipeline pads a batch to its longest prompt with zero states and a key mask. We pad every
  prompt to ``text_len`` (default 512, the pipeline's ``max_sequence_length``) with the same
  mask, and a forward runs only as many text tokens as the longest prompt encoded so far,
  with no mask at all when every row has the same length (one prompt: the pipeline's
  forward exactly): the padding is masked out of every attention, so outputs and maps are
  the pipeline's.
* Guidance: "true CFG" on a separate negative prompt (the model card's is " ", which l2s
  uses as the unconditional prompt), mixed linearly and then rescaled so each latent
  token's prediction keeps the norm of the conditional one. The engine mixes the CFG batch
  linearly; the rescale happens in ``step``, with the conditional norms ``predict`` kept
  from that batch.
* Latents (B, 16, 1, h, w) of a causal video VAE, normalised per channel by its
  ``latents_mean`` / ``latents_std``, packed 2x2 into (B, h/2 * w/2, 64) tokens as Flux's
  (our latents are the packed ones); model time t = 1000 sigma goes in as t / 1000; the
  sigma grid is FluxPipeline's (linspace with the resolution-dependent mu), through the
  scheduler's exponential time shift and ``shift_terminal``.
* Attention: 60 dual-stream blocks, joint attention over [text; image] with RoPE on both;
  the recorded map of a text token is the image-query x text-key block softmaxed over the
  prompt's text keys (padding masked), as for Flux (``families/joint_attention.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)

from l2s.engine.backbone import Conditioning, CrossAttnLayer
from l2s.engine.loading import (
    RANDOM_WEIGHTS_WORDS,
    build_random,
    load_components,
    random_weights_preset,
)
from l2s.engine.registry import Family, LoadRequest, Preset, SteerDefaults, register_family
from l2s.engine.tokens import TokenAlignmentError
from l2s.families.flux import FluxDenoiser
from l2s.families.joint_attention import Sink, sd3_attention_layers, setup_capture
from l2s.families.mmdit import MMDiTDenoiser, mmdit_dtype

# QwenImagePipeline.prompt_template_encode and prompt_template_encode_start_idx.
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")
TEMPLATE_DROP = 34
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# The model card's negative prompt: true CFG runs only with one, and " " is what it uses.
NEGATIVE_PROMPT = " "
MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s default: text tokens kept a prompt
TOKENIZER_MAX_LENGTH = 1024  # QwenImagePipeline.tokenizer_max_length: the most it accepts
DEFAULT_LATENT_CELLS = 128  # QwenImagePipeline.default_sample_size (x the VAE scale = px)

# The exact architectures of Qwen/Qwen-Image (its transformer/, vae/, text_encoder/ and
# scheduler/ configs), which --random-weights builds.
QWEN_IMAGE = {
    "transformer": {
        "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60,
        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
        "guidance_embeds": False, "axes_dims_rope": [16, 56, 56]},
    # AutoencoderKLQwenImage's defaults are Qwen-Image's VAE (base_dim 96, z_dim 16,
    # dim_mult [1, 2, 4, 4], temperal_downsample [False, True, True], its latents_mean/std).
    "vae": {},
    # Qwen2.5-VL-7B-Instruct: the text model is what the pipeline runs; the vision tower
    # is built too (the class has it) and never called.
    "text_encoder": {
        "text_config": {
            "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
            "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "max_position_embeddings": 128000,
            "vocab_size": 152064,
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}},
        "vision_config": {
            "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
            "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "window_size": 112,
            "fullatt_block_indexes": [7, 15, 23, 31]},
        "vocab_size": 152064, "hidden_size": 3584},
    "scheduler": {
        "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False,
        "max_image_seq_len": 8192, "max_shift": 0.9, "num_train_timesteps": 1000,
        "shift": 1.0, "shift_terminal": 0.02, "stochastic_sampling": False,
        "time_shift_type": "exponential", "use_beta_sigmas": False,
        "use_dynamic_shifting": True, "use_exponential_sigmas": False,
        "use_karras_sigmas": False},
    "max_sequence_length": MAX_SEQUENCE_LENGTH,
}

PRESETS = (
    # Sampling: the model card's example (50 steps, true_cfg_scale 4.0, negative prompt " ",
    # 1:1 at 1328 x 1328). Steering: NOT YET TUNED ON REAL WEIGHTS. Reasoned from the
    # presets that are: the flow families steer as SD does (flux-dev and sd3.5-medium keep
    # step size 5, 16 iterations, the first half of the steps; schnell steers step 0 only
    # because it has 4 steps); Qwen-Image samples 50 CFG steps as flux-dev, so it gets
    # the same.
    Preset("qwen-image", "qwen-image", "Qwen/Qwen-Image",
           "Qwen-Image (20B MMDiT, Qwen2.5-VL-7B text encoder; true CFG 4; 1328 px); steering "
           "defaults not yet tuned on real weights",
           1328, SteerDefaults(steps=50, guidance=4.0, step_size=5.0, iterations=16,
                               steer_until=0.5),
           configs=QWEN_IMAGE),
)


# ------------------------------------------------------------------------------ tokens

def _byte_chars() -> dict[int, str]:
    """GPT-2 / Qwen2 byte-level BPE's byte -> printable character table."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """The pieces byte-level BPE spells ``word`` as (lowest-ranked pair merged first)."""
    pieces = list(word)
    while len(pieces) > 1:
        found = [(ranks[p], i) for i, p in enumerate(zip(pieces, pieces[1:], strict=False))
                 if p in ranks]
        if not found:
            break
        _, i = min(found)
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def build_qwen_tokenizer(words=RANDOM_WEIGHTS_WORDS, *, model_max_length: int = 32768):
    """A real Qwen2 (byte-level BPE) tokenizer from an in-memory vocabulary.

    Every byte is a token (any text tokenises); each given word, and each word of
    ``PROMPT_TEMPLATE``, is one token with and without its leading space (Qwen2's
    pre-tokenizer keeps the space on the word); ``SPECIAL_TOKENS`` are special tokens, so
    the template's system part and user header are the 34 tokens the pipeline drops, as
    with the hub's tokenizer.
    """
    import re

    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    chars = _byte_chars()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab.setdefault(chars[b], len(vocab))
    template = re.sub(r"<\|[a-z_]+\|>", " ", PROMPT_TEMPLATE.replace("{}", " "))
    spelled = sorted({w for text in (" ".join(words), template)
                      for w in re.findall(r"[A-Za-z]+", text)})
    targets = [("".join(chars[b] for b in f"{s}{w}".encode())) for w in spelled
               for s in ("", " ")]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}

    def join(target: str) -> None:  # merge its first two pieces until it is one token
        pieces = _bpe(target, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = _bpe(target, ranks)

    for target in targets:  # left-to-right chains, then joins for what other merges split
        for _ in range(2):
            join(target)
    # Later merges can split an earlier word again: every word must still be one token.
    for target in targets:
        join(target)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges,
                         model_max_length=model_max_length)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
                   special_tokens=True)
    return tok


class PromptInTemplate:
    """The Qwen2 tokenizer as the recorded maps see a prompt: inside ``PROMPT_TEMPLATE``,
    after the ``TEMPLATE_DROP`` tokens the pipeline drops.

    Called on a prompt it returns the ids of the kept tokens (the prompt's, then the 5 that
    close the template) and their character offsets in the prompt; the template tokens get
    (0, 0), so no phrase of the prompt ever maps to them. ``model_max_length`` is the
    backbone's text length (``text_len``): the prompts' kept tokens are padded to it, and
    longer prompts are refused by token alignment.
    """

    def __init__(self, tokenizer, model_max_length: int = MAX_SEQUENCE_LENGTH) -> None:
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length

    def __call__(self, prompt: str, return_offsets_mapping: bool = False,
                 add_special_tokens: bool = True, **kwargs) -> dict:
        if not isinstance(prompt, str):
            raise TypeError("PromptInTemplate tokenises one prompt at a time")
        start = PROMPT_TEMPLATE.index("{}")
        end = start + len(prompt)
        enc = self.tokenizer(PROMPT_TEMPLATE.format(prompt), return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]
        if any(b > start and a < end for a, b in offsets[:TEMPLATE_DROP]):
            raise TokenAlignmentError(
                f"the tokenizer spells the template's system part in fewer than "
                f"{TEMPLATE_DROP} tokens, so QwenImagePipeline drops words of the prompt "
                f"{prompt!r}: use the tokenizer the model ships with")
        kept = []
        for a, b in offsets[TEMPLATE_DROP:]:
            a, b = max(a, start), min(b, end)
            kept.append((a - start, b - start) if b > a else (0, 0))
        out = {"input_ids": ids[TEMPLATE_DROP:], "attention_mask": [1] * len(kept)}
        if return_offsets_mapping:
            out["offset_mapping"] = kept
        return out

    def convert_ids_to_tokens(self, ids):
        return self.tokenizer.convert_ids_to_tokens(ids)

    def __len__(self) -> int:
        return len(self.tokenizer)


# ----------------------------------------------------------------------------- capture

def _text_key_probs(q_img: torch.Tensor, k_txt: torch.Tensor, key_mask: torch.Tensor | None
                    ) -> torch.Tensor:
    """(B, S, H, D) x (B, T, H, D) -> (B, H, S, T): softmax over the unmasked text keys."""
    logits = torch.einsum("bshd,bthd->bhst", q_img, k_txt) * q_img.shape[-1] ** -0.5
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1)


class TextKeyProbs(torch.autograd.Function):
    """``_text_key_probs`` padded with zero columns to ``width`` (the backbone's text
    length, the columns the recorder's token weights index), recomputed in backward.

    It saves only its inputs, views of the joint query and key the attention itself saves:
    the recorder's einsum keeps just its token weights, so a recorded layer adds the maps
    of the recorded tokens to the autograd graph, not a (B, heads, Q, T) matrix of all text
    tokens (which autograd would otherwise keep for the softmax's backward).
    """

    @staticmethod
    def forward(ctx, q_img, k_txt, key_mask, width: int):
        ctx.save_for_backward(q_img, k_txt, key_mask)
        probs = _text_key_probs(q_img, k_txt, key_mask)
        return F.pad(probs, (0, width - probs.shape[-1]))

    @staticmethod
    def backward(ctx, grad):
        q, k, key_mask = ctx.saved_tensors
        p = _text_key_probs(q.float(), k.float(), key_mask)
        g = grad[..., :p.shape[-1]].float()
        dlogits = p * (g - (g * p).sum(dim=-1, keepdim=True)) * q.shape[-1] ** -0.5
        dq = torch.einsum("bhst,bthd->bshd", dlogits, k.float()).to(q.dtype)
        dk = torch.einsum("bhst,bshd->bthd", dlogits, q.float()).to(k.dtype)
        return dq, dk, None, None


def _explicit_masked_attention(query, key, value, mask):
    """Attention with the full matrix materialised, key mask (B, S) honoured."""
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))  # (B, H, S, D)
    logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    return (logits.softmax(dim=-1) @ v).transpose(1, 2)


class QwenCaptureProcessor(QwenDoubleStreamAttnProcessor2_0):
    """QwenDoubleStreamAttnProcessor2_0 that also hands a sink the image x text-key maps.

    ``text_len``: the columns of the maps (the backbone's text length); a forward's text
    may be shorter (the longest prompt's tokens), the missing columns are zeros.
    ``mode="explicit"``: the full (text + image)^2 matrix softmaxed explicitly (the
    reference-style baseline of ``l2s speed``).
    """

    def __init__(self, layer: CrossAttnLayer, sink: Sink | None, text_len: int, *,
                 mode: str = "capture",
                 original: QwenDoubleStreamAttnProcessor2_0 | None = None) -> None:
        super().__init__()
        setup_capture(self, layer, sink, text_len, mode, original)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None,
                 encoder_hidden_states_mask=None, attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError(f"{self.layer.name}: Qwen-Image joint attention takes the text "
                             "stream and its key mask, no other attention mask")
        n_txt = encoder_hidden_states.shape[1]
        head_dim = attn.inner_dim // attn.heads

        def heads(x):
            return x.unflatten(-1, (-1, head_dim))  # (B, S, H, D)

        query, key, value = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        t_query, t_key, t_value = (heads(f(encoder_hidden_states))
                                   for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attn.norm_added_q is not None:
            t_query = attn.norm_added_q(t_query)
        if attn.norm_added_k is not None:
            t_key = attn.norm_added_k(t_key)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            query = apply_rotary_emb_qwen(query, img_freqs, use_real=False)
            key = apply_rotary_emb_qwen(key, img_freqs, use_real=False)
            t_query = apply_rotary_emb_qwen(t_query, txt_freqs, use_real=False)
            t_key = apply_rotary_emb_qwen(t_key, txt_freqs, use_real=False)
        query = torch.cat([t_query, query], dim=1)  # [text; image]
        key = torch.cat([t_key, key], dim=1)
        value = torch.cat([t_value, value], dim=1)
        text_mask = encoder_hidden_states_mask
        if text_mask is not None:
            text_mask = text_mask.bool()
        if self.sink is not None:
            # image queries after the text, text keys before the image (views: see
            # TextKeyProbs for why nothing of all text tokens is kept)
            self.sink(self.layer, TextKeyProbs.apply(query[:, n_txt:], key[:, :n_txt],
                                                     text_mask, self.text_len))
        mask = None
        if text_mask is not None:
            image = torch.ones(text_mask.shape[0], hidden_states.shape[1], dtype=torch.bool,
                               device=text_mask.device)
            mask = torch.cat([text_mask, image], dim=1)
        if self.mode == "explicit":
            out = _explicit_masked_attention(query, key, value, mask)
        else:
            out = dispatch_attention_fn(
                query, key, value, attn_mask=None if mask is None else mask[:, None, None, :],
                dropout_p=0.0, is_causal=False, backend=self._attention_backend,
                parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        t_out, out = out[:, :n_txt], out[:, n_txt:]
        out = attn.to_out[0](out.contiguous())
        if len(attn.to_out) > 1:
            out = attn.to_out[1](out)
        return out, attn.to_add_out(t_out.contiguous())


# ---------------------------------------------------------------------------- denoiser

def qwen_vae_scale(vae) -> int:
    """Pixels per latent cell of AutoencoderKLQwenImage: 2 per down-sampling stage
    (QwenImagePipeline's ``vae_scale_factor``)."""
    return 2 ** len(vae.temperal_downsample)


class QwenImageDenoiser(MMDiTDenoiser):
    """QwenImageTransformer2DModel + Qwen2.5-VL + AutoencoderKLQwenImage, flow matching
    with true CFG (see the module docstring for the pipeline's conventions kept)."""

    pipeline_is_flux = True  # QwenImagePipeline's sigma grid and mu are FluxPipeline's
    guidance_mode = "cfg"
    max_text_len = TOKENIZER_MAX_LENGTH
    # Packed 2x2 latents and the (B, C, h, w) noise draw, exactly as FluxPipeline's.
    prepare_latents = FluxDenoiser.prepare_latents
    _our_latents = FluxDenoiser._our_latents
    _vae_latents = FluxDenoiser._vae_latents

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler_config: dict, *,
                 name: str, image_size=None, max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 fingerprint: str | None = None) -> None:
        super().__init__(transformer, vae, [text_encoder],
                         PromptInTemplate(tokenizer, max_sequence_length), scheduler_config,
                         name=name, image_size=image_size,
                         patch=transformer.config.patch_size,
                         default_size=DEFAULT_LATENT_CELLS * qwen_vae_scale(vae),
                         fingerprint=fingerprint)
        self.text_encoder, self.text_tokenizer = text_encoder, tokenizer
        self.latent_shape = (self.grid[0] * self.grid[1], transformer.config.in_channels)
        self._longest = 0  # text tokens of the longest prompt encoded: what a forward runs
        self._cond_norm: torch.Tensor | None = None  # see predict / step

    def _vae_scale(self, vae) -> int:
        return qwen_vae_scale(vae)

    def cross_attention_layers(self):
        # One joint block per layer, ``transformer_blocks.i.attn``, as SD3's.
        return sd3_attention_layers(self.transformer, self.grid)

    def _make_capture(self, layer, original, sink, explicit: bool = False):
        if isinstance(original, QwenCaptureProcessor):  # e.g. the reference baseline's
            mode = original.mode
        elif type(original) is QwenDoubleStreamAttnProcessor2_0:
            mode = "explicit" if explicit else "capture"
        else:
            return None
        return QwenCaptureProcessor(layer, sink, self.text_len, mode=mode, original=original)

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """The pipeline's prompt states, padded to ``text_len`` with zeros and a key mask;
        "" (the engine's unconditional prompt) is the model card's negative prompt " "."""
        prompts = list(prompts)
        negative = bool(prompts) and all(p == "" for p in prompts)
        texts = [PROMPT_TEMPLATE.format(NEGATIVE_PROMPT if p == "" else p) for p in prompts]
        enc = self.text_tokenizer(texts, max_length=TOKENIZER_MAX_LENGTH + TEMPLATE_DROP,
                                  padding=True, truncation=True, return_tensors="pt")
        dev = self.text_encoder.device
        with torch.no_grad():
            hidden = self.text_encoder(input_ids=enc.input_ids.to(dev),
                                       attention_mask=enc.attention_mask.to(dev),
                                       output_hidden_states=True).hidden_states[-1]
        n = self.text_len
        states = hidden.new_zeros(len(prompts), n, hidden.shape[-1])
        mask = torch.zeros(len(prompts), n, dtype=torch.bool)
        lengths = []
        for i, keep in enumerate(enc.attention_mask.bool()):
            kept = hidden[i][keep.to(dev)][TEMPLATE_DROP:][:n]  # the pipeline's, cut as its
            states[i, :len(kept)] = kept                        # max_sequence_length cuts
            mask[i, :len(kept)] = True
            lengths.append(len(kept))
        self._longest = max(self._longest, *lengths)
        # Host-side facts about the rows, kept by select (and by Conditioning.cat from its
        # first part, which only guided_prediction uses: [uncond; cond], uncond first):
        # "negative_first" marks the unconditional prompts, "text_tokens" the one length
        # all rows share (a forward then needs no mask, as the pipeline runs one prompt).
        shared = {"negative_first": True} if negative else {}
        if len(set(lengths)) == 1:
            shared["text_tokens"] = lengths[0]
        return Conditioning({"states": states.to(self.device, self.dtype),
                             "mask": mask.to(self.device)}, shared)

    def model_output(self, latents, t, cond, guidance):
        b = latents.shape[0]
        n = cond.shared.get("text_tokens")
        if n is None or "negative_first" in cond.shared:
            # Rows of several lengths (a CFG batch, prompts of different lengths): the text
            # tokens the longest prompt encoded has, the rest of each row masked.
            n, mask = self._longest or self.text_len, cond["mask"][:, :self._longest or None]
        else:  # every row is n real tokens: no mask (no padding, no per-forward sync)
            mask = None
        return self.transformer(
            hidden_states=latents, timestep=self._timesteps(t, b, latents.dtype) / 1000,
            encoder_hidden_states=cond["states"][:, :n], encoder_hidden_states_mask=mask,
            img_shapes=[[(1, *self.grid)]] * b, return_dict=False)[0]

    def predict(self, latents, t, cond, guidance=None):
        pred = super().predict(latents, t, cond, guidance)
        # The CFG batch [uncond; cond] of sampling.guided_prediction (its conditioning is
        # the unconditional one's, joined first): keep each conditional latent token's
        # prediction norm for the true-CFG rescale in ``step``.
        if "negative_first" in cond.shared and pred.shape[0] % 2 == 0:
            self._cond_norm = pred.chunk(2)[1].norm(dim=-1, keepdim=True)
        return pred

    def step(self, pred, t, t_next, latents):
        norm, self._cond_norm = self._cond_norm, None
        if norm is not None and norm.shape[0] == pred.shape[0]:
            # QwenImagePipeline: comb * (|cond| / |comb|) per latent token, after the mix.
            pred = pred * (norm / pred.norm(dim=-1, keepdim=True))
        return super().step(pred, t, t_next, latents)

    def _vae_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        return (torch.tensor(cfg.latents_mean).view(shape).to(like.device, like.dtype),
                torch.tensor(cfg.latents_std).view(shape).to(like.device, like.dtype))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = self._vae_latents(latents.float())[:, :, None].to(self.vae.device, self.vae.dtype)
        mean, std = self._vae_stats(z)
        with torch.no_grad():
            x = self.vae.decode(z / (1.0 / std) + mean).sample[:, :, 0]  # the pipeline's
        return ((x.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()[:, :, None] * 2 - 1  # (B, 3, 1, H, W)
        with torch.no_grad():
            z = self.vae.encode(x.to(self.vae.device, self.vae.dtype)).latent_dist.mean
        mean, std = self._vae_stats(z)
        z = ((z - mean) / std)[:, :, 0].float()
        return self._our_latents(z).to(self.device)


# ----------------------------------------------------------------------------- loading

def load_qwen_image(source: str, *, name: str, device: torch.device, dtype: torch.dtype,
                    image_size: int | None = None,
                    max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> QwenImageDenoiser:
    """A Qwen-Image folder or hub repo in diffusers layout (QwenImagePipeline's parts)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    dtype = mmdit_dtype(dtype)
    c = load_components(source, "Qwen-Image", {
        "transformer": (QwenImageTransformer2DModel, {"torch_dtype": dtype}),
        "vae": (AutoencoderKLQwenImage, {"torch_dtype": torch.float32}),
        "text_encoder": (Qwen2_5_VLForConditionalGeneration, {"torch_dtype": dtype}),
        "tokenizer": (Qwen2Tokenizer, {}),
        "scheduler": (FlowMatchEulerDiscreteScheduler, {})})
    return QwenImageDenoiser(c["transformer"].to(device), c["vae"].to(device),
                             c["text_encoder"].to(device), c["tokenizer"],
                             dict(c["scheduler"].config), name=name, image_size=image_size,
                             max_sequence_length=max_sequence_length)


def text_encoder_config(config: dict):
    """A Qwen2_5_VLConfig from a preset's text-encoder config."""
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(**config)


def build_random_qwen_image(preset: Preset, *, device: torch.device, dtype: torch.dtype,
                            image_size: int | None = None, seed: int = 0) -> QwenImageDenoiser:
    """The preset's exact architecture with random weights, allocated once on the device
    (``l2s.engine.materialise``); the tokenizer is built locally (``build_qwen_tokenizer``)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg, dtype = preset.configs, mmdit_dtype(dtype)
    nets = build_random({
        "transformer": lambda: QwenImageTransformer2DModel(**cfg["transformer"]),
        "text_encoder": lambda: Qwen2_5_VLForConditionalGeneration(
            text_encoder_config(cfg["text_encoder"])),
        "vae": lambda: AutoencoderKLQwenImage(**cfg["vae"])}, device, dtype, seed=seed)
    return QwenImageDenoiser(nets["transformer"], nets["vae"], nets["text_encoder"],
                             build_qwen_tokenizer(), cfg["scheduler"],
                             name=f"{preset.name} (random weights)",
                             image_size=image_size or preset.image_size,
                             max_sequence_length=cfg["max_sequence_length"],
                             fingerprint=f"{preset.name}-random-{seed}")


def load(req: LoadRequest) -> QwenImageDenoiser:
    """The family's loader: the preset (or its random-weights architecture), hub id, folder.
    A folder no preset names draws at QwenImagePipeline's default size (128 latent cells a
    side: 1024 px with the 8x VAE)."""
    if req.random_weights:
        return build_random_qwen_image(random_weights_preset(req.preset, PRESETS),
                                       device=req.device, dtype=req.dtype,
                                       image_size=req.image_size)
    p = req.preset
    return load_qwen_image(req.source, name=req.model, device=req.device, dtype=req.dtype,
                           image_size=req.image_size or (p.image_size if p else None))


register_family(Family("qwen-image", load, pipelines=("QwenImagePipeline",),
                       like_preset=lambda source: "qwen-image"),
                PRESETS)
