"""The relation classifier: shapes, gradients to the maps, checkpoints, cards, timesteps."""

import json

import pytest
import torch

from l2s.classifier import model as cls_mod
from l2s.classifier.model import (
    ClassifierConfig,
    ClassifierError,
    ClassifierMismatchError,
    RelationClassifier,
    card_origin,
    default_classifier,
    load_classifier,
    map_moments,
    nearest_trained_timestep,
    save_classifier,
    trained_classifier_dir,
)
from l2s.relations import RELATIONS

SMALL = dict(n_maps=5, map_size=8, heads_per_layer=(2, 3), d_model=32, depth=1, head_hidden=32)


pytestmark = pytest.mark.usefixtures("one_thread")


def _maps(b=3, c=5, s=8, seed=0):
    m = torch.rand(b, 2, c, s, s, generator=torch.Generator().manual_seed(seed))
    return m / m.sum(dim=(-1, -2), keepdim=True)


def _card(**backbone):
    return {"backbone": {"name": "toy", "fingerprint": "fp0",
                         "layers": [{"name": "a", "heads": 2}, {"name": "b", "heads": 3}],
                         **backbone},
            "timesteps": [801, 401], "metrics": {"test_accuracy": 1.0}}


@pytest.mark.parametrize("tokens", ["map", "layer"])
def test_logits_shape_and_gradient_reaches_the_maps(tokens):
    torch.manual_seed(0)
    model = RelationClassifier(ClassifierConfig(**SMALL, tokens=tokens))
    maps = _maps().requires_grad_(True)
    logits = model(maps, torch.tensor([901, 501, 1]))
    assert logits.shape == (3, len(RELATIONS))
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2]))
    loss.backward()
    assert maps.grad is not None and maps.grad.shape == maps.shape
    assert torch.isfinite(maps.grad).all() and maps.grad.abs().sum() > 0


def test_fp16_maps_and_wrong_shapes():
    model = RelationClassifier(ClassifierConfig(**SMALL)).eval()
    out = model(_maps().half(), torch.tensor([5, 5, 5]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(model(_maps(), 5), out, atol=1e-3, rtol=1e-3)  # one t for all
    with pytest.raises(ValueError, match=r"maps must be \(B, 2, 5, 8, 8\)"):
        model(_maps(c=4), torch.tensor([1, 2, 3]))


def test_config_checks_and_round_trip():
    with pytest.raises(ValueError, match="sums to 4, not n_maps 5"):
        ClassifierConfig(n_maps=5, heads_per_layer=(2, 2))
    with pytest.raises(ValueError, match="needs heads_per_layer"):
        ClassifierConfig(n_maps=5, tokens="layer")
    cfg = ClassifierConfig(**SMALL, tokens="layer")
    assert ClassifierConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.n_tokens == 2


def test_map_moments_of_point_masses():
    m = torch.zeros(2, 8, 8)
    m[0, 0, 0] = 1  # top-left corner
    m[1, 7, 7] = 1  # bottom-right
    mo = map_moments(m.flatten(1), 8)
    torch.testing.assert_close(mo[:, :2], torch.tensor([[-1.0, -1.0], [1.0, 1.0]]))
    assert (mo[:, 2:] < 1e-3).all()


def test_save_load_round_trip_gives_same_logits(tmp_path):
    torch.manual_seed(1)
    model = RelationClassifier(ClassifierConfig(**SMALL)).eval()
    maps, t = _maps(), torch.tensor([801, 401, 801])
    path = save_classifier(model, _card(), tmp_path / "clf")
    assert path == tmp_path / "clf" / "card.json"
    loaded, card = load_classifier(tmp_path / "clf")
    assert not loaded.training
    torch.testing.assert_close(loaded(maps, t), model(maps, t))
    assert card["classes"] == list(RELATIONS) and card["architecture"]["n_maps"] == 5
    assert card["backbone"]["fingerprint"] == "fp0" and card["map_size"] == 8
    assert not list((tmp_path / "clf").glob(".tmp-*"))


def test_card_that_does_not_match_its_weights(tmp_path):
    path = save_classifier(RelationClassifier(ClassifierConfig(**SMALL)), _card(), tmp_path)
    card = json.loads(path.read_text())
    card["architecture"]["d_model"] = 64
    path.write_text(json.dumps(card))
    with pytest.raises(ClassifierError, match=r"card .*card.json does not match its weights: "
                                              r".*by the card's architecture"):
        load_classifier(path)
    # Weights swapped under an unchanged card.
    other = tmp_path / "other"
    save_classifier(RelationClassifier(ClassifierConfig(**{**SMALL, "d_model": 64})), _card(),
                    other)
    (tmp_path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ClassifierError, match="does not match its weights: .*sha256"):
        load_classifier(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ClassifierError, match="is missing"):
        load_classifier(tmp_path)


def test_not_a_card(tmp_path):
    with pytest.raises(ClassifierError, match="no classifier card"):
        load_classifier(tmp_path)
    (tmp_path / "card.json").write_text('{"hello": 1}')
    with pytest.raises(ClassifierError, match="is not an l2s classifier card"):
        load_classifier(tmp_path)


def test_backbone_mismatch_names_both_backbones(tmp_path):
    from l2s.families.tiny import tiny_sd

    den = tiny_sd()
    layers = [{"name": la.name, "heads": la.heads} for la in den.cross_attention_layers()]
    c = sum(la["heads"] for la in layers)
    model = RelationClassifier(ClassifierConfig(**{**SMALL, "n_maps": c,
                                                   "heads_per_layer": None}))
    foreign = save_classifier(model, _card(name="sd2.1", fingerprint="abc123", layers=layers),
                              tmp_path / "foreign")
    with pytest.raises(ClassifierMismatchError) as e:
        load_classifier(foreign, denoiser=den)
    msg = str(e.value)
    assert f"classifier {foreign} belongs to backbone sd2.1 (abc123), not tiny-sd " \
           f"({den.fingerprint})" in msg
    assert "`l2s train --model tiny-sd`" in msg
    own = save_classifier(model, _card(name="tiny-sd", fingerprint=den.fingerprint,
                                       layers=layers), tmp_path / "own")
    loaded, _ = load_classifier(own, denoiser=den)
    assert next(loaded.parameters()).device == den.device
    # Same fingerprint but another layer list is a mismatch too.
    odd = save_classifier(model, _card(name="tiny-sd", fingerprint=den.fingerprint,
                                       layers=layers[:1]), tmp_path / "odd")
    with pytest.raises(ClassifierMismatchError, match="layer list differs"):
        load_classifier(odd, denoiser=den)


@pytest.mark.parametrize(("t", "expected"), [
    (981, 881),  # before the first trained step: round forward to it
    (881, 881),  # on a trained step
    (861, 781),  # between steps: the next one in sampling order (smaller t)
    (482, 481),
    (300, 1),
    (0, 1),  # past the last trained step: the last one
    (1000, 881),
])
def test_nearest_trained_timestep(t, expected):
    trained = [881, 781, 681, 581, 481, 1]
    assert nearest_trained_timestep(trained, t) == expected
    assert nearest_trained_timestep({"timesteps": trained[::-1]}, t) == expected


def test_nearest_trained_timestep_needs_timesteps():
    with pytest.raises(ValueError, match="no trained timesteps"):
        nearest_trained_timestep({"timesteps": []}, 10)


def test_default_classifier_prefers_the_users_trained_one(tmp_path, monkeypatch):
    monkeypatch.setattr(cls_mod, "PACKAGE_CLASSIFIERS", tmp_path / "shipped")
    assert default_classifier("sd2.1") is None
    model = RelationClassifier(ClassifierConfig(**SMALL))
    shipped = save_classifier(model, _card(), tmp_path / "shipped" / "sd2.1")
    assert default_classifier("sd2.1") == shipped
    assert card_origin(shipped) == "shipped"
    trained = save_classifier(model, _card(), trained_classifier_dir("sd2.1"))
    assert default_classifier("sd2.1") == trained  # the user's own wins over the shipped one
    assert card_origin(trained) == "trained"
    assert default_classifier("sd2.1", fingerprint="fp0") == trained
    # a card of another fingerprint, or of binary bytes, is passed over
    assert default_classifier("sd2.1", fingerprint="other") is None
    trained.write_bytes(bytes(range(256)))
    assert default_classifier("sd2.1", fingerprint="fp0") == shipped
    hub = save_classifier(model, _card(), trained_classifier_dir("org/some-model"))
    assert hub.parent.name == "org_some-model"
    assert default_classifier("org/some-model") == hub


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_shipped_cards_hold_no_absolute_paths():
    """Bug caught: the shipped toy cards recorded the build machine's cache and output folders
    (data.cache_dir, training.cache_dir, training.out)."""
    import re
    from pathlib import Path

    from l2s.classifier import model as cls_mod

    cards = sorted(Path(cls_mod.PACKAGE_CLASSIFIERS).glob("*/card.json"))
    assert len(cards) >= 3
    for card in cards:
        found = [s for s in _strings(json.loads(card.read_text()))
                 if s.startswith(("/", "~")) or re.match(r"^[A-Za-z]:[\\\\/]", s)]
        assert found == [], f"{card}: {found}"
