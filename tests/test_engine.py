"""Engine tests on tiny offline SD-shaped components: adapter, DDIM maths, attention hooks."""

import pytest
import torch

from l2s.engine.backbone import BackboneError
from l2s.engine.hooks import AttentionRecorder, HookError, resize_maps, token_weights
from l2s.engine.sampling import sample
from l2s.engine.schedules import ddim_step, to_epsilon
from l2s.families.tiny import tiny_sd


@pytest.fixture(scope="module")
def den():
    return tiny_sd("epsilon")


def test_cross_attention_layers_in_forward_order_with_heads_and_resolution(den):
    layers = den.cross_attention_layers()
    names = [la.name.split(".")[0] for la in layers]
    assert names == ["down_blocks", "mid_block", "up_blocks", "up_blocks"]
    # 32 px image, VAE factor 2 -> 16x16 latent; level 0 at 16, the mid block at 8.
    assert [la.resolution for la in layers] == [(16, 16), (8, 8), (16, 16), (16, 16)]
    assert [la.heads for la in layers] == [2, 4, 2, 2]


def test_attention_resolution_follows_image_size():
    d = tiny_sd("epsilon", image_size=(64, 96))
    assert d.latent_hw == (32, 48)
    assert [la.resolution for la in d.cross_attention_layers()][:2] == [(32, 48), (16, 24)]
    with pytest.raises(BackboneError, match="multiple of 4"):
        tiny_sd("epsilon", image_size=30)


def test_to_epsilon_inverts_each_parameterisation():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    a = 0.3
    x_t = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    v = a**0.5 * eps - (1 - a) ** 0.5 * x0
    torch.testing.assert_close(to_epsilon(eps, x_t, a, "epsilon"), eps)
    torch.testing.assert_close(to_epsilon(v, x_t, a, "v_prediction"), eps, atol=1e-5, rtol=0)
    torch.testing.assert_close(to_epsilon(x0, x_t, a, "sample"), eps, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown prediction_type"):
        to_epsilon(v, x_t, a, "flow")


def test_ddim_step_runs_backwards_exactly_for_a_fixed_epsilon():
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    noisier = ddim_step(x, eps, 0.9, 0.2)
    torch.testing.assert_close(ddim_step(noisier, eps, 0.2, 0.9), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sampling_is_seeded_and_shaped(prediction_type):
    d = tiny_sd(prediction_type)
    a = sample(d, ["a dog", "a cat"], steps=3, guidance=2.0,
               generator=torch.Generator().manual_seed(0))
    b = sample(d, ["a dog", "a cat"], steps=3, guidance=2.0,
               generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 32, 32, 3) and torch.isfinite(a).all()
    assert 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a, b)


def test_token_weights_average_groups_and_reject_bad_indices():
    w = token_weights([[1], [2, 3]], seq_len=5)
    assert w.shape == (1, 5, 2)
    assert w[0, :, 1].tolist() == [0, 0, 0.5, 0.5, 0]
    per_sample = token_weights([[[1], [2]], [[1], [4]]], seq_len=5)
    assert per_sample.shape == (2, 5, 2) and per_sample[1, 4, 1] == 1
    with pytest.raises(ValueError, match="outside"):
        token_weights([[7]], seq_len=5)


def test_resize_maps_normalises_up_and_down():
    m = torch.rand(2, 3, 32, 32)
    for size in (8, 16, 64):
        r = resize_maps(m, size)
        assert r.shape == (2, 3, size, size)
        torch.testing.assert_close(r.sum((-2, -1)), torch.ones(2, 3))


def test_stacked_resizes_per_resolution_in_forward_order():
    """stacked() resizes all layers of one resolution together: the result must equal each
    layer resized alone, concatenated in forward order (catches layers regrouped by size, a
    split at the wrong head counts, or a resize that mixes maps)."""
    from l2s.engine.backbone import CrossAttnLayer

    layers = [CrossAttnLayer("a", 2, (8, 8)), CrossAttnLayer("b", 3, (4, 4)),
              CrossAttnLayer("c", 1, (8, 8)), CrossAttnLayer("d", 2, (2, 2))]

    class Host:
        attention_model = None

    rec = AttentionRecorder(Host(), layers, [[1], [2]], map_size=4)
    alone = []
    torch.manual_seed(0)
    for la in layers:
        q = la.resolution[0] * la.resolution[1]
        probs = torch.rand(1, la.heads, q, 5).softmax(-1)
        rec._record(la, probs)  # what the family's capture processor calls
        maps = torch.einsum("bhqt,tg->bghq", probs, token_weights([[1], [2]], 5)[0])
        alone.append(resize_maps(maps.reshape(1, 2, la.heads, *la.resolution), 4))
    torch.testing.assert_close(rec.stacked(), torch.cat(alone, dim=2))


def _recorded_forward(den, keep_grad):
    layers = den.cross_attention_layers()
    x = den.prepare_latents(2, torch.Generator().manual_seed(0)).requires_grad_(keep_grad)
    emb = den.encode_prompt(["a dog left of a cat", "a teddy bear above a cup"])
    groups = [[[2], [5]], [[2, 3], [6]]]  # per prompt: subject tokens, object tokens
    with AttentionRecorder(den, layers, groups, keep_grad=keep_grad) as rec:
        with torch.set_grad_enabled(keep_grad):
            den.predict(x, 500, emb)
            maps = rec.stacked()
    return x, maps


def test_recorded_maps_have_documented_shape_and_sum_to_one(den):
    _, maps = _recorded_forward(den, keep_grad=False)
    c = sum(la.heads for la in den.cross_attention_layers())
    assert maps.shape == (2, 2, c, 16, 16)  # (B, G, C, S, S)
    torch.testing.assert_close(maps.sum((-2, -1)), torch.ones(2, 2, c))
    assert not maps.requires_grad


def test_loss_on_maps_has_gradient_on_the_latent(den):
    x, maps = _recorded_forward(den, keep_grad=True)
    ramp = torch.linspace(-1, 1, 16)
    loss = (maps[:, 0] * ramp).sum() - (maps[:, 1] * ramp).sum()  # subject left of object
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unrecorded_layers_keep_their_processor_and_all_are_restored(den):
    before = {k: type(v) for k, v in den.attention_model.attn_processors.items()}
    recorded = den.cross_attention_layers()[:1]
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionRecorder(den, recorded, [[1]]):
            during = den.attention_model.attn_processors
            name = type(during[f"{recorded[0].name}.processor"]).__name__
            assert name == "_ExplicitCrossAttention"
            others = {k: type(v) for k, v in during.items()
                      if k != f"{recorded[0].name}.processor"}
            assert all(before[k] == t for k, t in others.items())
            raise RuntimeError("boom")
    assert {k: type(v) for k, v in den.attention_model.attn_processors.items()} == before


def test_missing_layer_names_diffusers_version(den):
    from dataclasses import replace

    bogus = replace(den.cross_attention_layers()[0], name="down_blocks.9.attn2")
    with pytest.raises(HookError, match="diffusers"):
        with AttentionRecorder(den, [bogus], [[1]]):
            pass


def test_recording_matches_the_fast_path_output(den):
    x = den.prepare_latents(1, torch.Generator().manual_seed(3))
    emb = den.encode_prompt(["a dog left of a cat"])
    with torch.no_grad():
        plain = den.predict(x, 300, emb)
        with AttentionRecorder(den, den.cross_attention_layers(), [[2], [5]]):
            recorded = den.predict(x, 300, emb)
    torch.testing.assert_close(recorded, plain, atol=1e-5, rtol=1e-4)


class _CountingProcessor:
    """A non-standard processor (as a LoRA / IP-Adapter one is): plain attention + a count."""

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.inner, self.calls = AttnProcessor2_0(), 0

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.calls += 1
        return self.inner(attn, hidden_states, *args, **kwargs)


def test_recording_wraps_a_custom_processor_and_keeps_it_working(den):
    layer = den.cross_attention_layers()[0]
    key = f"{layer.name}.processor"
    x = den.prepare_latents(1, torch.Generator().manual_seed(3))
    emb = den.encode_prompt(["a dog left of a cat"])
    with torch.no_grad():
        plain = den.predict(x, 300, emb)
        with AttentionRecorder(den, [layer], [[2], [5]]) as rec:
            den.predict(x, 300, emb)
            explicit = rec.stacked()
        custom = _CountingProcessor()
        originals = dict(den.attention_model.attn_processors)
        den.attention_model.set_attn_processor({**originals, key: custom})
        try:
            with AttentionRecorder(den, [layer], [[2], [5]]) as rec:
                wrapped_out = den.predict(x, 300, emb)
                wrapped = rec.stacked()
            assert den.attention_model.attn_processors[key] is custom  # restored
        finally:
            den.attention_model.set_attn_processor(dict(originals))
    assert custom.calls == 1  # it computed the recorded forward's output
    torch.testing.assert_close(wrapped, explicit, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(wrapped_out, plain, atol=1e-5, rtol=1e-4)


def test_added_kv_layers_are_refused_with_the_processor_named(den):
    layer = den.cross_attention_layers()[0]
    attn = den.attention_model.get_submodule(layer.name)
    custom = _CountingProcessor()
    originals = dict(den.attention_model.attn_processors)
    den.attention_model.set_attn_processor({**originals, f"{layer.name}.processor": custom})
    attn.add_k_proj = torch.nn.Identity()  # what added-KV (e.g. AttnAddedKV) layers carry
    try:
        with pytest.raises(HookError, match="_CountingProcessor"):
            with torch.no_grad(), AttentionRecorder(den, [layer], [[1]]):
                den.predict(den.prepare_latents(1, None), 300, den.encode_prompt(["a dog"]))
    finally:
        attn.add_k_proj = None
        den.attention_model.set_attn_processor(dict(originals))
