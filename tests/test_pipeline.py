"""Steering a stock diffusers StableDiffusionPipeline through its step callback."""

import numpy as np
import pytest
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline

from l2s.engine.backbone import BackboneError
from l2s.families.tiny import tiny_sd_components
from l2s.steering.loop import SteerSettings
from l2s.steering.pipeline import steering_callback


def _pipe():
    unet, vae, te, tok, sch = tiny_sd_components()
    return StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=sch, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _run(pipe, cb):
    return pipe("a dog left of a cat", num_inference_steps=4, guidance_scale=2.0, height=32,
                width=32, output_type="np", callback_on_step_end=cb,
                callback_on_step_end_tensor_inputs=["latents"],
                generator=torch.Generator().manual_seed(0)).images


def test_callback_steers_a_stock_pipeline():
    pipe = _pipe()
    plain = _run(pipe, None)
    cb = steering_callback(pipe, "a dog left of a cat", method="centroid",
                           settings=SteerSettings(steps=4, steer_until=3, iterations=2,
                                                  step_size=3000.0))
    steered = _run(pipe, cb)
    assert [r.step for r in cb.stats.steps] == [1, 2]
    assert all(r.iterations == 2 for r in cb.stats.steps)
    assert steered.shape == plain.shape and not torch.allclose(
        torch.from_numpy(steered), torch.from_numpy(plain))
    # The hooks are gone afterwards: the pipeline again gives its plain images.
    assert torch.allclose(torch.from_numpy(_run(pipe, None)), torch.from_numpy(plain))


def test_scaled_latent_schedulers_are_refused():
    pipe = _pipe()
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    pipe.scheduler.init_noise_sigma = 2.0
    with pytest.raises(BackboneError, match="DDIMScheduler"):
        steering_callback(pipe, "a dog left of a cat", method="centroid")


def _run_mmdit(pipe, cb, **extra):
    from l2s.families.mmdit_tiny import TINY_T5_TOKENS

    return pipe("a dog left of a cat", num_inference_steps=4, height=32, width=32,
                max_sequence_length=TINY_T5_TOKENS, output_type="np", callback_on_step_end=cb,
                callback_on_step_end_tensor_inputs=["latents"],
                generator=torch.Generator().manual_seed(0), **extra).images


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_callback_steers_flux_and_sd3_pipelines_through_their_family(kind):
    """Catches pipeline.py building a UNetDenoiser whatever the pipeline (a Flux or SD3
    pipeline has no .unet), and a callback that disturbs the latents it does not steer."""
    from l2s.families.mmdit_tiny import TINY_T5_TOKENS, tiny_flux_pipeline, tiny_sd3_pipeline

    pipe = tiny_flux_pipeline() if kind == "flux" else tiny_sd3_pipeline()
    extra = {"guidance_scale": 2.0} if kind == "sd3" else {}
    plain = _run_mmdit(pipe, None, **extra)
    cb = steering_callback(pipe, "a dog left of a cat", method="centroid",
                           text_len=TINY_T5_TOKENS,
                           settings=SteerSettings(steps=4, steer_until=3, iterations=2,
                                                  step_size=3000.0))
    assert type(cb.denoiser).__name__ == {"flux": "FluxDenoiser", "sd3": "SD3Denoiser"}[kind]
    steered = _run_mmdit(pipe, cb, **extra)
    assert [r.step for r in cb.stats.steps] == [1, 2]
    # The model time of each steered step is the scheduler's own (sigma x 1000, a float).
    assert [r.t for r in cb.stats.steps] == pytest.approx(
        [float(t) for t in pipe.scheduler.timesteps[1:3]], abs=1e-4)
    assert steered.shape == plain.shape and not np.allclose(steered, plain)
    # The hooks are gone afterwards: the pipeline again gives its plain images.
    np.testing.assert_array_equal(_run_mmdit(pipe, None, **extra), plain)
    # A callback that steers no step hands the latents back untouched.
    idle = steering_callback(pipe, "a dog left of a cat", method="centroid",
                             text_len=TINY_T5_TOKENS,
                             settings=SteerSettings(steps=4, steer_until=1, iterations=2,
                                                    step_size=3000.0))
    np.testing.assert_array_equal(_run_mmdit(pipe, idle, **extra), plain)


@pytest.mark.parametrize("guidance", [0.0, 0.5, 1.0, 2.0])
def test_guidance_scales_follow_the_pipelines_rule(guidance):
    """Bug: l2s mixed in the unconditional branch at scales below 1 (0.5 extrapolated away
    from the prompt, 0 gave the unconditional image) where diffusers'
    do_classifier_free_guidance (guidance_scale > 1) uses the conditional prediction alone."""
    from l2s.engine.sampling import denoise
    from l2s.families.sd import from_pipeline

    pipe = _pipe()
    den = from_pipeline(pipe, "tiny")
    x = den.prepare_latents(1, torch.Generator().manual_seed(0))
    want = pipe("a dog left of a cat", num_inference_steps=4, guidance_scale=guidance,
                height=32, width=32, latents=x.clone(), output_type="latent").images
    got = denoise(den, x, den.encode_prompt(["a dog left of a cat"]), steps=4,
                  guidance=guidance)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
