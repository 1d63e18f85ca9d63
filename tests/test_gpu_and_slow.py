"""Tests that need a GPU or minutes of CPU: marked, skipped by default, never deleted."""

import pytest
import torch

from l2s.engine.hooks import AttentionRecorder


@pytest.mark.slow
def test_random_weights_sd14_forward_with_recorded_maps():
    from l2s.engine.loading import load_backbone

    den = load_backbone("sd1.4", random_weights=True, image_size=256, device="cpu")
    layers = den.cross_attention_layers()
    assert sum(la.heads for la in layers) == 128
    x = den.prepare_latents(1, torch.Generator().manual_seed(0))
    with torch.no_grad(), AttentionRecorder(den.attention_model, layers, [[1], [2]]) as rec:
        den.predict_noise(x, 500, den.encode_prompt(["a dog left of a cat"]))
    assert rec.stacked().shape == (1, 2, 128, 16, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_unet_with_fp32_vae_decodes_finite_images():
    from l2s.engine.tiny import tiny_sd_components
    from l2s.engine.unet import UNetDenoiser

    unet, vae, te, tok, sch = tiny_sd_components()
    den = UNetDenoiser(unet.cuda().half(), te.cuda(), tok, sch, vae.cuda(), name="tiny-gpu")
    x = den.prepare_latents(2, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float16
    eps = den.predict_noise(x, 500, den.encode_prompt(["a dog", "a cat"]))
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()
    assert torch.isfinite(den.decode(x)).all()
