"""Joint-attention capture for Flux and SD3 on tiny random transformers, and the helpers
it needs (T5 tokenizer from a word list, meta-device materialisation, preset configs)."""

import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.models.embeddings import apply_rotary_emb

from l2s.engine.materialise import materialise
from l2s.engine.tokenizers import build_t5_tokenizer
from l2s.engine.tokens import phrase_tokens
from l2s.families.joint_attention import (
    FluxCaptureProcessor,
    SD3CaptureProcessor,
    flux_attention_layers,
    sd3_attention_layers,
)
from l2s.families.mmdit_configs import FLUX_DEV, FLUX_SCHNELL, SD35_MEDIUM

T, GRID = 5, (4, 4)  # text tokens, image grid of the tiny inputs


def tiny_flux(layers=2, single=2):
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=layers, num_single_layers=single,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()


def tiny_sd3(layers=2):
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=layers, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
        pooled_projection_dim=64, out_channels=4, qk_norm="rms_norm",
        dual_attention_layers=(0,)).eval()


def flux_inputs(x=None):
    g = torch.Generator().manual_seed(1)
    n = GRID[0] * GRID[1]
    img_ids = torch.zeros(*GRID, 3)
    img_ids[..., 1] += torch.arange(GRID[0])[:, None]
    img_ids[..., 2] += torch.arange(GRID[1])[None, :]
    return dict(hidden_states=torch.randn(1, n, 4, generator=g) if x is None else x,
                encoder_hidden_states=torch.randn(1, T, 32, generator=g),
                pooled_projections=torch.randn(1, 32, generator=g),
                timestep=torch.tensor([0.7]), txt_ids=torch.zeros(T, 3),
                img_ids=img_ids.reshape(n, 3), return_dict=False)


def sd3_inputs(x=None):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 4, *GRID, generator=g) if x is None else x,
                encoder_hidden_states=torch.randn(1, T, 32, generator=g),
                pooled_projections=torch.randn(1, 64, generator=g),
                timestep=torch.tensor([700.0]), return_dict=False)


def install(model, layers, make):
    """Capture processors on `layers`; returns the list the sink appends (name, probs) to."""
    got = []
    procs = dict(model.attn_processors)
    for la in layers:
        procs[f"{la.name}.processor"] = make(la, lambda layer, p: got.append((layer.name, p)))
    model.set_attn_processor(procs)
    return got


def test_flux_layer_order_is_double_then_single_blocks_of_the_real_architecture():
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        real = FluxTransformer2DModel(**FLUX_DEV["transformer"])
    layers = flux_attention_layers(real, (32, 32))
    assert len(layers) == 57 and sum(la.heads for la in layers) == 57 * 24 == 1368
    assert [la.name for la in layers[:2]] == ["transformer_blocks.0.attn",
                                             "transformer_blocks.1.attn"]
    assert layers[18].name == "transformer_blocks.18.attn"
    assert layers[19].name == "single_transformer_blocks.0.attn"
    assert layers[56].name == "single_transformer_blocks.37.attn"
    assert len(flux_attention_layers(real, (32, 32), "double")) == 19
    with pytest.raises(ValueError, match="double"):
        flux_attention_layers(real, (32, 32), "single")


def test_sd3_layers_skip_the_image_only_attn2_of_dual_blocks():
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        real = SD3Transformer2DModel(**SD35_MEDIUM["transformer"])
    layers = sd3_attention_layers(real, (64, 64))
    assert [la.name for la in layers] == [f"transformer_blocks.{i}.attn" for i in range(24)]
    assert hasattr(real.transformer_blocks[0], "attn2")  # dual block: exists, not recorded


def test_flux_capture_keeps_the_output_and_records_in_forward_order():
    model = tiny_flux()
    with torch.no_grad():
        ref = model(**flux_inputs())[0]
    layers = flux_attention_layers(model, GRID)
    got = install(model, layers, lambda la, s: FluxCaptureProcessor(la, s, T))
    with torch.no_grad():
        out = model(**flux_inputs())[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert [n for n, _ in got] == [la.name for la in layers]
    for _, p in got:
        assert p.shape == (1, 2, 16, T)  # (B, heads, image queries, text keys)
        torch.testing.assert_close(p.sum(-1), torch.ones(1, 2, 16))


def _full_logits(q, k):  # (B, S, H, D) -> (B, H, S, S)
    return torch.einsum("bshd,bthd->bhst", q, k) / q.shape[-1] ** 0.5


@pytest.mark.parametrize("block", ["transformer_blocks.0.attn", "single_transformer_blocks.1.attn"])
def test_flux_map_equals_softmax_over_text_keys_of_qk(block):
    """The recorded map of a text token, recomputed from the layer's own inputs: full
    (text+image)^2 logits after QK-norm and RoPE, sliced, softmaxed over the text keys."""
    model = tiny_flux()
    attn = model.get_submodule(block)
    seen = {}
    attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    layers = [la for la in flux_attention_layers(model, GRID) if la.name == block]
    got = install(model, layers, lambda la, s: FluxCaptureProcessor(la, s, T))
    with torch.no_grad():
        model(**flux_inputs())
    x, ctx, rope = seen["hidden_states"], seen.get("encoder_hidden_states"), \
        seen["image_rotary_emb"]
    heads = lambda y: y.unflatten(-1, (2, 16))  # noqa: E731
    q, k = attn.norm_q(heads(attn.to_q(x))), attn.norm_k(heads(attn.to_k(x)))
    if ctx is not None:  # double block: text projections, text first
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(ctx))), q], 1)
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(ctx))), k], 1)
    q, k = (apply_rotary_emb(y, rope, sequence_dim=1) for y in (q, k))
    logits = _full_logits(q, k)[:, :, T:, :T]  # image queries x text keys
    for token in range(T):
        want = logits.exp()[..., token] / logits.exp().sum(-1)
        torch.testing.assert_close(got[0][1][..., token], want, rtol=1e-4, atol=1e-6)


def test_sd3_map_equals_softmax_over_text_keys_and_output_is_unchanged():
    model = tiny_sd3()
    with torch.no_grad():
        ref = model(**sd3_inputs())[0]
    block = model.transformer_blocks[1]  # the last block: context_pre_only
    attn = block.attn
    seen = {}
    attn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    layers = sd3_attention_layers(model, GRID)
    got = install(model, layers, lambda la, s: SD3CaptureProcessor(la, s))
    with torch.no_grad():
        out = model(**sd3_inputs())[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert [n for n, _ in got] == [la.name for la in layers]
    x, ctx = seen["hidden_states"], seen["encoder_hidden_states"]
    heads = lambda y: y.unflatten(-1, (4, 8))  # noqa: E731
    q = torch.cat([attn.norm_q(heads(attn.to_q(x))),
                   attn.norm_added_q(heads(attn.add_q_proj(ctx)))], 1)
    k = torch.cat([attn.norm_k(heads(attn.to_k(x))),
                   attn.norm_added_k(heads(attn.add_k_proj(ctx)))], 1)
    n = x.shape[1]
    logits = _full_logits(q, k)[:, :, :n, n:]  # image first: image queries x text keys
    want = logits.exp() / logits.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(got[1][1], want, rtol=1e-4, atol=1e-6)


def test_explicit_mode_gives_the_same_output_and_maps():
    model = tiny_flux()
    layers = flux_attention_layers(model, GRID)
    fast = install(model, layers, lambda la, s: FluxCaptureProcessor(la, s, T))
    with torch.no_grad():
        a = model(**flux_inputs())[0]
    slow = install(model, layers, lambda la, s: FluxCaptureProcessor(la, s, T, mode="explicit"))
    with torch.no_grad():
        b = model(**flux_inputs())[0]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for (_, p), (_, r) in zip(fast, slow, strict=True):
        torch.testing.assert_close(p, r)


def test_gradient_reaches_the_latent_through_the_maps():
    model = tiny_flux().requires_grad_(False)
    layers = flux_attention_layers(model, GRID)
    got = install(model, layers, lambda la, s: FluxCaptureProcessor(la, s, T))
    x = torch.randn(1, 16, 4, requires_grad=True)
    model(**flux_inputs(x))
    loss = sum(p[..., 2].pow(2).sum() for _, p in got)
    (grad,) = torch.autograd.grad(loss, x)
    assert grad.abs().sum() > 0


def test_wrong_text_length_is_refused():
    model = tiny_flux()
    layers = flux_attention_layers(model, GRID)[:1]
    install(model, layers, lambda la, s: FluxCaptureProcessor(la, s, T + 1))
    with pytest.raises(ValueError, match="text has 5 tokens"):
        model(**flux_inputs())


def test_t5_tokenizer_spells_words_as_single_pieces_with_offsets():
    tok = build_t5_tokenizer(["teddy", "bear", "dog", "a"], model_max_length=32)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    prompt = "a dog to the left of a teddy bear"
    pt = phrase_tokens(tok, prompt, "teddy bear")
    assert pt.pieces == ("\u2581teddy", "\u2581bear")
    assert tok(prompt).input_ids[-1] == tok.eos_token_id
    assert phrase_tokens(tok, prompt, "left").indices  # unknown words fall back to characters


def test_materialise_builds_once_in_dtype_keeps_ties_and_buffers():
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5 = materialise(lambda: T5EncoderModel(T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)),
        "cpu", torch.bfloat16)
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    assert {p.dtype for p in t5.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in t5.parameters())
    assert torch.isfinite(t5(torch.tensor([[3, 4, 1]]))[0]).all()
    clip = materialise(lambda: CLIPTextModel(CLIPTextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, eos_token_id=2)), "cpu", torch.float32)
    assert torch.equal(clip.get_buffer("embeddings.position_ids"), torch.arange(77)[None])
    flux = materialise(tiny_flux, "cpu", torch.bfloat16)
    ref = tiny_flux()
    assert [(n, p.shape) for n, p in flux.named_parameters()] == \
        [(n, p.shape) for n, p in ref.named_parameters()]


def test_preset_configs_match_the_published_architectures():
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        flux = FluxTransformer2DModel(**FLUX_SCHNELL["transformer"])
        sd3 = SD3Transformer2DModel(**SD35_MEDIUM["transformer"])
    n_flux = sum(p.numel() for p in flux.parameters())
    n_sd3 = sum(p.numel() for p in sd3.parameters())
    assert 11.8e9 < n_flux < 12.0e9  # "12B"
    assert 2.2e9 < n_sd3 < 2.6e9  # "2.5B"
    assert sum(FLUX_DEV["transformer"]["axes_dims_rope"]) == 128  # RoPE axes = head dim
    assert not flux.config.guidance_embeds and FLUX_DEV["transformer"]["guidance_embeds"]
