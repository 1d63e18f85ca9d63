"""Steering a stock diffusers StableDiffusionPipeline through its step callback."""

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
