"""DDIM inversion exactness and timestep alignment on analytic denoisers; map recording."""

import math

import pytest
import torch

from l2s.families.tiny import tiny_sd
from l2s.inversion.loop import (
    InversionConfig,
    ddim_invert,
    noised_latents,
    psnr,
    reconstruct,
    record_maps,
)


class Analytic:
    """Wrap a tiny denoiser but replace its network by an analytic epsilon(x, t)."""

    def __init__(self, fn, prediction_type="epsilon"):
        self.den = tiny_sd(prediction_type)
        self.fn = fn
        self.calls = []
        self.den.predict = self._predict

    def _predict(self, x, t, cond, guidance=None):
        self.calls.append(int(t))
        return self.fn(x, t)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_constant_epsilon_inverts_and_reconstructs_exactly(prediction_type):
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(2, 4, 16, 16, generator=g)
    a = Analytic(lambda x, t: eps, prediction_type)
    x0 = torch.randn(2, 4, 16, 16, generator=g)
    cond = a.den.encode_prompt(["a dog", "a cat"])
    traj = ddim_invert(a.den, x0, cond, steps=10)
    assert traj.shape == (10, 2, 4, 16, 16)
    torch.testing.assert_close(reconstruct(a.den, traj[0], cond, steps=10), x0,
                               atol=1e-4, rtol=0)


def test_inversion_uses_exactly_the_sampling_timesteps():
    a = Analytic(lambda x, t: torch.zeros_like(x))
    cond = a.den.encode_prompt(["a dog"])
    ddim_invert(a.den, torch.zeros(1, 4, 16, 16), cond, steps=10, fixed_point=0)
    inverted = list(a.calls)
    a.calls.clear()
    reconstruct(a.den, torch.zeros(1, 4, 16, 16), cond, steps=10)
    # Leading spacing with steps_offset=1: 901, 801, ..., 1 -- the same set both ways.
    assert a.calls == a.den.timesteps(10) == [901 - 100 * i for i in range(10)]
    assert inverted == a.calls[::-1]


def test_fixed_point_iterations_make_state_dependent_inversion_exact():
    # epsilon depends on the state, so one-shot inversion (eps at the wrong point) drifts.
    fn = lambda x, t: 0.5 * torch.tanh(x) + math.sin(t / 100)  # noqa: E731
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    errors = []
    for iters in (0, 6):
        a = Analytic(fn)
        cond = a.den.encode_prompt(["a dog"])
        traj = ddim_invert(a.den, x0, cond, steps=20, fixed_point=iters)
        errors.append((reconstruct(a.den, traj[0], cond, steps=20) - x0).abs().max().item())
    assert errors[1] < errors[0] / 20 and errors[1] < 1e-3


def test_noised_latents_follow_the_forward_process():
    a = Analytic(lambda x, t: x)
    x0 = torch.ones(1, 4, 16, 16)
    lat = noised_latents(a.den, x0, 10, torch.Generator().manual_seed(0))
    ts = a.den.timesteps(10)
    # Mean over pixels of sqrt(a) x0 + sqrt(1 - a) eps is about sqrt(a) (eps has mean 0).
    for k in (0, 9):
        assert abs(lat[k].mean().item() - a.den.schedule.alpha(ts[k]) ** 0.5) < 0.1


def test_psnr_values():
    a = torch.zeros(2, 8, 8, 3)
    b = a.clone()
    b[1] += 0.1
    assert psnr(a, b)[1].item() == pytest.approx(20.0, abs=1e-4)
    assert psnr(a, b)[0].item() > 100


def test_record_maps_shapes_per_prompt_trajectory():
    den = tiny_sd()
    lat = torch.randn(10, 3, 4, 16, 16)
    maps = record_maps(den, lat, ["a dog left of a cat", "a dog above a cat", "a cup"],
                       [[[2], [5]], [[2], [4]], [[2], [2]]], record_steps=(1, 9), steps=10)
    c = sum(la.heads for la in den.cross_attention_layers())
    assert maps.shape == (3, 2, 2, c, 16, 16)  # (P, T, 2, C, S, S)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(3, 2, 2, c))


def test_config_validation():
    with pytest.raises(ValueError, match="unknown inversion"):
        InversionConfig(method="rf")
    with pytest.raises(ValueError, match="0..9"):
        InversionConfig(steps=10, record_steps=(5, 12))
