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
    with torch.no_grad(), AttentionRecorder(den, layers, [[1], [2]]) as rec:
        den.predict(x, 500, den.encode_prompt(["a dog left of a cat"]))
    assert rec.stacked().shape == (1, 2, 128, 16, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_unet_with_fp32_vae_decodes_finite_images():
    from l2s.families.tiny import tiny_sd_components
    from l2s.families.unet import UNetDenoiser

    unet, vae, te, tok, sch = tiny_sd_components()
    den = UNetDenoiser(unet.cuda().half(), te.cuda(), tok, sch, vae.cuda(), name="tiny-gpu")
    x = den.prepare_latents(2, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float16
    eps = den.predict(x, 500, den.encode_prompt(["a dog", "a cat"]))
    assert eps.dtype == torch.float32 and torch.isfinite(eps).all()
    assert torch.isfinite(den.decode(x)).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_steering_on_cuda_times_with_events_and_reports_peak_memory():
    from l2s.families.tiny import tiny_sd_components
    from l2s.families.unet import UNetDenoiser
    from l2s.relations import parse
    from l2s.steering.loop import SteerSettings, steer_latents
    from l2s.steering.losses import CentroidLoss
    from l2s.steering.options import SteerOptions
    from l2s.steering.speed import SpeedConfig, run_speed

    unet, vae, te, tok, sch = tiny_sd_components()
    den = UNetDenoiser(unet.cuda().half(), te.cuda(), tok, sch, vae.cuda(), name="tiny-gpu")
    prompt = "a dog left of a cat"
    x = den.prepare_latents(1, torch.Generator().manual_seed(0))
    settings = SteerSettings(steps=4, guidance=2.0, steer_until=2, iterations=3,
                             step_size=100.0, threshold_start=-1.0, threshold_end=-1.0)
    imgs, stats = steer_latents(den, [prompt], [parse(prompt)], CentroidLoss(), settings, x)
    assert torch.isfinite(imgs).all() and len(stats.steps) == 2
    for rec in stats.steps:  # CUDA-event timings, read after a synchronise
        assert rec.iterations == 3 and rec.forward_ms > 0 and rec.backward_ms > 0
    rep = run_speed(SpeedConfig(model="tiny-gpu", repeats=2,
                                options=SteerOptions(steps=4, steer_until=2, iterations=2)),
                    denoiser=den)
    assert rep.ratios["reference_vs_ours_peak_memory"] > 0
    assert rep.end_to_end["steered_worst_case"]["iterations_run"] == 4
