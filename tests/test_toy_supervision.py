"""Attention supervision targets and loss for the toy model."""

import numpy as np
import torch

from l2s.engine.tokenizers import build_clip_tokenizer
from l2s.toy.scenes import VOCABULARY, layout_scene
from l2s.toy.supervision import MAX_OBJECTS, attention_loss, object_targets


def test_targets_follow_the_named_objects_masks():
    tok = build_clip_tokenizer(VOCABULARY, model_max_length=20)
    scene = layout_scene([("circle", (2, 2, 12, 12)), ("square", (20, 20, 30, 30))], 32)
    groups, tgt, valid = object_targets(tok, ["a circle and a square", ""], [scene, scene])
    assert tgt.shape == (2, MAX_OBJECTS, 16, 16) and valid.tolist()[0][:3] == [1, 1, 0]
    assert valid[1].sum() == 0  # an empty (unconditional) caption supervises nothing
    assert groups[0][0] == [2] and groups[0][1] == [5]
    torch.testing.assert_close(tgt[0, :2].sum((-2, -1)), torch.ones(2))
    # The circle's mass sits top-left, the square's bottom-right.
    ys, xs = np.nonzero(tgt[0, 0].numpy())
    assert xs.max() < 8 and ys.max() < 8
    ys, xs = np.nonzero(tgt[0, 1].numpy())
    assert xs.min() >= 8 and ys.min() >= 8


def test_loss_is_lowest_when_maps_match_targets():
    tgt = torch.zeros(1, 2, 4, 4)
    tgt[0, 0, 0, 0] = tgt[0, 1, 3, 3] = 1
    valid = torch.tensor([[1.0, 1.0]])
    good = tgt[:, :, None].repeat(1, 1, 3, 1, 1) * 0.9 + 0.1 / 16
    uniform = torch.full((1, 2, 3, 4, 4), 1 / 16)
    swapped = good.flip(1)
    assert attention_loss(good, tgt, valid) < attention_loss(uniform, tgt, valid) \
        < attention_loss(swapped, tgt, valid)
    assert attention_loss(swapped, tgt, torch.zeros(1, 2)) == 0
