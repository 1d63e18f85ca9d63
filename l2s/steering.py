"""The steering loop: gradient steps on the noisy latent from a loss on attention maps.

Learn-to-Steer (Yiflach et al., WACV 2026), section 4 of docs/method: at each steered step,
forward the denoiser on the conditional branch with the latent requiring grad, read the
subject/object maps, take the loss against the wanted relation, step the latent, stop early
once the loss is under a threshold; then take the normal guided step. The :class:`Steerer`
is a step callback of the one sampling loop (``l2s.engine.sampling.denoise``) and of a stock
diffusers pipeline (``l2s.pipeline``); it never runs a denoising loop of its own.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from l2s.engine.backbone import Denoiser
from l2s.engine.hooks import AttentionRecorder
from l2s.engine.sampling import sample
from l2s.engine.tokens import triplet_tokens
from l2s.relations import Triplet

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class SteerSettings:
    """How hard and how long to steer."""

    steps: int = 50  # DDIM steps of the whole generation
    guidance: float = 7.5  # classifier-free guidance of the normal step
    steer_until: float = 0.5  # steer steps [0, this): a fraction (< 1) or a step count (>= 1)
    iterations: int = 16  # max gradient iterations per steered step
    step_size: float = 5.0  # latent update size (SGD: alpha; Adam: learning rate)
    optimizer: str = "sgd"  # "sgd" (z -= alpha grad) or "adam" (state per steered step)
    threshold_start: float = 1e-5  # early-exit loss at step 0 ...
    threshold_end: float = 7e-5  # ... rising linearly to this from step 3 on
    threshold_ramp: int = 3  # steps over which the threshold rises

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use sgd or adam")
        if self.steer_until <= 0 or self.iterations < 0:
            raise ValueError("--steer-until must be > 0 and --iterations >= 0")

    def steered_steps(self) -> int:
        n = self.steer_until * self.steps if self.steer_until < 1 else self.steer_until
        return min(self.steps, int(math.ceil(n)))

    def threshold(self, step: int) -> float:
        f = min(step / self.threshold_ramp, 1.0) if self.threshold_ramp else 1.0
        return self.threshold_start + f * (self.threshold_end - self.threshold_start)


class RelationLoss:
    """A loss on (B, 2, C, S, S) subject/object maps against wanted relations, per image."""

    name = "loss"

    def __call__(self, maps: torch.Tensor, t: int, relations: Sequence[str]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss (B,), p_target (B,)): the loss and how sure it is the relation holds."""
        raise NotImplementedError


class ClassifierLoss(RelationLoss):
    """Cross-entropy of the learned relation classifier (the L2S loss)."""

    name = "l2s"

    def __init__(self, model: torch.nn.Module, classes: Sequence[str],
                 timestep_fn: Callable[[int], int]) -> None:
        self.model, self.classes, self.timestep_fn = model, list(classes), timestep_fn
        self._targets: dict = {}

    def _target(self, relations: tuple[str, ...], device: torch.device) -> torch.Tensor:
        """Class indices on the device, made once per relation list (no copy per iteration)."""
        key = (relations, device)
        if key not in self._targets:
            self._targets[key] = torch.tensor([self.classes.index(r) for r in relations],
                                              device=device)
        return self._targets[key]

    def __call__(self, maps, t, relations):
        target = self._target(tuple(relations), maps.device)
        tt = torch.full((maps.shape[0],), self.timestep_fn(t), device=maps.device)
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

    def __call__(self, maps, t, relations):
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


@dataclass
class StepRecord:
    """What one steered denoising step did (times in ms, losses averaged over images)."""

    step: int
    iterations: int = 0
    loss_before: float | None = None
    loss_after: float | None = None
    p_target: float | None = None
    forward_ms: float = 0.0
    backward_ms: float = 0.0
    update_ms: float = 0.0

    def to_json(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class SteerStats:
    """Per-step records plus counters the report needs."""

    steps: list[StepRecord] = field(default_factory=list)
    skipped_updates: int = 0  # NaN/inf gradients skipped
    warnings: list[str] = field(default_factory=list)
    # With keep_maps: (step, maps before, maps after), each (A, 2, S, S) averaged over C.
    attention: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)


class _Timer:
    """Wall time of a region: CUDA events on a GPU (read after a sync), perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list = []

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, begin) -> Callable[[], float]:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            return lambda: begin.elapsed_time(end)
        ms = (time.perf_counter() - begin) * 1000
        return lambda: ms


def object_groups(denoiser: Denoiser, prompt: str, triplets: Sequence[Triplet]
                  ) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Token groups of the distinct objects, and (subject, object) group indices per triplet."""
    groups: list[list[int]] = []
    index: dict[tuple[int, ...], int] = {}
    pairs = []
    for t in triplets:
        ids = []
        for pt in triplet_tokens(denoiser.tokenizer, prompt, t):
            if pt.indices not in index:
                index[pt.indices] = len(groups)
                groups.append(list(pt.indices))
            ids.append(index[pt.indices])
        pairs.append((ids[0], ids[1]))
    return groups, pairs


class Steerer:
    """Steering state for one batch: prompts, their triplets and token groups, the loss.

    Called with the sampling loop's step state (``denoise(..., callback=steerer)``), it
    steers the latents of the steered steps, recording attention only then, and leaves the
    other steps alone. ``update(rec, x, t, step)`` is one steered step's latent updates.
    """

    def __init__(self, denoiser: Denoiser, prompts: Sequence[str],
                 triplets: Sequence[Sequence[Triplet]], loss_fn: RelationLoss,
                 settings: SteerSettings, keep_maps: bool = False,
                 on_step: Callable[[StepRecord], None] | None = None) -> None:
        self.denoiser, self.loss_fn, self.settings = denoiser, loss_fn, settings
        self.keep_maps = keep_maps  # keep each steered step's maps before/after (for plots)
        self.on_step = on_step  # called with each steered step's record
        self.stats = SteerStats()
        self.cond = denoiser.encode_prompt(list(prompts))
        self.steerable = [[t for t in tl if t.steerable] for tl in triplets]
        self.active = [i for i, tl in enumerate(self.steerable) if tl]
        per_image = [object_groups(denoiser, p, tl) if tl else ([[0]], [])
                     for p, tl in zip(prompts, self.steerable, strict=True)]
        # The recorder needs the same number of groups per image: pad with a repeated group.
        g_max = max(len(g) for g, _ in per_image)
        self.groups = [g + [g[0]] * (g_max - len(g)) for g, _ in per_image]
        self.pairs = [p for _, p in per_image]
        self.layers = denoiser.cross_attention_layers()
        self.timer = _Timer(denoiser.device)

    @property
    def steered_steps(self) -> int:
        """How many leading steps are steered (0 when no image has a relation)."""
        return self.settings.steered_steps() if self.active and self.settings.iterations else 0

    def recorder(self) -> AttentionRecorder:
        return AttentionRecorder(self.denoiser, self.layers, self.groups, keep_grad=True)

    def __call__(self, state: dict) -> torch.Tensor | None:
        """Step callback: steered latents on the first ``steered_steps`` steps, else None."""
        step = state["step"]
        if step >= self.steered_steps:
            return None
        # The recorder is open only here: the guided step after it, and every unsteered
        # step, run all attention layers on the fused path.
        with self.recorder() as rec:
            x = self.update(rec, state["latents"], state["t"], step)
        if self.on_step:
            self.on_step(self.stats.steps[-1])
        return x

    def update(self, rec: AttentionRecorder, x: torch.Tensor, t: int, step: int
               ) -> torch.Tensor:
        """Up to `iterations` latent updates of the active images at one denoising step."""
        return _steer_step(self, rec, x, t, step)


def steer_latents(
    denoiser: Denoiser,
    prompts: Sequence[str],
    triplets: Sequence[Sequence[Triplet]],
    loss_fn: RelationLoss,
    settings: SteerSettings,
    latents: torch.Tensor,
    on_step: Callable[[StepRecord], None] | None = None,
    keep_maps: bool = False,
) -> tuple[torch.Tensor, SteerStats]:
    """Generate from ``latents`` (B, C, h, w), steering image b towards ``triplets[b]``.

    Images whose triplet list is empty are generated plainly; if no image has one, no
    gradient is ever taken. Multiple relations of one image are optimised round robin: the
    i-th iteration uses triplet i mod n (never a summed loss). Returns clean images
    (B, H, W, 3) in [0, 1] and the per-step statistics.
    """
    st = Steerer(denoiser, prompts, triplets, loss_fn, settings, keep_maps, on_step)
    images = sample(denoiser, list(prompts), steps=settings.steps, guidance=settings.guidance,
                    latents=latents, callback=st, cond=st.cond)
    return images, st.stats


def _steer_step(st: Steerer, rec: AttentionRecorder, x: torch.Tensor, t: int, step: int
                ) -> torch.Tensor:
    settings, stats, timer, active = st.settings, st.stats, st.timer, st.active
    record = StepRecord(step)
    threshold = settings.threshold(step)
    idx = torch.tensor(active, device=x.device)
    z = x[idx].detach().clone().requires_grad_(True)  # one leaf, updated in place
    c = st.cond.select(idx)
    rec.set_tokens([st.groups[i] for i in active])
    adam = torch.optim.Adam([z], lr=settings.step_size) if settings.optimizer == "adam" else None
    timings = []
    for it in range(settings.iterations):
        pick = [st.pairs[i][it % len(st.pairs[i])] for i in active]  # round robin
        rels = [st.steerable[i][it % len(st.steerable[i])].relation for i in active]
        t0 = timer.start()
        with torch.enable_grad():
            st.denoiser.predict(z, t, c, guidance=settings.guidance)
            maps = rec.stacked()  # (A, G, C, S, S)
            # Basic indexing only: a list index would be copied to the GPU (a sync) each time.
            sel = torch.stack([torch.stack((maps[a, i], maps[a, j]))
                               for a, (i, j) in enumerate(pick)])  # (A, 2, C, S, S)
            loss, p = st.loss_fn(sel, t, rels)  # (A,), (A,)
        fwd = timer.stop(t0)
        if record.loss_before is None:
            record.loss_before = loss.mean().item()
            before = sel.detach().float().mean(2).cpu() if st.keep_maps else None
        record.loss_after, record.p_target = loss.mean().item(), p.mean().item()
        after = sel.detach().float().mean(2).cpu() if st.keep_maps else None
        todo = loss.detach() > threshold
        if not bool(todo.any()):  # every image's classifier agrees: stop iterating
            timings.append((fwd, None, None))
            break
        t1 = timer.start()
        with torch.enable_grad():  # pipelines call back under no_grad
            (grad,) = torch.autograd.grad((loss * todo).sum(), z)
        bwd = timer.stop(t1)
        t2 = timer.start()
        with torch.no_grad():
            if torch.isfinite(grad).all():
                grad = grad * todo.view(-1, *[1] * (z.ndim - 1)).to(grad.dtype)
                if adam is not None:
                    z.grad = grad
                    before = z.detach().clone()
                    adam.step()
                    # Adam's momentum would keep moving images that already stopped: hold them.
                    z.copy_(torch.where(todo.view(-1, *[1] * (z.ndim - 1)), z, before))
                else:
                    z.sub_(settings.step_size * grad)
                record.iterations += 1
            else:
                stats.skipped_updates += 1
                if not stats.warnings:
                    stats.warnings.append("non-finite gradient: update skipped (counted in "
                                          "skipped_updates)")
        timings.append((fwd, bwd, timer.stop(t2)))
    if st.denoiser.device.type == "cuda":
        torch.cuda.synchronize()  # CUDA events are read only after the work finished
    record.forward_ms = sum(f() for f, _, _ in timings)
    record.backward_ms = sum(b() for _, b, _ in timings if b is not None)
    record.update_ms = sum(u() for _, _, u in timings if u is not None)
    stats.steps.append(record)
    if st.keep_maps and settings.iterations:
        stats.attention.append((step, before, after))
    x = x.detach().clone()
    x[idx] = z.detach().to(x.dtype)
    return x


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
