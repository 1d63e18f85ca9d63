"""Relation losses on recorded attention maps: what the steering loop minimises per image.

A loss takes the (B, 2, C, S, S) subject/object maps of B images and their wanted relations
and returns a loss and p(target) per image: the learned classifier's cross-entropy (the L2S
loss) or a hand-crafted centroid baseline. ``l2s.steering.loop`` steps the latent down its gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class RelationLoss:
    """A loss on (B, 2, C, S, S) subject/object maps against wanted relations, per image."""

    name = "loss"
    # How the recorder must bring maps to S x S for this loss: (maps, S) -> maps; None: the
    # recorder's own resizing (what `l2s invert` caches).
    resize: Callable[[torch.Tensor, int], torch.Tensor] | None = None

    def __call__(self, maps: torch.Tensor, t: int, relations: Sequence[str], *, step: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss (B,), p_target (B,)): the loss and how sure it is the relation holds, at
        sampling timestep ``t``, denoising step index ``step``."""
        raise NotImplementedError


class ClassifierLoss(RelationLoss):
    """Cross-entropy of the learned relation classifier (the L2S loss), over all its classes.

    ``time_fn(t, step)`` gives the network's time input; ``order`` (classifier channel c <-
    recorded channel order[c]) and ``resize`` adapt the recorded maps to the layout the
    classifier was trained on (``l2s.classifier.layout``).
    """

    name = "l2s"

    def __init__(self, model: torch.nn.Module, classes: Sequence[str],
                 time_fn: Callable[[int, int], int], *, order: Sequence[int] | None = None,
                 resize: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> None:
        self.model, self.classes, self.time_fn = model, list(classes), time_fn
        self.order = None if order is None else torch.tensor(list(order))
        self.resize = resize
        self._targets: dict = {}

    def _target(self, relations: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """Class indices on the device, made once per relation list (no copy per iteration)."""
        key = (relations, device)
        if key not in self._targets:
            self._targets[key] = torch.tensor([self.classes.index(r) for r in relations],
                                              device=device)
        return self._targets[key]

    def __call__(self, maps, t, relations, *, step):
        target = self._target(tuple(relations), maps.device)
        if self.order is not None:
            if self.order.device != maps.device:
                self.order = self.order.to(maps.device)  # once: no copy per iteration
            maps = maps.index_select(2, self.order)
        tt = torch.full((maps.shape[0],), self.time_fn(t, step), device=maps.device)
        logits = self.model(maps.float(), tt).float()
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        p = logits.softmax(-1).gather(1, target[:, None])[:, 0]
        return loss, p.detach()


class CentroidLoss(RelationLoss):
    """Hand-crafted baseline: push the attention centroids apart in the wanted direction.

    loss = relu(margin - signed centroid offset along the relation's axis), in map widths.
    """

    name = "centroid"

    def __init__(self, margin: float = 0.25) -> None:
        self.margin = margin

    def __call__(self, maps, t, relations, *, step):
        m = maps.float().mean(2)  # (B, 2, S, S): average over layers and heads
        m = m / m.sum((-2, -1), keepdim=True).clamp_min(1e-12)
        s = m.shape[-1]
        coords = (torch.arange(s, device=m.device, dtype=torch.float32) + 0.5) / s
        cx = (m.sum(-2) * coords).sum(-1)  # (B, 2)
        cy = (m.sum(-1) * coords).sum(-1)
        sign = {"left of": (cx, 1), "right of": (cx, -1), "above": (cy, 1), "below": (cy, -1)}
        gaps = torch.stack([sign[r][1] * (sign[r][0][b, 1] - sign[r][0][b, 0])
                            for b, r in enumerate(relations)])  # > 0 when the relation holds
        loss = torch.relu(self.margin - gaps)
        return loss, (gaps > 0).float()
