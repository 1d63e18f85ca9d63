"""Relation losses on recorded attention maps: what the steering loop minimises per image,
and a registry of them by name (``--method``).

A loss takes the (B, 2, C, S, S) subject/object maps of B images and their wanted relations
and returns a loss and p(target) per image: the learned classifier's cross-entropy (the L2S
loss) or a hand-crafted centroid baseline. ``l2s.steering.loop`` steps the latent down its
gradient. A plugin adds a loss with ``register_loss``, from a module named by an
``l2s.losses`` entry point:

    from l2s.steering.losses import CentroidLoss, register_loss

    @register_loss("wide-centroid")
    def wide_centroid(request):  # a LossRequest: the backbone, the model name, --classifier
        return CentroidLoss(margin=0.4)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from l2s.engine.backbone import BackboneError, Denoiser
from l2s.engine.registry import Registry
from l2s.steering import SteerError


class RelationLoss:
    """A loss on (B, 2, C, S, S) subject/object maps against wanted relations, per image."""

    name = "loss"
    source: str | None = None  # where its weights came from (a classifier card), for reports
    # How the recorder must bring maps to S x S for this loss: (maps, S) -> maps; None: the
    # recorder's own resizing (what `l2s invert` caches).
    resize: Callable[[torch.Tensor, int], torch.Tensor] | None = None

    def __call__(self, maps: torch.Tensor, t: int, relations: Sequence[str], *, step: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss (B,), p_target (B,)): the loss and how sure it is the relation holds, at
        sampling timestep ``t``, denoising step index ``step``."""
        raise NotImplementedError

    def verdict_steps(self, timesteps: Sequence[float]) -> list[int]:
        """The denoising steps (indices into the schedule ``timesteps``) whose maps this loss
        reads best, for a verdict on a finished generation (``l2s.steering.search``): here the
        last step."""
        return [len(timesteps) - 1]


class ClassifierLoss(RelationLoss):
    """Cross-entropy of the learned relation classifier (the L2S loss), over all its classes.

    ``time_fn(t, step)`` gives the network's time input; ``order`` (classifier channel c <-
    recorded channel order[c]) and ``resize`` adapt the recorded maps to the layout the
    classifier was trained on (``l2s.classifier.layout``). ``trained``: the card's trained
    timesteps, sampling timesteps or (``clock="step"``, an imported classifier) step indices.
    """

    name = "l2s"

    def __init__(self, model: torch.nn.Module, classes: Sequence[str],
                 time_fn: Callable[[int, int], int], *, order: Sequence[int] | None = None,
                 resize: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
                 trained: Sequence[int] = (), clock: str = "timestep") -> None:
        self.model, self.classes, self.time_fn = model, list(classes), time_fn
        self.trained, self.clock = [int(s) for s in trained], clock
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

    def verdict_steps(self, timesteps):
        """The steps the classifier was trained at: per trained timestep the step whose
        timestep is nearest (per trained step index within the schedule, for ``clock="step"``);
        the last step when the card lists none."""
        n = len(timesteps)
        if not self.trained:
            return super().verdict_steps(timesteps)
        if self.clock == "step":
            steps = {s for s in self.trained if 0 <= s < n} or {n - 1}
        else:
            ts = [float(t) for t in timesteps]
            steps = {min(range(n), key=lambda i: (abs(ts[i] - s), -i)) for s in self.trained}
        return sorted(steps)


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


@dataclass(frozen=True)
class LossRequest:
    """What a loss factory may build its loss from."""

    denoiser: Denoiser  # the backbone the loss will read the maps of
    model: str  # the preset, hub id or folder it came from
    classifier: str | None = None  # --classifier: a classifier card (None: the model's own)


LossFactory = Callable[[LossRequest], RelationLoss]
_LOSSES: Registry[LossFactory] = Registry("loss", "l2s.losses", from_worlds=False)


def register_loss(name: str) -> Callable[[LossFactory], LossFactory]:
    """Decorator adding a loss factory under ``name`` (``--method NAME``)."""
    def add(factory: LossFactory) -> LossFactory:
        _LOSSES.register(name, factory)
        return factory

    return add


def losses() -> dict[str, LossFactory]:
    """Every registered loss factory by name: the built-in ones, then the plugins'."""
    return _LOSSES.all()


def make_loss(name: str, request: LossRequest) -> RelationLoss:
    """The loss registered as ``name``, built for ``request``."""
    known = losses()
    if name not in known:
        raise SteerError(f"unknown method {name!r}: use one of {', '.join([*known, 'plain'])}")
    return known[name](request)


@register_loss("l2s")
def classifier_loss(request: LossRequest) -> ClassifierLoss:
    """The learned classifier's loss: ``request.classifier``'s card, else the model's own."""
    from l2s.classifier.layout import LayoutError, MapLayout, reference_layout
    from l2s.classifier.model import default_classifier, load_classifier, time_input
    from l2s.classifier.reference import relation_of_class

    denoiser, model = request.denoiser, request.model
    path = request.classifier or default_classifier(model, denoiser.fingerprint)
    if path is None:
        raise SteerError(
            f"no relation classifier for {model!r}: build one with `l2s invert --model {model}` "
            f"then `l2s train --model {model}`, import a published one with `l2s classifier "
            f"import FILE --model {model}`, or pass --classifier PATH "
            "(--method centroid steers with a hand-made loss instead)")
    net, card = load_classifier(path, denoiser)
    use_card_text_len(denoiser, card, path)
    layout = MapLayout.from_dict(card.get("layout"))
    try:
        mismatch = layout.name != "l2s" and reference_layout(denoiser) != layout
    except LayoutError as e:
        raise SteerError(f"classifier {path}: {e}") from e
    if mismatch:
        raise SteerError(f"classifier {path} reads maps in another channel order than "
                         f"{denoiser.name}'s layers give: re-import it with `l2s classifier "
                         f"import --model {model}`")
    # Published classifiers name classes "to the left of" ...; their extra classes ("is")
    # stay in the softmax and are never a target.
    classes = [relation_of_class(c) for c in card["classes"]]
    loss = ClassifierLoss(net, classes, time_input(card), order=layout.order,
                          resize=layout.resize_fn(), trained=card.get("timesteps", ()),
                          clock=card.get("clock", "timestep"))
    loss.source = str(path)
    return loss


@register_loss("centroid")
def centroid_loss(request: LossRequest) -> CentroidLoss:
    """The hand-made baseline: needs nothing but the maps."""
    return CentroidLoss()


def use_card_text_len(denoiser: Denoiser, card: dict, path) -> None:
    """Have the backbone encode prompts over the text length the classifier's maps were made
    with (``card["text_len"]``: 512 T5 tokens for the published Flux classifiers, even on
    flux-schnell, whose own default is 256), so every map spans the key set the classifier
    saw. Cards without one (older ones) leave the backbone's length. This is the one place a
    classifier meets the backbone before any prompt is encoded: steer, bench and speed runs
    with the l2s loss all pass here."""
    n = card.get("text_len")
    if n is None:
        return
    try:
        denoiser.set_text_len(int(n))
    except BackboneError as e:
        raise SteerError(f"classifier {path} was trained on maps over {n} text tokens, which "
                         f"this backbone cannot give: {e}. Use a classifier made for "
                         f"{denoiser.name} (`l2s invert` + `l2s train`)") from e
