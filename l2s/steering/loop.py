"""The steering loop: gradient steps on the noisy latent from a loss on attention maps.

Learn-to-Steer (Yiflach et al., WACV 2026), section 4 of docs/method: at each steered step,
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
from l2s.relations import Triplet
from l2s.steering.losses import RelationLoss

OPTIMIZERS = ("sgd", "adam", "normalized")
# How the iterations of a step share an image's relations (one relation: all the same):
# "round-robin" (method.md): iteration i steers relation i mod n and the image stops once that
# one relation's loss is under the threshold; "worst": every iteration scores all relations,
# steers the one with the highest loss and stops once all are under the threshold; "sum": the
# same stop, steering the sum of the losses still over the threshold.
RELATION_SCHEDULES = ("round-robin", "worst", "sum")
_SD = SteerDefaults()  # the defaults of a model without a preset (l2s.engine.registry)


@dataclass(frozen=True)
class SteerSettings:
    """How hard and how long to steer (``l2s.steering.job.steer_settings``: from a model's
    defaults and the user's values)."""

    steps: int = _SD.steps  # DDIM steps of the whole generation
    guidance: float = _SD.guidance  # classifier-free guidance of the normal step
    steer_until: float = _SD.steer_until  # steer steps [0, this): a fraction (< 1) or a count
    iterations: int = _SD.iterations  # max gradient iterations per steered step
    step_size: float = _SD.step_size  # latent update size (SGD: alpha; Adam: learning rate)
    # "sgd" (z -= alpha grad), "adam" (state per image and steered step) or "normalized"
    # (z -= alpha grad / RMS(grad) per image: a step of fixed size whatever the gradient's scale)
    optimizer: str = _SD.optimizer
    relation_schedule: str = _SD.relation_schedule  # several relations: RELATION_SCHEDULES
    # Early exit (SteerDefaults.loss_threshold None: this schedule; a number: fixed).
    threshold_start: float = 1e-5  # early-exit loss at step 0 ...
    threshold_end: float = 7e-5  # ... rising linearly to this from step 3 on
    threshold_ramp: int = 3  # steps over which the threshold rises

    steer_from: int = _SD.steer_from  # first steered step: skip the noisiest steps, where the
    # classifier reads little layout (toy: 0.62 accuracy at t=899) and iterations buy little
    budget: int | None = None  # max iterations per image over the whole generation (None: no cap)
    max_update: float | None = None  # cap on one update's RMS per latent element (None: no cap)
    keep_norm: bool = False  # rescale each updated latent to its norm before the steered step
    # Stop steering forwards after the last recorded attention layer: the rest of the network
    # cannot change the maps the loss reads, so skipping it changes nothing but the cost.
    truncate_forward: bool = True
    # torch.compile the steering forward (l2s.engine.compiled.COMPILE_MODES; "off": eager)
    compile: str = "off"

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: use "
                             f"{', '.join(OPTIMIZERS)}")
        if self.relation_schedule not in RELATION_SCHEDULES:
            raise ValueError(f"unknown relation schedule {self.relation_schedule!r}: use "
                             f"{', '.join(RELATION_SCHEDULES)}")
        if self.steer_until <= 0 or self.iterations < 0:
            raise ValueError("--steer-until must be > 0 and --iterations >= 0")
        check_compile_mode(self.compile)
        if self.steer_from < 0 or (self.budget is not None and self.budget < 0):
            raise ValueError("--steer-from and --budget must be >= 0")

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
        f = min(step / self.threshold_ramp, 1.0) if self.threshold_ramp else 1.0
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


def _norms(z: torch.Tensor) -> torch.Tensor:
    """Per-image L2 norm of a latent batch (B, ...) -> (B,)."""
    return z.float().flatten(1).norm(dim=1)


class _Optimizer:
    """The latent update of one steered step, per image (rows of the step's latent batch).

    Adam's moments live per image and restart at every steered step; an image that stopped
    is never passed again, so its latent and its state stay where they were.
    """

    def __init__(self, settings: SteerSettings, z: torch.Tensor) -> None:
        self.s = settings
        if settings.optimizer == "adam":
            self.m = torch.zeros_like(z, dtype=torch.float32)
            self.v = torch.zeros_like(z, dtype=torch.float32)
            self.n = torch.zeros(z.shape[0], device=z.device)

    def step(self, rows: torch.Tensor, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """New latents of ``rows`` (M,) from their latents z and gradients g (M, ...)."""
        s, shape = self.s, (-1, *[1] * (g.ndim - 1))
        if s.optimizer == "sgd":
            delta = s.step_size * g
        elif s.optimizer == "normalized":
            rms = g.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)
            delta = s.step_size * g / rms.view(shape)
        else:  # adam (Kingma & Ba, 2015), betas (0.9, 0.999)
            b1, b2 = 0.9, 0.999
            m = self.m[rows] * b1 + (1 - b1) * g
            v = self.v[rows] * b2 + (1 - b2) * g * g
            n = self.n[rows] + 1
            self.m[rows], self.v[rows], self.n[rows] = m, v, n
            mh = m / (1 - b1**n).view(shape)
            vh = v / (1 - b2**n).view(shape)
            delta = s.step_size * mh / (vh.sqrt() + 1e-8)
        if s.max_update is not None:
            rms = delta.flatten(1).pow(2).mean(1).sqrt()
            delta = delta * (s.max_update / rms.clamp_min(1e-12)).clamp(max=1.0).view(shape)
        return z - delta


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
        self.timer = RegionTimer(denoiser.device)
        self.spent = [0] * len(self.groups)  # iterations each image has used (for the budget)
        self._weights: torch.Tensor | None = None
        # "worst"/"sum": each row set's (R, n_max) index of its relations' losses, on the
        # device, built when the rows change (not at every iteration: a copy to the device)
        self._loss_tables: dict[tuple[int, ...], torch.Tensor] = {}
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
            self._weights = token_weights(self.groups, seq_len).to(self.denoiser.device)
        return self._weights[self.index(rows)]

    @property
    def steered_steps(self) -> int:
        """Steps before this one may be steered (0 when no image has a relation)."""
        return self.settings.steered_steps() if self.active and self.settings.iterations else 0

    def steers(self, step: int) -> bool:
        """Whether denoising step ``step`` is a steered one."""
        return self.settings.steer_from <= step < self.steered_steps

    def recorder(self) -> AttentionRecorder:
        return AttentionRecorder(self.denoiser, self.layers, self.groups, keep_grad=True,
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
    gradient is ever taken. Multiple relations of one image share the iterations as
    ``settings.relation_schedule`` says (method.md's round robin: the i-th iteration uses
    triplet i mod n). Returns clean images
    (B, H, W, 3) in [0, 1] and the per-step statistics.
    """
    st = Steerer(denoiser, prompts, triplets, loss_fn, settings, keep_maps, on_step)
    images = sample(denoiser, list(prompts), steps=settings.steps, guidance=settings.guidance,
                    latents=latents, callback=st, cond=st.cond)
    return images, st.stats


def _relation_losses(st: Steerer, maps: torch.Tensor, images: Sequence[int], it: int, t: int,
                     step: int, threshold: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss to steer, loss deciding the early exit, p(target), maps) per row of ``maps``
    (R, G, C, S, S), row a being image ``images[a]``, at iteration ``it`` of a step.

    Round robin scores relation it mod n only (both losses are its loss). "worst" and "sum"
    score every relation of the image from the same forward: the early exit reads the highest
    loss, p(target) is the least sure relation's, the maps (R, 2, C, S, S) are relation 0's.
    """
    schedule = st.settings.relation_schedule
    owner, picks, rels = [], [], []  # one entry per scored (image, relation)
    for a, img in enumerate(images):
        n = len(st.pairs[img])
        for k in ([it % n] if schedule == "round-robin" else range(n)):
            owner.append(a)
            picks.append(st.pairs[img][k])
            rels.append(st.steerable[img][k].relation)
    sel = torch.stack([torch.stack((maps[a, i], maps[a, j]))
                       for a, (i, j) in zip(owner, picks, strict=True)])  # (K, 2, C, S, S)
    loss, p = st.loss_fn(sel, t, rels, step=step)  # (K,), (K,)
    if schedule == "round-robin":
        return loss, loss, p, sel
    # (R, n_max) table of each image's relation losses, padded with a loss of 0 (holds)
    idx = st._loss_tables.get(tuple(images))
    if idx is None:
        per_row: list[list[int]] = [[] for _ in images]
        for k, a in enumerate(owner):
            per_row[a].append(k)
        n_max, pad = max(len(ks) for ks in per_row), len(owner)
        idx = torch.tensor([ks + [pad] * (n_max - len(ks)) for ks in per_row],
                           device=loss.device)
        st._loss_tables[tuple(images)] = idx
    table = torch.cat((loss, loss.new_zeros(1)))[idx]
    worst = table.max(1).values
    steer = worst if schedule == "worst" else (table * (table.detach() > threshold)).sum(1)
    p_min = torch.cat((p, p.new_ones(1)))[idx].min(1).values
    return steer, worst, p_min, sel[idx[:, 0]]


def _steer_step(st: Steerer, rec: AttentionRecorder, x: torch.Tensor, t: int, step: int
                ) -> torch.Tensor:
    """Latent updates of one steered step, image by image.

    Each iteration forwards only the images whose loss is still over the threshold (and whose
    budget is not spent): an image that stopped leaves the batch, so it neither moves again nor
    costs a forward. Losses, the NaN guard and the optimiser state stay on the device; the
    host reads the mask of images that go on once per iteration, and the step's counters and
    losses once at its end.
    """
    settings, stats, timer = st.settings, st.stats, st.timer
    record = StepRecord(step, t=float(t))
    threshold = settings.threshold(step)
    active = [i for i in st.active if st.spent[i] < settings.budget_or_inf]
    if not active:  # every image spent its budget
        stats.steps.append(record)
        return x
    dev = x.device
    n_act = len(active)
    aidx = st.index(active)
    z_all = x[aidx].detach().clone()  # (A, C, h, w) current latents
    cond = st.cond.select(aidx)
    weights = st.token_weights(active)  # (A, T, G) on the device
    norm0 = _norms(z_all) if settings.keep_norm else None
    opt = _Optimizer(settings, z_all)
    loss_first = p_last = loss_last = None
    keep = st.keep_maps
    maps_last = None
    rows = list(range(n_act))  # positions in `active` still iterating
    ridx = torch.arange(n_act, device=dev)  # the same on the device (rebuilt when rows change)
    # Counters stay on the device until the step ends: reading them would synchronise.
    skipped, applied, applied_iterations = (torch.zeros((), dtype=torch.long, device=dev)
                                            for _ in range(3))
    timings = []
    for it in range(settings.iterations):
        left = [r for r in rows if st.spent[active[r]] < settings.budget_or_inf]
        if not left:
            break
        if len(left) != len(rows):
            rows, ridx = left, st.index(left)
        z = z_all[ridx].requires_grad_(True)
        t0 = timer.start()
        with torch.enable_grad():  # pipelines call back under no_grad
            maps = st.forward_maps(rec, z, t, cond.select(ridx), weights[ridx])
            steer, loss, p, sel = _relation_losses(st, maps, [active[r] for r in rows],
                                                   it, t, step, threshold)
        fwd = timer.stop(t0)
        if loss_first is None:
            loss_first = loss.detach().float()
            loss_last, p_last = loss_first.clone(), p.detach().float().clone()
            if keep:
                before = sel.detach().float().mean(2).cpu()
                maps_last = before.clone()
        else:
            loss_last[ridx] = loss.detach().float()
            p_last[ridx] = p.detach().float()
            if keep:
                maps_last[rows] = sel.detach().float().mean(2).cpu()
        todo = loss.detach() > threshold  # (R,)
        go = todo.tolist()  # the one host read of the iteration
        if not any(go):
            timings.append((fwd, None, None))
            break
        t1 = timer.start()
        with torch.enable_grad():
            (grad,) = torch.autograd.grad((steer * todo).sum(), z)
        bwd = timer.stop(t1)
        t2 = timer.start()
        with torch.no_grad():
            if all(go):
                g = grad.float()
            else:  # the images under the threshold stop here and leave the batch
                keep_rows = [k for k, gk in enumerate(go) if gk]
                g = grad[st.index(keep_rows)].float()
                rows = [rows[k] for k in keep_rows]
                ridx = st.index(rows)
            finite = torch.isfinite(g).flatten(1).all(1)  # (M,) NaN guard on the device
            g = torch.where(finite.view(-1, *[1] * (g.ndim - 1)), g, torch.zeros_like(g))
            skipped += (~finite).sum()
            applied += finite.sum()
            applied_iterations += finite.any()
            new = opt.step(ridx, z_all[ridx].float(), g)
            if norm0 is not None:
                new = new * (norm0[ridx] / _norms(new).clamp_min(1e-12)).view(
                    -1, *[1] * (new.ndim - 1))
            z_all[ridx] = new.to(z_all.dtype)
            for r in rows:
                st.spent[active[r]] += 1
        timings.append((fwd, bwd, timer.stop(t2)))
    n_skipped = 0
    if loss_first is not None:
        # The step's one read of the device, after its last iteration: counters, mean losses
        # and p(target) in one copy (float32: exact for the counts, and what every device
        # has). It waits for the step's work, so the timers' CUDA events are complete when
        # they are read below.
        its, updates, n_skipped, l0, l1, p1 = torch.stack([
            v.float() for v in (applied_iterations, applied, skipped, loss_first.mean(),
                                 loss_last.mean(), p_last.mean())]).tolist()
        record.iterations, record.image_updates = int(its), int(updates)
        record.loss_before, record.loss_after, record.p_target = l0, l1, p1
        n_skipped = int(n_skipped)
    record.forward_ms = sum(f() for f, _, _ in timings)
    record.backward_ms = sum(b() for _, b, _ in timings if b is not None)
    record.update_ms = sum(u() for _, _, u in timings if u is not None)
    if n_skipped:
        stats.skipped_updates += n_skipped
        if not stats.warnings:
            stats.warnings.append("non-finite gradient: update skipped (counted in "
                                  "skipped_updates)")
    stats.steps.append(record)
    if keep and maps_last is not None:
        stats.attention.append((step, before, maps_last))
    x = x.detach().clone()
    x[aidx] = z_all.to(x.dtype)
    return x
