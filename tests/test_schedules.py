"""The time/noise interface: DDPM and rectified flow through one loop and one inversion."""

import pytest
import torch

from l2s.engine.backbone import Conditioning, Denoiser
from l2s.engine.sampling import denoise, guided_prediction
from l2s.engine.schedules import DDPMSchedule, FlowMatchSchedule, shifted_sigmas
from l2s.inversion.loop import ddim_invert, noised_latents, reconstruct


class Stub(Denoiser):
    """A family with an analytic network: out(x, t, cond, guidance) = fn(...)."""

    name = fingerprint = "stub"
    image_size = (8, 8)
    latent_shape = (2, 4, 4)
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, schedule, fn, guidance_mode="none"):
        self.schedule, self.fn, self.guidance_mode = schedule, fn, guidance_mode
        self.calls = []  # (batch, guidance) per network call

    tokenizer = attention_model = None

    def cross_attention_layers(self):
        return []

    def capture_processor(self, layer, original, sink):
        raise NotImplementedError

    def encode_prompt(self, prompts):
        return Conditioning({"states": torch.zeros(len(prompts), 3, 2)})

    def model_output(self, latents, t, cond, guidance):
        self.calls.append((latents.shape[0], guidance))
        return self.fn(latents, t, cond)

    def decode(self, latents):
        return latents

    def encode_image(self, images):
        return images


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)


def test_flow_sampling_follows_the_straight_path_to_x0():
    x0, noise = _pair()
    sch = FlowMatchSchedule(shift=3.0)
    den = Stub(sch, lambda x, t, c: noise - x0)  # the exact velocity of the pair
    out = denoise(den, noise, den.encode_prompt(["a", "b"]), steps=5, guidance=4.0)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    # "none": no CFG batch and no scale reaches the network, whatever the guidance.
    assert den.calls == [(2, None)] * 5


def test_flow_timesteps_are_shifted_sigmas_times_1000_noisiest_first():
    ts = FlowMatchSchedule(shift=3.0).timesteps(4)
    assert ts == [1000 * s for s in shifted_sigmas(4, 3.0)] and ts[0] == 1000.0
    assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
    assert shifted_sigmas(4, 3.0)[2] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))


def test_flow_euler_inversion_is_exact_for_a_constant_velocity_and_noising_interpolates():
    x0, noise = _pair(1)
    v = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    den = Stub(FlowMatchSchedule(), lambda x, t, c: v)
    cond = den.encode_prompt(["a", "b"])
    traj = ddim_invert(den, x0, cond, steps=6, fixed_point=1)
    torch.testing.assert_close(reconstruct(den, traj[0], cond, steps=6), x0, atol=1e-5, rtol=0)
    lat = noised_latents(den, torch.zeros(2, 2, 4, 4), 4, torch.Generator().manual_seed(0))
    # At sigma s the noised latent of x0 = 0 is s * noise: its std is about s.
    assert abs(lat[0].std().item() - 1.0) < 0.3 and lat[3].std() < lat[0].std()


def test_embedded_guidance_reaches_the_network_and_cfg_batches_both_branches():
    x, _ = _pair()
    emb = Stub(FlowMatchSchedule(), lambda x, t, c: x, guidance_mode="embedded")
    cond = emb.encode_prompt(["a", "b"])
    guided_prediction(emb, x, 500.0, cond, None, 3.5)
    assert emb.calls == [(2, 3.5)]
    cfg = Stub(FlowMatchSchedule(), lambda x, t, c: x + c["states"].sum(), guidance_mode="cfg")
    pred = guided_prediction(cfg, x, 500.0, cond, cfg.encode_prompt(["", ""]), 3.5)
    assert cfg.calls == [(4, None)]  # one [uncond; cond] batch
    torch.testing.assert_close(pred, x)


def test_ddpm_schedule_noises_with_alpha_bar():
    from diffusers import DDIMScheduler

    sch = DDPMSchedule(DDIMScheduler(prediction_type="epsilon"))
    x0, noise = _pair()
    t = sch.timesteps(10)[3]
    a = sch.alpha(t)
    torch.testing.assert_close(sch.add_noise(x0, noise, t), a**0.5 * x0 + (1 - a) ** 0.5 * noise)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        DDPMSchedule(DDIMScheduler(), prediction_type="flow")
