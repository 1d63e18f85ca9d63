"""Steer only what fails: generate plainly, check each image, regenerate the failures steered.

What a service would do when most plain images are already right: the check is the judge of
the backbone's world where it draws one (``Denoiser.world``: the toy's colour detector with
GenEval's position rule), else the relation classifier's verdict on the maps of the plain pass (one
truncated, gradient-free forward at the last steered step). Failing images are generated
again from the same seed with steering; passing ones keep their plain pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from l2s.engine.backbone import Denoiser
from l2s.engine.sampling import sample, to_uint8
from l2s.relations import Triplet
from l2s.steering.loop import Steerer, SteerSettings, SteerStats, generate
from l2s.steering.losses import RelationLoss

# images (B, H, W, 3) in [0, 1] -> whether each shows its prompt's relations
Check = Callable[[torch.Tensor], list[bool]]


@dataclass
class Verified:
    """The images, which ones passed plainly, and what steering the rest took."""

    images: torch.Tensor  # (B, H, W, 3) in [0, 1]
    passed_plain: list[bool]  # per image: the plain image passed the check
    checked_by: str  # "detector" or "classifier"
    stats: SteerStats = field(default_factory=SteerStats)  # of the steered regeneration

    def to_json(self) -> dict:
        return {"checked_by": self.checked_by, "passed_plain": self.passed_plain,
                "steered": sum(not p for p in self.passed_plain)}


def detector_check(denoiser: Denoiser, triplets: Sequence[Sequence[Triplet]]) -> Check | None:
    """The judge of the backbone's world (``Denoiser.world``), None when it draws none."""
    world = denoiser.world
    if world is None:
        return None

    def check(images: torch.Tensor) -> list[bool]:
        return world.judge(to_uint8(images), triplets)

    return check


class _ClassifierProbe:
    """Step callback of the plain pass: at ``step``, the loss's verdict on every relation of
    every image from one truncated, gradient-free forward (``RelationPlan.score``): an image
    passes when each of its relations' loss is at most the step's early-exit threshold."""

    def __init__(self, steerer: Steerer, step: int) -> None:
        self.st, self.step = steerer, step
        self.passed = [True] * len(steerer.plan.relations)

    def __call__(self, state: dict) -> None:
        st, plan = self.st, self.st.plan
        active = plan.active
        if state["step"] != self.step or not active:
            return None
        aidx = st.index(active)
        with torch.no_grad(), st.recorder() as rec, rec.truncated():
            rec.set_weights(st.token_weights(active))
            st.denoiser.predict(state["latents"][aidx], state["t"], st.cond.select(aidx),
                                guidance=st.settings.guidance)
        with torch.no_grad():
            scores = plan.score(st.loss_fn, rec.stacked(), active, state["t"], self.step)
        held = (scores.loss <= st.settings.threshold(self.step)).tolist()
        for a, ok in zip(scores.rows, held, strict=True):
            self.passed[active[a]] = self.passed[active[a]] and ok
        return None


def classifier_probe(denoiser: Denoiser, prompts: list[str], triplets: list[list[Triplet]],
                     loss: RelationLoss, settings: SteerSettings) -> _ClassifierProbe:
    """A step callback for a plain pass of these prompts: its ``passed`` ends as the loss's
    verdict on each image at the last steered step (the check of --verify without a world)."""
    return _ClassifierProbe(Steerer(denoiser, prompts, triplets, loss, settings),
                            max(settings.steered_steps() - 1, settings.steer_from))


def generate_verified(denoiser: Denoiser, prompts: list[str], triplets: list[list[Triplet]],
                      latents: torch.Tensor, settings: SteerSettings, loss: RelationLoss,
                      check: Check | None = None, keep_maps: bool = False) -> Verified:
    """Plain images for every prompt; those failing ``check`` (default: the backbone's
    detector, else the classifier on the plain pass) regenerated steered from their seeds.
    ``keep_maps``: the stats keep the steered images' maps (``SteerStats.attention``, in the
    order of the failing images)."""
    check = check or detector_check(denoiser, triplets)
    probe = None if check is not None else \
        classifier_probe(denoiser, prompts, triplets, loss, settings)
    with torch.no_grad():
        images = sample(denoiser, prompts, steps=settings.steps, guidance=settings.guidance,
                        latents=latents, callback=probe)
    passed = check(images) if check is not None else probe.passed
    # Images without a steerable relation pass: steering would not touch them.
    passed = [ok or not any(t.steerable for t in ts) for ok, ts in
              zip(passed, triplets, strict=True)]
    out = Verified(images, passed, "detector" if probe is None else "classifier")
    redo = [i for i, ok in enumerate(passed) if not ok]
    if redo:
        steered, out.stats = generate(denoiser, [prompts[i] for i in redo],
                                      [triplets[i] for i in redo], latents[redo], settings,
                                      loss, keep_maps=keep_maps)
        images = images.clone()
        images[torch.tensor(redo, device=images.device)] = steered.to(images.dtype)
        out.images = images
    return out
