"""The steering loop: gradient steps on the noisy latent from a loss on attention maps.

Learn-to-Steer (Yiflach et al., WACV 2026): at each steered step,
forward the denoiser on the conditional branch with the latent requiring grad, read the
subject/object maps, take the loss against the wanted relation, step the latent, stop early
once the loss is under a threshold; then take the normal guided step. The :class:`Steerer`
is a step callback of the one sampling loop (``l2s.engine.sampling.denoise``) and of a stock
diffusers pipeline (``l2s.steering.pipeline``); it never runs a denoising loop of its own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from l2s.engine.backbone import Conditioning, Denoiser
from l2s.engine.compiled import check_compile_mode, compiled_maps
from l2s.engine.hooks import AttentionRecorder, token_weights
from l2s.engine.registry import SteerDefaults
from l2s.engine.sampling import sample
from l2s.engine.timing import RegionTimer
from l2s.engine.tokens import triplet_tokens
from l2s.errors import ConfigError
from l2s.relations import Triplet
from l2s.steering import SteerError
from l2s.steering.losses import RelationLoss
from l2s.steering.optimizers import LatentOptimizer, optimizers

# How the iterations of a step share an image's relations (one relation: all the same):
# "round-robin" (the paper): iteration i steers relation i mod n and the image stops once that
# one relation's loss is under the threshold; "worst": every iteration scores all relations,
# steers the one with the highest loss and stops once all are under the threshold; "sum": the
# same stop, steering the sum of the losses still over the threshold.
RELATION_SCHEDULES = ("round-robin", "worst", "sum")
THRESHOLD_RAMP = 3  # steps over which SteerSettings' early-exit threshold rises
_SD = SteerDefaults()  # the defaults of a model without a preset (l2s.engine.registry)


@dataclass(frozen=True)
class SteerSettings:
    """How hard and how long to steer (``l2s.steering.options.SteerOptions.resolve``: from a
    model's defaults and the user's values)."""

    steps: int = _SD.steps  # DDIM steps of the whole generation
    guidance: float = _SD.guidance  # classifier-free guidance of the normal step
    steer_until: float = _SD.steer_until  # steer steps [0, this): a fraction (< 1) or a count
    iterations: int = _SD.iterations  # max gradient iterations per steered step
    step_size: float = _SD.step_size  # latent update size (SGD: alpha; Adam: learning rate)
    # the update rule (l2s.steering.optimizers): "sgd" (z -= alpha grad), "adam" (state per
    # image and steered step), "normalized" (z -= alpha grad / RMS(grad) per image: a step of
    # fixed size whatever the gradient's scale) or a registered one
    optimizer: str = _SD.optimizer
    relation_schedule: str = _SD.relation_schedule  # several relations: RELATION_SCHEDULES
    # Early exit (SteerDefaults.loss_threshold None: this schedule; a number: fixed).
    threshold_start: float = 1e-5  # early-exit loss at step 0 ...
    threshold_end: float = 7e-5  # ... rising linearly to this from step THRESHOLD_RAMP on

    steer_from: int = _SD.steer_from  # first steered step: skip the noisiest steps, where the
    # classifier reads little layout (toy: 0.62 accuracy at t=899) and iterations buy little
    budget: int | None = None  # max iterations per image over the whole generation (None: no cap)
    # Stop steering forwards after the last recorded attention layer: the rest of the network
    # cannot change the maps the loss reads, so skipping it changes nothing but the cost.
    truncate_forward: bool = True
    # torch.compile the steering forward (l2s.engine.compiled.COMPILE_MODES; "off": eager)
    compile: str = "off"

    def __post_init__(self) -> None:
        if self.optimizer not in optimizers():
            raise ConfigError(f"unknown optimizer {self.optimizer!r}: use "
                              f"{', '.join(optimizers())}")
        if self.relation_schedule not in RELATION_SCHEDULES:
            raise ConfigError(f"unknown relation schedule {self.relation_schedule!r}: use "
                              f"{', '.join(RELATION_SCHEDULES)}")
        if self.steer_until <= 0 or self.iterations < 0:
            raise ConfigError("--steer-until must be > 0 and --iterations >= 0")
        check_compile_mode(self.compile)
        if self.steer_from < 0 or (self.budget is not None and self.budget < 0):
            raise ConfigError("--steer-from and --budget must be >= 0")

    @property
    def budget_or_inf(self) -> float:
        return math.inf if self.budget is None else self.budget

    def steered_steps(self) -> int:
        """The step steering ends before (steps steer_from .. this - 1 are steered)."""
        n = self.steer_until * self.steps if self.steer_until < 1 else self.steer_until
        return min(self.steps, int(math.ceil(n)))

    def steered_count(self) -> int:
        """How many steps are steered (the toys skip step 0: one fewer than steered_steps)."""
        return max(self.steered_steps() - self.steer_from, 0)

    def threshold(self, step: int) -> float:
        """The early-exit loss at denoising step ``step``."""
        f = min(step / THRESHOLD_RAMP, 1.0)
        return self.threshold_start + f * (self.threshold_end - self.threshold_start)


@dataclass
class StepRecord:
    """What one steered denoising step did (times in ms, losses averaged over images)."""

    step: int
    # the model's time at this step: the DDPM timestep, or sigma x 1000 for rectified flow
    t: float | None = None
    iterations: int = 0  # iterations that updated at least one image
    image_updates: int = 0  # latent updates summed over images (the batch's real work)
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
    skipped_updates: int = 0  # image updates skipped for a NaN/inf gradient
    warnings: list[str] = field(default_factory=list)
    # With keep_maps: (step, maps before, maps after), each (A, 2, S, S) averaged over C.
    attention: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # Per steered image (its index in the batch): whether its loss at its last steered
    # forward was at most that step's early-exit threshold (the loss's verdict on it).
    held: dict[int, bool] = field(default_factory=dict)
    # With keep_maps, per steered step: (step, its images' batch indices, and per image the
    # loss and p(target) at the step's first forward and at its last).
    curves: list[tuple[int, list[int], list[float], list[float], list[float], list[float]]] = \
        field(default_factory=list)


def object_groups(tokenizer, prompt: str, triplets: Sequence[Triplet]
                  ) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Token groups of the distinct objects, and (subject, object) group indices per triplet."""
    groups: list[list[int]] = []
    index: dict[tuple[int, ...], int] = {}
    pairs = []
    for t in triplets:
        ids = []
        for pt in triplet_tokens(tokenizer, prompt, t):
            if pt.indices not in index:
                index[pt.indices] = len(groups)
                groups.append(list(pt.indices))
            ids.append(index[pt.indices])
        pairs.append((ids[0], ids[1]))
    return groups, pairs


@dataclass(frozen=True)
class RelationScores:
    """The losses of the (image, relation) pairs one forward scored, K of them."""

    loss: torch.Tensor  # (K,) the loss of each pair (in the graph when the maps are)
    p_target: torch.Tensor  # (K,) how sure the loss is that the relation holds
    maps: torch.Tensor  # (K, 2, C, S, S) the subject and object maps it read
    rows: list[int]  # (K,) the row of the forward's maps each pair came from


@dataclass(frozen=True)
class RelationPlan:
    """Which relation of which image is steered, the token groups the recorder reads, and the
    losses of a forward's maps: what the :class:`Steerer`, ``--verify``'s classifier check and
    ``l2s speed`` share.

    Image b is steered towards ``relations[b]`` (its steerable triplets; none: it is generated
    plainly). The recorder reads token groups ``groups[b]`` of it (the distinct objects, the
    same number for every image: padded with a repeated group), and relation k reads groups
    ``pairs[b][k]`` (subject, object) of them.
    """

    relations: tuple[tuple[Triplet, ...], ...]
    groups: list[list[list[int]]]
    pairs: tuple[tuple[tuple[int, int], ...], ...]
    # "worst"/"sum": each row set's (R, n_max) index of its relations' losses, on the device,
    # built when the rows change (not at every iteration: a copy to the device)
    _tables: dict[tuple[tuple[int, ...], str], torch.Tensor] = field(
        default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, tokenizer, prompts: Sequence[str], triplets: Sequence[Sequence[Triplet]]
              ) -> RelationPlan:
        """The plan of prompts[b] steered towards the steerable ones of triplets[b]."""
        relations = tuple(tuple(t for t in tl if t.steerable) for tl in triplets)
        per_image = [object_groups(tokenizer, p, tl) if tl else ([[0]], [])
                     for p, tl in zip(prompts, relations, strict=True)]
        g_max = max(len(g) for g, _ in per_image)
        return cls(relations, [g + [g[0]] * (g_max - len(g)) for g, _ in per_image],
                   tuple(tuple(p) for _, p in per_image))

    @property
    def active(self) -> list[int]:
        """The images with a relation to steer."""
        return [b for b, rels in enumerate(self.relations) if rels]

    def reading_every_token(self, seq_len: int) -> RelationPlan:
        """The same plan with one more group per text token after the objects' groups (the
        pairs stay valid): what an attention store that keeps every token's maps records."""
        return RelationPlan(self.relations,
                            [g + [[i] for i in range(seq_len)] for g in self.groups],
                            self.pairs)

    def score(self, loss_fn: RelationLoss, maps: torch.Tensor, images: Sequence[int], t: int,
              step: int, relation: int | None = None) -> RelationScores:
        """The losses of ``maps`` (R, G, C, S, S), row a being image ``images[a]``, at sampling
        timestep ``t``, denoising step ``step``: relation ``relation`` mod n of each image (the
        round robin's pick), or every relation of each (None), in image order."""
        rows, picks, names = [], [], []  # one entry per scored (image, relation)
        for a, img in enumerate(images):
            n = len(self.pairs[img])
            for k in (range(n) if relation is None else [relation % n]):
                rows.append(a)
                picks.append(self.pairs[img][k])
                names.append(self.relations[img][k].relation)
        sel = torch.stack([torch.stack((maps[a, i], maps[a, j]))
                           for a, (i, j) in zip(rows, picks, strict=True)])  # (K, 2, C, S, S)
        loss, p = loss_fn(sel, t, names, step=step)  # (K,), (K,)
        return RelationScores(loss, p, sel, rows)

    def table(self, images: Sequence[int], device: torch.device) -> torch.Tensor:
        """(R, n_max) index of image images[a]'s relation losses in ``score(..., None)``,
        padded with K (the index of one appended pad value); made once per image list."""
        key = (tuple(images), str(device))
        if key not in self._tables:
            per_row, start = [], 0
            for img in images:
                per_row.append(list(range(start, start + len(self.pairs[img]))))
                start += len(self.pairs[img])
            n_max = max(len(ks) for ks in per_row)
            self._tables[key] = torch.tensor([ks + [start] * (n_max - len(ks)) for ks in per_row],
                                             device=device)
        return self._tables[key]


class Steerer:
    """Steering state for one batch: its relation plan, the prompts' conditioning, the loss.

    Called with the sampling loop's step state (``denoise(..., callback=steerer)``), it
    steers the latents of the steered steps, recording attention only then, and leaves the
    other steps alone. ``update(rec, x, t, step)`` is one steered step's latent updates.
    ``plan``: the relation plan to steer by (default: ``RelationPlan.build`` of the prompts).
    """

    def __init__(self, denoiser: Denoiser, prompts: Sequence[str],
                 triplets: Sequence[Sequence[Triplet]], loss_fn: RelationLoss,
                 settings: SteerSettings, keep_maps: bool = False,
                 on_step: Callable[[StepRecord], None] | None = None,
                 plan: RelationPlan | None = None) -> None:
        self.denoiser, self.loss_fn, self.settings = denoiser, loss_fn, settings
        self.keep_maps = keep_maps  # keep each steered step's maps before/after (for plots)
        self.on_step = on_step  # called with each steered step's record
        self.stats = SteerStats()
        self.cond = denoiser.encode_prompt(list(prompts))
        self.plan = plan or RelationPlan.build(denoiser.tokenizer, prompts, triplets)
        self.active = self.plan.active
        self.layers = denoiser.cross_attention_layers()
        self.timer = RegionTimer(denoiser.device)
        self.spent = [0] * len(self.plan.groups)  # iterations each image has used (budget)
        self._weights: torch.Tensor | None = None
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}

    def index(self, positions: Sequence[int]) -> torch.Tensor:
        """``positions`` as an index tensor on the device, copied there once per distinct list:
        every steered step gathers the same images, and on a GPU each copy of a Python list
        waits for the device."""
        key = tuple(positions)
        if key not in self._indices:
            self._indices[key] = torch.tensor(key, dtype=torch.long, device=self.denoiser.device)
        return self._indices[key]

    def token_weights(self, rows: Sequence[int]) -> torch.Tensor:
        """The recorder's token weights (len(rows), T, G) of these images, on the device.

        Built once for the batch: each iteration only gathers the rows it forwards."""
        if self._weights is None:
            seq_len = self.cond["states"].shape[1]
            self._weights = token_weights(self.plan.groups, seq_len).to(self.denoiser.device)
        return self._weights[self.index(rows)]

    @property
    def steered_steps(self) -> int:
        """Steps before this one may be steered (0 when no image has a relation)."""
        return self.settings.steered_steps() if self.active and self.settings.iterations else 0

    def steers(self, step: int) -> bool:
        """Whether denoising step ``step`` is a steered one."""
        return self.settings.steer_from <= step < self.steered_steps

    def recorder(self) -> AttentionRecorder:
        return AttentionRecorder(self.denoiser, self.layers, self.plan.groups, keep_grad=True,
                                 resize=getattr(self.loss_fn, "resize", None))

    def forward_maps(self, rec: AttentionRecorder, z: torch.Tensor, t: int,
                     cond: Conditioning, weights: torch.Tensor) -> torch.Tensor:
        """The maps (R, G, C, S, S) of one steering forward of latents z (R, ...) with token
        weights (R, T, G): eager, or compiled at a fixed batch of every steered image."""
        s = self.settings
        if s.compile != "off":
            return compiled_maps(self.denoiser, rec, z, t, cond, weights, s.guidance,
                                 rows=len(self.active), mode=s.compile)
        rec.set_weights(weights)
        with rec.truncated() if s.truncate_forward else contextlib.nullcontext():
            self.denoiser.predict(z, t, cond, guidance=s.guidance)
        return rec.stacked()

    def __call__(self, state: dict) -> torch.Tensor | None:
        """Step callback: steered latents on the steered steps, else None."""
        step = state["step"]
        if not self.steers(step):
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
        return steer_step(self, rec, x, t, step)


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
    gradient is ever taken. Multiple relations of one image share the iterations as
    ``settings.relation_schedule`` says (the paper's round robin: the i-th iteration uses
    triplet i mod n). Returns clean images
    (B, H, W, 3) in [0, 1] and the per-step statistics.
    """
    st = Steerer(denoiser, prompts, triplets, loss_fn, settings, keep_maps, on_step)
    images = sample(denoiser, list(prompts), steps=settings.steps, guidance=settings.guidance,
                    latents=latents, callback=st, cond=st.cond)
    return images, st.stats


def generate(denoiser: Denoiser, prompts: list[str], triplets: list[list[Triplet]],
             latents: torch.Tensor, settings: SteerSettings, loss: RelationLoss | None,
             on_step=None, keep_maps: bool = False) -> tuple[torch.Tensor, SteerStats]:
    """Images (B, H, W, 3) in [0, 1]: steered with ``loss``, or plain when it is None or no
    prompt has a steerable relation (then no gradient is taken and no overhead is paid)."""
    if loss is None or not any(triplets):
        imgs = sample(denoiser, prompts, steps=settings.steps, guidance=settings.guidance,
                      latents=latents)
        return imgs, SteerStats()
    try:
        return steer_latents(denoiser, prompts, triplets, loss, settings, latents, on_step,
                             keep_maps)
    except torch.OutOfMemoryError as e:
        raise SteerError("out of GPU memory while steering: lower --num-images (images are "
                         "steered in one batch) or steer fewer steps (--steer-until)") from e


def relation_losses(st: Steerer, maps: torch.Tensor, images: Sequence[int], it: int, t: int,
                    step: int, threshold: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss to steer, loss deciding the early exit, p(target), maps) per row of ``maps``
    (R, G, C, S, S), row a being image ``images[a]``, at iteration ``it`` of a step.

    Round robin scores relation it mod n only (both losses are its loss). "worst" and "sum"
    score every relation of the image from the same forward: the early exit reads the highest
    loss, p(target) is the least sure relation's, the maps (R, 2, C, S, S) are relation 0's.
    """
    plan, schedule = st.plan, st.settings.relation_schedule
    if schedule == "round-robin":
        s = plan.score(st.loss_fn, maps, images, t, step, relation=it)
        return s.loss, s.loss, s.p_target, s.maps
    s = plan.score(st.loss_fn, maps, images, t, step)
    idx = plan.table(images, s.loss.device)
    table = torch.cat((s.loss, s.loss.new_zeros(1)))[idx]  # (R, n_max), padded with 0 (holds)
    worst = table.max(1).values
    steer = worst if schedule == "worst" else (table * (table.detach() > threshold)).sum(1)
    p_min = torch.cat((s.p_target, s.p_target.new_ones(1)))[idx].min(1).values
    return steer, worst, p_min, s.maps[idx[:, 0]]


@dataclass
class _Step:
    """The working state of one steered step: its images' latents, which of them still
    iterate, the optimiser, and what the step's record will read (kept on the device)."""

    images: list[int]  # the images this step steers
    z: torch.Tensor  # (A, C, h, w) their current latents
    cond: Conditioning  # their prompts' conditioning
    weights: torch.Tensor  # (A, T, G) their recorder token weights, on the device
    opt: LatentOptimizer
    rows: list[int]  # positions in `images` still iterating
    ridx: torch.Tensor  # the same on the device (rebuilt when rows change)
    # Counters stay on the device until the step ends: reading them would synchronise.
    skipped: torch.Tensor
    applied: torch.Tensor
    applied_iterations: torch.Tensor
    loss_first: torch.Tensor | None = None  # (A,) each image's loss at its first forward
    loss_last: torch.Tensor | None = None  # (A,) ... at its last
    p_first: torch.Tensor | None = None
    p_last: torch.Tensor | None = None
    maps_before: torch.Tensor | None = None  # with keep_maps: (A, 2, S, S), first and last
    maps_last: torch.Tensor | None = None
    timings: list = field(default_factory=list)  # (forward, backward, update) per iteration


def select_images(st: Steerer) -> list[int]:
    """The images a steered step steers: those with a relation and budget left."""
    return [i for i in st.active if st.spent[i] < st.settings.budget_or_inf]


def _start(st: Steerer, x: torch.Tensor, images: list[int]) -> _Step:
    idx = st.index(images)
    z = x[idx].detach().clone()
    zero = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(3)]
    return _Step(images, z, st.cond.select(idx), st.token_weights(images),
                 optimizers()[st.settings.optimizer](st.settings.step_size, z),
                 list(range(len(images))),
                 torch.arange(len(images), device=x.device), *zero)


def score(st: Steerer, rec: AttentionRecorder, s: _Step, z: torch.Tensor, it: int, t: int,
          step: int, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of the rows still iterating (latents z, requiring grad): (loss to steer,
    loss deciding the early exit), each (R,); notes the losses, p(target) and maps."""
    maps = st.forward_maps(rec, z, t, s.cond.select(s.ridx), s.weights[s.ridx])
    steer, loss, p, sel = relation_losses(st, maps, [s.images[r] for r in s.rows], it, t,
                                          step, threshold)
    if s.loss_first is None:
        s.loss_first = loss.detach().float()
        s.p_first = p.detach().float()
        s.loss_last, s.p_last = s.loss_first.clone(), s.p_first.clone()
        if st.keep_maps:
            s.maps_before = sel.detach().float().mean(2).cpu()
            s.maps_last = s.maps_before.clone()
    else:
        s.loss_last[s.ridx] = loss.detach().float()
        s.p_last[s.ridx] = p.detach().float()
        if st.keep_maps:
            s.maps_last[s.rows] = sel.detach().float().mean(2).cpu()
    return steer, loss


def update(st: Steerer, s: _Step, grad: torch.Tensor, go: list[bool]) -> None:
    """Step the latents of the rows whose loss is over the threshold (``go``) down ``grad``;
    the others stop here and leave the batch. A non-finite gradient skips its image."""
    if all(go):
        g = grad.float()
    else:
        keep_rows = [k for k, gk in enumerate(go) if gk]
        g = grad[st.index(keep_rows)].float()
        s.rows = [s.rows[k] for k in keep_rows]
        s.ridx = st.index(s.rows)
    finite = torch.isfinite(g).flatten(1).all(1)  # (M,) NaN guard on the device
    g = torch.where(finite.view(-1, *[1] * (g.ndim - 1)), g, torch.zeros_like(g))
    s.skipped += (~finite).sum()
    s.applied += finite.sum()
    s.applied_iterations += finite.any()
    s.z[s.ridx] = s.opt.step(s.ridx, s.z[s.ridx].float(), g).to(s.z.dtype)
    for r in s.rows:
        st.spent[s.images[r]] += 1


def record(st: Steerer, s: _Step, rec: StepRecord) -> None:
    """Fill the step's record from its one read of the device and append it to the stats."""
    stats, n_skipped = st.stats, 0
    if s.loss_first is not None:
        # After the step's last iteration: counters, mean losses and p(target) in one copy
        # (float32: exact for the counts, and what every device has). It waits for the
        # step's work, so the timers' CUDA events are complete when they are read below.
        held = s.loss_last <= st.settings.threshold(rec.step)
        its, updates, n_skipped, l0, l1, p1, *per_image = torch.cat([torch.stack([
            v.float() for v in (s.applied_iterations, s.applied, s.skipped, s.loss_first.mean(),
                                 s.loss_last.mean(), s.p_last.mean())]), held.float()]).tolist()
        stats.held.update({i: bool(h) for i, h in zip(s.images, per_image, strict=True)})
        rec.iterations, rec.image_updates = int(its), int(updates)
        rec.loss_before, rec.loss_after, rec.p_target = l0, l1, p1
        n_skipped = int(n_skipped)
    rec.forward_ms = sum(f() for f, _, _ in s.timings)
    rec.backward_ms = sum(b() for _, b, _ in s.timings if b is not None)
    rec.update_ms = sum(u() for _, _, u in s.timings if u is not None)
    if n_skipped:
        stats.skipped_updates += n_skipped
        if not stats.warnings:
            stats.warnings.append("non-finite gradient: update skipped (counted in "
                                  "skipped_updates)")
    stats.steps.append(rec)
    if st.keep_maps and s.maps_last is not None:
        stats.attention.append((rec.step, s.maps_before, s.maps_last))
        stats.curves.append((rec.step, list(s.images), *(v.tolist() for v in (
            s.loss_first, s.loss_last, s.p_first, s.p_last))))


def steer_step(st: Steerer, rec: AttentionRecorder, x: torch.Tensor, t: int, step: int
               ) -> torch.Tensor:
    """Latent updates of one steered step, image by image: select, then score and update
    until every image is under the threshold, then record.

    Each iteration forwards only the images whose loss is still over the threshold (and whose
    budget is not spent): an image that stopped leaves the batch, so it neither moves again nor
    costs a forward. Losses, the NaN guard and the optimiser state stay on the device; the
    host reads the mask of images that go on once per iteration, and the step's counters and
    losses once at its end.
    """
    settings, timer = st.settings, st.timer
    threshold = settings.threshold(step)
    images = select_images(st)
    if not images:  # every image spent its budget
        st.stats.steps.append(StepRecord(step, t=float(t)))
        return x
    s = _start(st, x, images)
    for it in range(settings.iterations):
        left = [r for r in s.rows if st.spent[images[r]] < settings.budget_or_inf]
        if not left:
            break
        if len(left) != len(s.rows):
            s.rows, s.ridx = left, st.index(left)
        z = s.z[s.ridx].requires_grad_(True)
        t0 = timer.start()
        with torch.enable_grad():  # pipelines call back under no_grad
            steer, loss = score(st, rec, s, z, it, t, step, threshold)
        fwd = timer.stop(t0)
        todo = loss.detach() > threshold  # (R,)
        go = todo.tolist()  # the one host read of the iteration
        if not any(go):
            s.timings.append((fwd, None, None))
            break
        t1 = timer.start()
        with torch.enable_grad():
            (grad,) = torch.autograd.grad((steer * todo).sum(), z)
        bwd = timer.stop(t1)
        t2 = timer.start()
        with torch.no_grad():
            update(st, s, grad, go)
        s.timings.append((fwd, bwd, timer.stop(t2)))
    record(st, s, StepRecord(step, t=float(t)))
    x = x.detach().clone()
    x[st.index(images)] = s.z.to(x.dtype)
    return x
