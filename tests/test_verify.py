"""--verify: plain first, only the images that fail the check regenerated steered."""

from dataclasses import replace

import pytest
import torch

from l2s.engine.sampling import seeded_latents
from l2s.relations import Triplet, parse
from l2s.steering.loop import SteerSettings, steer_latents
from l2s.steering.losses import CentroidLoss
from l2s.steering.options import SteerOptions
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


def test_without_a_detector_the_classifier_judges_the_plain_pass(den):
    """Both images have the same prompt and noise, so the same maps; image 0 asks for "dog
    left of cat", image 1 for "dog right of cat". With a loss of 0 exactly when the maps'
    centroids are in order and a threshold of 0, one of them passes, and which one is up to
    the maps: seeds 0 and 2 put the dog on different sides. Fails if the verdict ignores the
    maps (the same verdict for both seeds), or judges an image by another image's relation."""
    s = replace(S, threshold_start=0.0, threshold_end=0.0)
    prompts, loss = [PROMPTS[0]] * 2, CentroidLoss(margin=0.0)
    trip = [parse(PROMPTS[0]), [Triplet("dog", "right of", "cat")]]
    verdicts = []
    for seed in (0, 2):
        lat = seeded_latents(den, [seed, seed])
        got = generate_verified(den, prompts, trip, lat, s, loss)
        assert got.checked_by == "classifier"
        assert sorted(got.passed_plain) == [False, True]  # the maps say one or the other
        verdicts.append(got.passed_plain)
        plain, _ = steer_latents(den, prompts, [[], []], loss, s, lat)
        steered, _ = steer_latents(den, prompts, trip, loss, s, lat)
        ok = got.passed_plain.index(True)
        torch.testing.assert_close(got.images[ok], plain[ok], rtol=0, atol=0)
        torch.testing.assert_close(got.images[1 - ok], steered[1 - ok], atol=1e-5, rtol=1e-4)
        assert len(got.stats.steps) > 0  # the failing image was steered
    assert verdicts[0] != verdicts[1]


@pytest.mark.parametrize("threshold", [-1.0, 1e9])
def test_a_probe_that_passes_everything_takes_no_gradient(den, threshold):
    """Every image passes (threshold 1e9): the plain images come back and nothing is steered;
    none passes (-1): every image is the steered one."""
    s = replace(S, threshold_start=threshold, threshold_end=threshold)
    plain, steered, got = _run(den, s)
    passed = threshold > 0
    assert got.checked_by == "classifier" and got.passed_plain == [passed, passed]
    torch.testing.assert_close(got.images, plain if passed else steered, atol=1e-5, rtol=1e-4)
    assert bool(got.stats.steps) == (not passed)  # no gradient when all pass


def test_bench_l2s_verify_keeps_what_the_suites_checker_passes():
    """bench's l2s-verify asks the suite's checker (``MethodContext.check``, the verdict the
    benchmark records), not the backbone's own detector: the images it passes keep their plain
    pixels, the others are the l2s images of the same seeds. Fails if the method judges by
    anything else (it used the toy detector, whatever the suite's detector and scorer)."""
    from l2s.bench.methods import METHODS, MethodContext
    from l2s.bench.run import BenchConfig
    from l2s.bench.suites import BenchPrompt
    from l2s.engine.loading import load_backbone

    toy = load_backbone("toy", device="cpu")
    cfg = BenchConfig(model="toy", options=SteerOptions(steps=3, steer_until=2, iterations=2))
    texts = ["a circle to the left of a square", "a triangle above a ring"]
    prompts = [BenchPrompt(i, p, {"tag": "position"}, tuple(parse(p)))
               for i, p in enumerate(texts)]
    asked = []

    def check(images, ps):
        asked.append((images.clone(), [p.prompt for p in ps]))
        return [True, False]

    ctx = MethodContext(toy, cfg, check)
    got = METHODS["l2s-verify"](ctx)(prompts, [0, 1])
    plain = METHODS["plain"](ctx)(prompts, [0, 1])
    steered = METHODS["l2s"](ctx)(prompts, [0, 1])
    assert [ps for _, ps in asked] == [texts]  # asked once, about the plain images
    torch.testing.assert_close(asked[0][0], plain, rtol=0, atol=0)
    torch.testing.assert_close(got[0], plain[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], steered[1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain[1], steered[1])
