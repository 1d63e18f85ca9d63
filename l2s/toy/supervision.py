"""Attention supervision for the toy model: each object word's cross-attention map -> its mask.

Why: large text-to-image models learn cross-attention maps that sit on the objects their words
name, and Learn-to-Steer reads and moves exactly those maps. A 2M-parameter model trained for
an hour does not: it passes the caption to every pixel with near-uniform attention (measured:
subject/object map centroids agreed with the layout in 0% of noised two-object scenes) and
places objects with its convolutions. A small cross-entropy between each object word's map and
the object's pixel mask, added to the diffusion loss during (fine-)training, gives the toy the
localised attention of its large counterparts (100% agreement after 100 steps at weight 0.02),
so the toy world exercises the method honestly. Only attention placement is supervised; which
objects to draw and where still come from the diffusion loss alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from l2s.engine.tokens import TokenAlignmentError, phrase_tokens
from l2s.toy.scenes import Scene, shape_mask

MAX_OBJECTS = 5  # scenes hold 2-5 objects; groups are padded to this many


@functools.lru_cache(maxsize=1 << 16)
def _object_tokens(tokenizer, caption: str, name: str) -> tuple[int, ...] | None:
    # Cached: tokenizing is most of a batch's cost and training captions repeat.
    try:
        return phrase_tokens(tokenizer, caption, name).indices
    except TokenAlignmentError:  # not named in this caption
        return None


def object_targets(tokenizer, captions: Sequence[str], scenes: Sequence[Scene],
                   map_size: int = 16) -> tuple[list[list[list[int]]], torch.Tensor, torch.Tensor]:
    """Token groups (B, MAX_OBJECTS, n), target maps (B, MAX_OBJECTS, S, S) summing to 1, and a
    validity mask (B, MAX_OBJECTS) for the objects each caption names (empty captions: none)."""
    groups, targets, valid = [], [], []
    for caption, scene in zip(captions, scenes, strict=True):
        h, w = scene.image.shape[:2]
        g, t = [], []
        for obj in scene.objects if caption else ():
            tokens = _object_tokens(tokenizer, caption, obj.category)
            if tokens is None:
                continue
            m = np.zeros((h, w), np.float32)
            x1, y1, x2, y2 = obj.box
            m[y1:y2, x1:x2] = shape_mask(obj.category, x2 - x1, y2 - y1)
            g.append(list(tokens))
            t.append(m)
        n = len(g)
        valid.append([1.0] * n + [0.0] * (MAX_OBJECTS - n))
        groups.append(g + [[0]] * (MAX_OBJECTS - n))  # padding: BOS, masked out below
        targets.append(np.stack(t + [np.zeros((h, w), np.float32)] * (MAX_OBJECTS - n)))
    tgt = F.adaptive_avg_pool2d(torch.from_numpy(np.stack(targets)), map_size)
    tgt = tgt / tgt.sum((-2, -1), keepdim=True).clamp_min(1e-8)
    return groups, tgt, torch.tensor(valid)


def attention_loss(maps: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
                   ) -> torch.Tensor:
    """Mean cross-entropy H(target, map) over valid objects, layers and heads.

    maps (B, G, C, S, S) each summing to 1 (AttentionRecorder.stacked), targets (B, G, S, S),
    valid (B, G).
    """
    ce = -(targets[:, :, None] * (maps.float() + 1e-6).log()).sum((-2, -1)).mean(2)  # (B, G)
    return (ce * valid).sum() / valid.sum().clamp_min(1)
