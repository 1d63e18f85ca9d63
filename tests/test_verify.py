"""--verify: plain first, only the images that fail the check regenerated steered."""

from dataclasses import replace

import pytest
import torch

from l2s.engine.sampling import seeded_latents
from l2s.relations import parse
from l2s.steering.loop import SteerSettings, steer_latents
from l2s.steering.losses import CentroidLoss
from l2s.steering.verify import generate_verified

PROMPTS = ["a dog left of a cat", "a cat above a bowl"]
S = SteerSettings(steps=3, guidance=2.0, steer_until=2, iterations=2, step_size=3000.0,
                  threshold_start=-1.0, threshold_end=-1.0)


def _run(den, settings, **kw):
    lat = seeded_latents(den, [0, 1])
    trip = [parse(p) for p in PROMPTS]
    plain, _ = steer_latents(den, PROMPTS, [[], []], CentroidLoss(), settings, lat)
    steered, _ = steer_latents(den, PROMPTS, trip, CentroidLoss(), settings, lat)
    got = generate_verified(den, PROMPTS, trip, lat, settings, CentroidLoss(), **kw)
    return plain, steered, got


def test_only_failing_images_are_steered_from_their_seeds(den):
    plain, steered, got = _run(den, S, check=lambda imgs: [True, False])
    assert got.passed_plain == [True, False] and got.checked_by == "detector"
    torch.testing.assert_close(got.images[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(got.images[1], steered[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain[1], steered[1])
    assert got.to_json() == {"checked_by": "detector", "passed_plain": [True, False],
                             "steered": 1}


@pytest.mark.parametrize("threshold, passed", [(-1.0, [False, False]), (1e9, [True, True])])
def test_without_a_detector_the_classifier_judges_the_plain_pass(den, threshold, passed):
    s = replace(S, threshold_start=threshold, threshold_end=threshold)
    plain, steered, got = _run(den, s)
    assert got.checked_by == "classifier" and got.passed_plain == passed
    expected = plain if all(passed) else steered
    torch.testing.assert_close(got.images, expected, atol=1e-5, rtol=1e-4)
    assert bool(got.stats.steps) == (not all(passed))  # no gradient when all pass
