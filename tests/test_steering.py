"""The steering loop on tiny offline components: descent, selectivity, round robin."""

import pytest
import torch

from l2s.families.tiny import tiny_sd
from l2s.relations import parse
from l2s.steering import CentroidLoss, SteerSettings, steer_latents


@pytest.fixture(scope="module")
def den():
    return tiny_sd()


def _latents(den, n, seed=0):
    return torch.cat([den.prepare_latents(1, torch.Generator().manual_seed(seed + i))
                      for i in range(n)])


class Spy(CentroidLoss):
    """The centroid loss, remembering which relations each call asked for."""

    def __init__(self):
        super().__init__(margin=0.3)
        self.calls = []

    def __call__(self, maps, t, relations):
        self.calls.append(list(relations))
        return super().__call__(maps, t, relations)


def test_loss_decreases_over_iterations_on_a_fixed_seed(den):
    prompt = "a dog left of a cat"
    settings = SteerSettings(steps=4, guidance=2.0, steer_until=1, iterations=6,
                             step_size=2000.0)
    imgs, stats = steer_latents(den, [prompt], [parse(prompt)], CentroidLoss(margin=0.3),
                                settings, _latents(den, 1))
    (rec,) = stats.steps
    assert imgs.shape == (1, 32, 32, 3)
    assert rec.iterations == 6
    assert rec.loss_after < rec.loss_before
    assert rec.forward_ms > 0 and rec.backward_ms > 0 and rec.update_ms >= 0


def test_no_relation_means_no_backward_pass(den, monkeypatch):
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, stats = steer_latents(den, ["a dog and a cat"], [[]], CentroidLoss(),
                             SteerSettings(steps=3, guidance=2.0), _latents(den, 1))
    assert calls == [] and stats.steps == []


def test_plain_images_in_a_batch_are_left_alone(den):
    lat = _latents(den, 2)
    settings = SteerSettings(steps=3, guidance=2.0, steer_until=1, iterations=3,
                             step_size=5000.0)
    steered, _ = steer_latents(den, ["a dog left of a cat", "a dog"],
                               [parse("a dog left of a cat"), []], CentroidLoss(), settings, lat)
    plain, _ = steer_latents(den, ["a dog left of a cat", "a dog"], [[], []], CentroidLoss(),
                             settings, lat)
    torch.testing.assert_close(steered[1], plain[1])
    assert not torch.allclose(steered[0], plain[0])


def test_multi_relation_prompts_go_round_robin(den):
    prompt = "a teddy bear above a cup and a cup left of a bowl"
    spy = Spy()
    settings = SteerSettings(steps=2, guidance=2.0, steer_until=1, iterations=4,
                             step_size=1.0, threshold_start=-1.0, threshold_end=-1.0)
    steer_latents(den, [prompt], [parse(prompt)], spy, settings, _latents(den, 1))
    assert spy.calls == [["above"], ["left of"], ["above"], ["left of"]]


def test_early_exit_once_the_loss_is_under_threshold(den):
    settings = SteerSettings(steps=2, guidance=2.0, steer_until=1, iterations=10,
                             threshold_start=10.0, threshold_end=10.0)
    _, stats = steer_latents(den, ["a dog left of a cat"], [parse("a dog left of a cat")],
                             CentroidLoss(), settings, _latents(den, 1))
    assert stats.steps[0].iterations == 0 and stats.steps[0].loss_before is not None


def test_settings():
    s = SteerSettings(steps=50)
    assert s.steered_steps() == 25
    assert SteerSettings(steps=50, steer_until=10).steered_steps() == 10
    assert s.threshold(0) == pytest.approx(1e-5) and s.threshold(5) == pytest.approx(7e-5)
    with pytest.raises(ValueError, match="optimizer"):
        SteerSettings(optimizer="lbfgs")
