"""The shipped toy-mmdit through the backbone interface (preset "toy-mmdit"): 2-step runs."""

import pytest
import torch

from l2s.engine.hooks import AttentionRecorder
from l2s.engine.loading import load_backbone
from l2s.engine.registry import get_preset
from l2s.engine.sampling import sample
from l2s.engine.tokens import pair_tokens
from l2s.toy.scenes import CATEGORY_NAMES

PROMPT = "a circle to the left of a square"


@pytest.fixture(scope="module")
def den():
    return load_backbone("toy-mmdit")


def test_preset_is_the_pixel_space_toy_with_its_vocabulary(den):
    assert get_preset("toy-mmdit").defaults.steps == 20
    assert den.image_size == (32, 32) and den.latent_shape == (256, 12)  # 16x16 2x2-packed RGB
    assert den.vae is None and den.known_objects == CATEGORY_NAMES
    assert den.guidance_mode == "cfg"  # trained with caption dropout: --guidance > 1 works
    # Pixel space: encode_image packs the image in [-1, 1], decode undoes it.
    img = torch.rand(1, 32, 32, 3)
    torch.testing.assert_close(den.decode(den.encode_image(img)), img)


def test_two_steps_record_object_maps_with_gradient_to_the_latent(den):
    circle, square = pair_tokens(den.tokenizer, PROMPT, "circle", "square")
    cond = den.encode_prompt([PROMPT])
    layers = den.cross_attention_layers()
    assert len(layers) == 6  # 2 double-stream + 4 single-stream blocks
    x = den.prepare_latents(1, torch.Generator().manual_seed(0))
    for t, t_next in zip(den.timesteps(2), [*den.timesteps(2)[1:], None], strict=True):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad(), AttentionRecorder(
                den, layers, [list(circle.indices), list(square.indices)], keep_grad=True) as rec:
            pred = den.predict(x, t, cond)
            maps = rec.stacked()
            assert maps.shape == (1, 2, 6 * 4, 16, 16)
            torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(1, 2, 24))
            (grad,) = torch.autograd.grad(maps[:, 0, :, :, :8].sum(), x)
        assert grad.abs().sum() > 0
        x = den.step(pred.detach(), t, t_next, x.detach())
    assert torch.isfinite(x).all()
    assert all(type(p).__name__ == "FluxAttnProcessor"
               for p in den.transformer.attn_processors.values())


def test_plain_generation_is_deterministic_and_follows_seed_and_guidance(den):
    def run(seed, guidance=1.0):
        lat = den.prepare_latents(1, torch.Generator().manual_seed(seed))
        return sample(den, [PROMPT], steps=2, guidance=guidance, latents=lat)

    a = run(5)
    torch.testing.assert_close(run(5), a, rtol=0, atol=0)
    assert (run(6) - a).abs().max() > 0.05
    assert (run(5, guidance=3.0) - a).abs().max() > 0.01  # CFG reaches the network


def test_shipped_classifier_fits_the_shipped_model_and_steers_on_its_flow_steps(den, tmp_path):
    """Catches a shipped classifier that no longer matches the shipped toy-mmdit (layers,
    fingerprint), one `l2s steer` does not find by default, or steering that reports DDPM
    timesteps (or none) for a rectified-flow model."""
    from l2s.classifier.model import default_classifier
    from l2s.steering.job import SteerConfig, steer

    card = default_classifier("toy-mmdit", den.fingerprint)
    assert card is not None and card.parent.name == "toy-mmdit"
    # Seed 0 draws the circle left of the square: ask for the opposite, so step 0 must act.
    res = steer(SteerConfig(prompt="a circle to the right of a square", model="toy-mmdit",
                            out=str(tmp_path / "o")), denoiser=den)
    steps = res.report["steps"]
    assert [s["step"] for s in steps] == [0, 1, 2, 3, 4]  # the preset steers steps 0-4
    # The toy's own flow grid (t = 1000 sigma, from 1000 down in equal steps), not DDPM's.
    grid = [float(t) for t in den.timesteps(20)[:5]]
    assert grid[0] == 1000 and grid[0] - grid[1] == pytest.approx(grid[1] - grid[2], rel=1e-4)
    assert [s["t"] for s in steps] == pytest.approx(grid)
    assert steps[0]["loss_after"] < steps[0]["loss_before"]
