"""The reference architecture, its map layout and its step-index table."""

import pytest
import torch
from reference_impl import CLASSES, make_checkpoint, tiny_config, torch_reference_logits

from l2s.classifier.layout import MapLayout, bilinear_resize, resolution_order
from l2s.classifier.model import num_parameters
from l2s.classifier.reference import (
    ReferenceClassifier,
    ReferenceConfig,
    relation_of_class,
    sinusoid_table,
    step_time_input,
)
from l2s.engine.backbone import CrossAttnLayer
from l2s.engine.registry import presets
from l2s.families.unet import unet_cross_attention_layers, unet_layout

pytestmark = pytest.mark.usefixtures("one_thread")


def _maps(b=2, c=12, seed=0):
    m = torch.rand(b, 2, c, 16, 16, generator=torch.Generator().manual_seed(seed))
    return m / m.sum(dim=(-1, -2), keepdim=True)


def _net_from(ckpt, n_maps):
    cfg = ckpt["config"]
    net = ReferenceClassifier(ReferenceConfig(
        n_maps=n_maps, relations=CLASSES, max_maps=ckpt["input_channels"], d_model=cfg["d_model"],
        extractor_heads=2, extractor_layers=2, extractor_ff=24, pool_heads=4, relation_heads=4,
        relation_layers=2, relation_ff=24))
    net.load_state_dict(ckpt["model_state_dict"], strict=True)
    return net.eval()


@pytest.mark.parametrize("time_input", [0, 5, 49])
def test_module_matches_torch_transformer_layers(time_input):
    # Fewer maps than the position table has rows: the first C rows are used.
    ckpt = make_checkpoint(rows=40)
    maps = _maps(c=12)
    ours = _net_from(ckpt, 12)(maps, torch.tensor([time_input, time_input]))
    torch.testing.assert_close(ours, torch_reference_logits(ckpt, maps, time_input),
                               rtol=1e-5, atol=1e-5)


def test_parameter_names_shapes_and_count_at_published_sd_sizes():
    cfg = ReferenceConfig(n_maps=195, relations=CLASSES, max_maps=1368)
    net = ReferenceClassifier(cfg)
    state = net.state_dict()
    assert state["object_extractor.positional_encoding.pe"].shape == (1, 1368, 256)
    assert state["relation_classifier.positional_encoding.pe"].shape == (1, 256, 256)
    assert state["object_extractor.timestep_embedding.weight"].shape == (50, 256)
    assert state["relation_classifier.timestep_embedding.weight"].shape == (50, 16)
    assert state["object_extractor.layer_attention.in_proj_weight"].shape == (768, 256)
    assert state["relation_classifier.fc.0.weight"].shape == (256, 272)
    assert {k.split(".")[2] for k in state if k.startswith("relation_classifier.fc.")} \
        == {"0", "1", "4", "5", "8"}
    assert "object_extractor.transformer.layers.1.self_attn.in_proj_bias" in state
    assert 1.8e6 < num_parameters(net) < 2.2e6  # "~2M parameters for SD"
    torch.testing.assert_close(state["object_extractor.positional_encoding.pe"],
                               sinusoid_table(1368, 256))


def test_gradient_reaches_the_maps_and_config_round_trips():
    cfg = ReferenceConfig(n_maps=12, relations=CLASSES, max_maps=40, d_model=32,
                          extractor_ff=24, relation_ff=24, pool_heads=4)
    assert ReferenceConfig.from_dict(cfg.to_dict()) == cfg
    net = ReferenceClassifier(cfg)
    maps = _maps().requires_grad_(True)
    torch.nn.functional.cross_entropy(net(maps, 5), torch.tensor([3, 4])).backward()
    assert maps.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="position table has only 40 rows"):
        ReferenceConfig(n_maps=41, relations=CLASSES, max_maps=40)


@pytest.mark.parametrize("step,expected", [(0, 5), (5, 5), (6, 10), (25, 25), (26, 49),
                                           (49, 49), (50, 0), (80, 0)])
def test_step_table_sd(step, expected):
    assert step_time_input([5, 10, 15, 20, 25, 49], step) == expected


@pytest.mark.parametrize("step,expected", [(0, 1), (1, 1), (2, 3), (3, 3), (4, 0)])
def test_step_table_schnell(step, expected):
    assert step_time_input([3, 1], step) == expected


def test_class_names_map_to_l2s_relations():
    assert [relation_of_class(c) for c in CLASSES] == ["above", "below", "is", "left of",
                                                        "right of"]


def _preset_layers(name: str) -> list[CrossAttnLayer]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # the exact architecture, no weights allocated
        unet = UNet2DConditionModel(**presets()[name].configs["unet"])
    return unet_cross_attention_layers(unet, (64, 64))


def _r(a, b):
    return list(range(a, b))


def test_permutation_sd21_base():
    unet = presets()["sd2.1-base"].configs["unet"]
    # The hub's unet/config.json: heads 5/10/20/20, 64x64 latents, no upcast (sd2.1: upcast).
    assert (unet["attention_head_dim"], unet["sample_size"]) == ([5, 10, 20, 20], 64)
    assert not unet.get("upcast_attention", False)
    assert presets()["sd2.1"].configs["unet"]["upcast_attention"] is True
    layers = _preset_layers("sd2.1-base")
    assert [la.heads for la in layers] == [5, 5, 10, 10, 20, 20, 20, 20, 20, 20, 10, 10, 10,
                                           5, 5, 5]
    order = resolution_order(layers)
    # Recorded (forward): down0 [0,10) down1 [10,30) down2 [30,70) mid [70,90) up1 [90,150)
    # up2 [150,180) up3 [180,195). Reference: 8x8 mid | 16x16 down2, up1 | 32x32 | 64x64.
    assert list(order) == (_r(70, 90) + _r(30, 70) + _r(90, 150) + _r(10, 30) + _r(150, 180)
                           + _r(0, 10) + _r(180, 195))
    assert len(order) == 195
    lay = unet_layout(layers)
    assert (lay.resize, lay.renormalise) == ("bilinear", "always")
    assert MapLayout.from_dict(lay.to_dict()) == lay


def test_permutation_sd14():
    layers = _preset_layers("sd1.4")
    assert [la.heads for la in layers] == [8] * 16
    order = resolution_order(layers)
    # down0 [0,16) down1 [16,32) down2 [32,48) mid [48,56) up1 [56,80) up2 [80,104) up3 [104,128)
    assert list(order) == (_r(48, 56) + _r(32, 48) + _r(56, 80) + _r(16, 32) + _r(80, 104)
                           + _r(0, 16) + _r(104, 128))


def test_bilinear_resize_is_the_reference_resize():
    m = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = bilinear_resize(m, 16)
    # Bilinear, align_corners False, from 64 to 16: the mean of each 4x4 block's centre 2x2.
    centre = m.reshape(3, 16, 4, 16, 4)[:, :, 1:3, :, 1:3].mean(dim=(2, 4))
    torch.testing.assert_close(out, centre / (centre.sum(dim=(-2, -1), keepdim=True) + 1e-8))
    same = torch.rand(2, 16, 16)
    torch.testing.assert_close(bilinear_resize(same, 16),
                               same / (same.sum(dim=(-2, -1), keepdim=True) + 1e-8))
    torch.testing.assert_close(bilinear_resize(same, 16, renormalise="resized"), same)


def test_tiny_config_sizes_are_consistent():
    ckpt = make_checkpoint(rows=20, config=tiny_config(d_model=32))
    assert ckpt["model_state_dict"]["object_extractor.positional_encoding.pe"].shape == (1, 20, 32)
