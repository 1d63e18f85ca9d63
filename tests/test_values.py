"""Values, not just shapes: each test recomputes what the code should produce by an
independent route (explicit softmax(QK^T), the SGD / Adam formulas, fixed regression slices),
so it fails when the arithmetic changes, not only when the code crashes."""

import torch

from l2s.engine.hooks import AttentionRecorder, resize_maps
from l2s.engine.sampling import seeded_latents
from l2s.relations import parse
from l2s.steering.loop import Steerer, SteerSettings
from l2s.steering.losses import RelationLoss


# --- attention capture ---------------------------------------------------------------------
def test_recorded_maps_equal_an_independent_softmax_of_q_k(den):
    """maps[b, g, c] = mean over the group's tokens of softmax(Q K^T * scale), per head."""
    layers = den.cross_attention_layers()
    x = seeded_latents(den, [0, 1])
    emb = den.encode_prompt(["a dog left of a cat", "a teddy bear above a cup"])
    groups = [[[2], [5]], [[2, 3], [6]]]
    inputs: dict[str, tuple] = {}
    modules = dict(den.attention_model.named_modules())
    handles = [modules[la.name].register_forward_pre_hook(
        lambda m, args, kw, name=la.name: inputs.__setitem__(
            name, (args[0] if args else kw["hidden_states"], kw["encoder_hidden_states"])),
        with_kwargs=True) for la in layers]
    try:
        with torch.no_grad(), AttentionRecorder(den, layers, groups) as rec:
            den.predict(x, 500, emb)
            got = rec.stacked()  # (B, G, C, S, S)
    finally:
        for h in handles:
            h.remove()
    expected = []
    for la in layers:
        attn = modules[la.name]
        hs, ctx = inputs[la.name]
        b, hw, _ = hs.shape
        q = attn.to_q(hs).view(b, hw, attn.heads, -1).transpose(1, 2)  # (B, heads, HW, d)
        k = attn.to_k(ctx).view(b, ctx.shape[1], attn.heads, -1).transpose(1, 2)
        p = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)  # (B, heads, HW, T)
        per_group = torch.stack([torch.stack([p[i, :, :, g].mean(-1) for g in groups[i]])
                                 for i in range(b)])  # (B, G, heads, HW)
        h, w = la.resolution
        expected.append(resize_maps(per_group.view(b, 2, attn.heads, h, w), 16))
    torch.testing.assert_close(got, torch.cat(expected, dim=2), atol=1e-5, rtol=1e-4)


# --- the latent update ---------------------------------------------------------------------
class Scripted(RelationLoss):
    """loss_b = scale_b * <subject map - object map, ramp> + offset_b, offsets per call, so
    the test decides which image is above the threshold at each iteration."""

    def __init__(self, offsets, scale=(1.0, 1.0)):
        self.offsets, self.scale, self.calls = list(offsets), scale, []

    def value(self, maps):
        ramp = torch.linspace(-1, 1, maps.shape[-1], device=maps.device)
        m = maps.float().mean(2)  # (B, 2, S, S)
        return ((m[:, 0] - m[:, 1]) * ramp).sum((-2, -1)) * torch.tensor(self.scale[:len(m)])

    def __call__(self, maps, t, relations, *, step):
        """Call k uses offsets[k] (the last one after that): one per image in that call's
        batch, since images under the threshold leave it."""
        self.calls.append((list(relations), maps.detach().clone()))
        off = torch.tensor(self.offsets[min(len(self.calls), len(self.offsets)) - 1])
        return self.value(maps) + off, torch.zeros(maps.shape[0])


def _one_step(den, loss, settings, x, prompts):
    st = Steerer(den, prompts, [parse(p) for p in prompts], loss, settings)
    t = den.timesteps(settings.steps)[0]
    with st.recorder() as rec:
        x1 = st.update(rec, x.clone(), t, 0)
    return st, t, x1


def _gradient(den, st, loss, x, t):
    """d(sum of losses)/dx by hand: the same maps recorded through a fresh recorder."""
    z = x.clone().requires_grad_(True)
    with AttentionRecorder(den, st.layers, st.plan.groups, keep_grad=True) as rec:
        den.predict(z, t, st.cond)
        maps = rec.stacked()
    sel = torch.stack([torch.stack((maps[b, i], maps[b, j]))
                       for b, (i, j) in enumerate(p[0] for p in st.plan.pairs)])
    (g,) = torch.autograd.grad(loss.value(sel).sum(), z)
    return g


PROMPTS = ["a dog left of a cat", "a dog left of a cat"]
ALWAYS = {"threshold_start": 0.5, "threshold_end": 0.5}  # offsets decide who is above it


def test_one_sgd_update_is_z_minus_alpha_gradient(den):
    x = seeded_latents(den, [0, 1])
    loss = Scripted([[1.0, 1.0]])
    settings = SteerSettings(steps=4, guidance=2.0, steer_until=1, iterations=1,
                             step_size=300.0, **ALWAYS)
    st, t, x1 = _one_step(den, loss, settings, x, PROMPTS)
    g = _gradient(den, st, loss, x, t)
    assert g.abs().sum() > 0
    torch.testing.assert_close(x1, x - 300.0 * g, atol=1e-5, rtol=1e-4)


def test_an_image_under_the_threshold_stops_while_the_batch_goes_on(den):
    x = seeded_latents(den, [0, 1])
    loss = Scripted([[-10.0, 1.0], [1.0]])  # image 0 is done from the start, then leaves
    settings = SteerSettings(steps=4, guidance=2.0, steer_until=1, iterations=3,
                             step_size=300.0, **ALWAYS)
    st, _, x1 = _one_step(den, loss, settings, x, PROMPTS)
    torch.testing.assert_close(x1[0], x[0], atol=0, rtol=0)
    assert not torch.allclose(x1[1], x[1])
    assert st.stats.steps[0].iterations == 3


def test_adam_first_update_and_stopped_images_stay_put(den):
    x = seeded_latents(den, [0, 1])
    lr = 0.01
    settings = SteerSettings(steps=4, guidance=2.0, steer_until=1, iterations=1,
                             step_size=lr, optimizer="adam", **ALWAYS)
    loss = Scripted([[1.0, 1.0]])
    st, t, x1 = _one_step(den, loss, settings, x, PROMPTS)
    g = _gradient(den, st, loss, x, t)
    # Adam's first step: m/(sqrt(v)+eps) with bias correction is g/(|g|+eps).
    torch.testing.assert_close(x1, x - lr * g / (g.abs() + 1e-8), atol=1e-6, rtol=1e-4)
    # Image 0 is above the threshold at iteration 1, under it from iteration 2: its momentum
    # must not carry it on.
    settings = SteerSettings(steps=4, guidance=2.0, steer_until=1, iterations=3,
                             step_size=lr, optimizer="adam", **ALWAYS)
    loss = Scripted([[1.0, 1.0], [-10.0, 1.0], [1.0]])  # image 0 leaves after its 2nd check
    _, _, x3 = _one_step(den, loss, settings, x, PROMPTS)
    torch.testing.assert_close(x3[0], x1[0], atol=1e-6, rtol=0)  # where iteration 1 left it
    assert not torch.allclose(x3[1], x1[1])


def test_non_finite_gradients_are_skipped_and_counted(den):
    class NaNGradient(Scripted):
        def value(self, maps):  # finite value, NaN gradient (d|u|/du * d sqrt(u)/du at 0)
            d = (maps - maps.detach()).abs().sum((1, 2, 3, 4))
            return torch.sqrt(d) + 1.0

    x = seeded_latents(den, [0, 1])
    settings = SteerSettings(steps=4, guidance=2.0, steer_until=1, iterations=3,
                             step_size=300.0, **ALWAYS)
    st, _, x1 = _one_step(den, NaNGradient([[0.0, 0.0]]), settings, x, PROMPTS)
    torch.testing.assert_close(x1, x, atol=0, rtol=0)
    assert st.stats.skipped_updates == 6 and st.stats.steps[0].iterations == 0  # 2 images x 3
    assert "non-finite gradient" in st.stats.warnings[0]


def test_round_robin_picks_each_images_own_maps_with_mixed_triplet_counts(den):
    prompts = ["a teddy bear above a cup and a cup left of a bowl", "a dog left of a cat"]
    loss = Scripted([[1.0, 1.0]])
    settings = SteerSettings(steps=4, guidance=2.0, steer_until=1, iterations=3,
                             step_size=0.0, **ALWAYS)  # latents fixed: same maps each call
    x = seeded_latents(den, [0, 1])
    st, t, _ = _one_step(den, loss, settings, x, prompts)
    assert [rels for rels, _ in loss.calls] == [["above", "left of"], ["left of", "left of"],
                                               ["above", "left of"]]
    with torch.no_grad(), AttentionRecorder(den, st.layers, st.plan.groups) as rec:
        den.predict(x, t, st.cond)
        maps = rec.stacked()
    from l2s.engine.tokens import triplet_tokens

    def phrase_maps(b, phrase_tokens):
        return maps[b, st.plan.groups[b].index(list(phrase_tokens.indices))]

    for it, (_, sel) in enumerate(loss.calls):
        for b, prompt in enumerate(prompts):
            trip = parse(prompt)[it % len(parse(prompt))]
            subj, obj = triplet_tokens(den.tokenizer, prompt, trip)
            torch.testing.assert_close(sel[b, 0], phrase_maps(b, subj))
            torch.testing.assert_close(sel[b, 1], phrase_maps(b, obj))


# --- the diffusers pipeline callback -------------------------------------------------------
def test_pipeline_callback_steers_every_image_of_a_prompt():
    from diffusers import StableDiffusionPipeline

    from l2s.families.tiny import tiny_sd_components
    from l2s.steering.pipeline import steering_callback

    unet, vae, te, tok, sch = tiny_sd_components()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=sch, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)

    def run(cb):
        return pipe("a dog left of a cat", num_inference_steps=4, guidance_scale=2.0,
                    height=32, width=32, output_type="np", num_images_per_prompt=2,
                    callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents"],
                    generator=torch.Generator().manual_seed(0)).images

    plain = torch.from_numpy(run(None))
    cb = steering_callback(pipe, "a dog left of a cat", method="centroid",
                           num_images_per_prompt=2,
                           settings=SteerSettings(steps=4, steer_until=3, iterations=2,
                                                  step_size=3000.0))
    seen = []
    inner = cb.steerer.loss_fn
    cb.steerer.loss_fn = lambda maps, t, rels, step: (seen.append(list(rels)),
                                                      inner(maps, t, rels, step=step))[1]
    steered = torch.from_numpy(run(cb))
    assert plain.shape == steered.shape == (2, 32, 32, 3)
    assert seen and all(r == ["left of", "left of"] for r in seen)  # both images, every call
    for i in range(2):
        assert not torch.allclose(steered[i], plain[i])


# --- a steered toy image, pinned -----------------------------------------------------------
def test_steered_toy_image_slice_is_pinned():
    """Regression value: the centre row of a steered toy image (seed 0, 6 steps). A change of
    the sampler, the loss or the update moves these numbers."""
    from l2s.steering.job import SteerConfig, steer
    from l2s.steering.options import SteerOptions

    res = steer(SteerConfig("a circle to the left of a square",
                            options=SteerOptions(steps=6, steer_until=3, iterations=4,
                                                 steer_from=0, optimizer="sgd",
                                                 step_size=5.0)))
    row = torch.tensor(res.pixels[0, 16, 8:24:2].astype(int))  # (8, 3) uint8 as int
    expected = torch.tensor(EXPECTED_ROW)
    assert (row - expected).abs().max() <= 3, row.tolist()


# a red circle, then a blue square: left of it, as asked
EXPECTED_ROW = [[255, 1, 0], [255, 0, 0], [2, 0, 0], [0, 0, 0], [5, 3, 123], [1, 0, 255],
                [0, 2, 255], [4, 0, 251]]
