"""Best-of-N search: N plain candidates per image, the relation classifier as the verifier, the
most probable candidate kept.

The candidates of a batch are generated plainly (no gradient), together or in chunks of at
most ``batch_size`` (the same images: each candidate's noise depends on its seed alone).
The verifier reads the attention maps the plain pass already computes: at each step the loss
reads best (``RelationLoss.verdict_steps``: the classifier's trained timesteps) the recorder
is open during that step's guided forward and keeps the conditional branch's maps, so the search
costs N plain generations plus the classifier's forwards, and no denoiser forward of its own.
A candidate's score is its log p(every relation holds) (the classifier's probability of the
wanted class, multiplied over the image's relations) averaged over those steps; the
highest-scoring candidate is kept (the first one on a tie). The verifier is the classifier,
never a detector: a benchmark's judge stays independent of the choice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from l2s.engine.backbone import Denoiser
from l2s.engine.hooks import AttentionRecorder, token_weights
from l2s.engine.sampling import sample, seeded_latents, uses_uncond
from l2s.errors import ConfigError
from l2s.relations import Triplet
from l2s.steering import SteerError
from l2s.steering.loop import RelationPlan, SteerSettings
from l2s.steering.losses import RelationLoss

DEFAULT_CANDIDATES = 4  # best-of without a count
MAX_CANDIDATES = 1000


def check_candidates(option: str, n: object) -> int:
    """``n`` as a candidate count, or a ConfigError naming ``option`` and the fix."""
    try:
        value = int(str(n).strip()) if not isinstance(n, bool) else None
    except ValueError:
        value = None
    if value is None or str(value) != str(n).strip() or not 1 <= value <= MAX_CANDIDATES:
        raise ConfigError(f"{option}: give a whole number of candidates from 1 to "
                          f"{MAX_CANDIDATES}, not {n!r}")
    return value


def candidate_seed(seed: int, k: int) -> int:
    """The noise seed of candidate ``k`` of the image seeded ``seed``: the image's own seed for
    k = 0 (plain's image is always a candidate), else a hash of (seed, k) below 2^56. It
    depends on nothing else, so a search is the same whatever the batch size or N, and
    best-of:N's candidates are the first N of best-of:M's for M > N."""
    if k == 0:
        return int(seed)
    digest = hashlib.blake2b(f"l2s-best-of/{int(seed)}/{k}".encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big")


@dataclass
class SearchResult:
    """The kept images, every candidate, and what the verifier read of each."""

    images: torch.Tensor  # (B, H, W, 3) in [0, 1]: the kept candidate of each image
    candidates: torch.Tensor  # (B, N, H, W, 3) in [0, 1]
    seeds: list[list[int]]  # (B, N) each candidate's noise seed
    # (B, N, V) log p(every relation holds) at each verdict step (0: no steerable relation)
    log_p: torch.Tensor
    steps: list[int]  # the V denoising steps whose maps the verifier read
    chosen: list[int]  # (B,) the kept candidate of each image
    checked: list[bool]  # (B,) whether the image had a relation to verify

    @property
    def p(self) -> torch.Tensor:
        """(B, N) the verifier's probability that every relation holds (the geometric mean of
        its probabilities over the verdict steps): what the choice maximises."""
        return self.log_p.mean(-1).exp()

    def image_json(self, i: int) -> dict:
        """Image i's search: seeds, verifier probabilities, the kept candidate."""
        return {"candidates": len(self.seeds[i]), "seeds": self.seeds[i],
                "p": [round(float(v), 6) for v in self.p[i]] if self.checked[i] else None,
                "chosen": self.chosen[i], "verdict_steps": self.steps,
                # (N, V) p at each verdict step, for studies of which steps to trust
                "p_steps": [[round(float(v), 6) for v in row] for row in self.log_p[i].exp()]
                if self.checked[i] else None}


class _Verifier:
    """Step callback of the plain pass: the recorder is open during the guided forward of each
    verdict step only, and the conditional branch's maps of that forward are scored at the next
    callback (or by ``collect`` after the last step). It never forwards the denoiser itself."""

    def __init__(self, denoiser: Denoiser, plan: RelationPlan, loss: RelationLoss,
                 steps: list[int]) -> None:
        self.denoiser, self.plan, self.loss, self.steps = denoiser, plan, loss, steps
        self.rows = len(plan.groups)
        self.active = plan.active
        self.log_p = torch.zeros(self.rows, len(steps))  # (R, V)
        self._pending: tuple[AttentionRecorder, int, float] | None = None
        self._weights: torch.Tensor | None = None

    def __call__(self, state: dict) -> None:
        self.collect()
        if state["step"] not in self.steps or not self.active:
            return None
        if self._weights is None:
            w = token_weights(self.plan.groups, state["cond"]["states"].shape[1])  # (R, T, G)
            if uses_uncond(self.denoiser, state["guidance"]):  # a CFG batch: [uncond, cond]
                w = torch.cat([w, w])
            self._weights = w.to(self.denoiser.device)
        rec = AttentionRecorder(self.denoiser, self.denoiser.cross_attention_layers(),
                                self.plan.groups, resize=self.loss.resize)
        rec.__enter__()
        rec.set_weights(self._weights)
        self._pending = (rec, state["step"], state["t"])
        return None

    def collect(self) -> None:
        """Score the maps of the forward the recorder was open for, and close it."""
        if self._pending is None:
            return
        rec, step, t = self._pending
        self._pending = None
        try:
            maps = rec.stacked()[-self.rows:]  # (R, G, C, S, S): the conditional branch
        finally:
            rec.__exit__(None, None, None)
        idx = torch.tensor(self.active, device=maps.device)
        s = self.plan.score(self.loss, maps[idx], self.active, t, step)
        per_image = torch.zeros(len(self.active)).index_add_(
            0, torch.tensor(s.rows), s.loss.detach().float().cpu())  # sum of -log p over relations
        self.log_p[self.active, self.steps.index(step)] = -per_image

    def close(self) -> None:
        """Restore the processors of a recorder still open (a generation that failed)."""
        if self._pending is not None:
            self._pending[0].__exit__(None, None, None)
            self._pending = None


def best_of(denoiser: Denoiser, prompts: Sequence[str], triplets: Sequence[Sequence[Triplet]],
            seeds: Sequence[int], candidates: int, settings: SteerSettings, loss: RelationLoss,
            batch_size: int | None = None) -> SearchResult:
    """For each prompt (seeded ``seeds[i]``), ``candidates`` plain images from the seeds
    ``candidate_seed(seeds[i], k)``, generated at most ``batch_size`` at a time (None: all
    B x N in one batch), and the one the verifier (``loss`` on the maps of the plain pass)
    finds most likely to show ``triplets[i]``'s steerable relations. Images without one keep
    candidate 0 (their plain image)."""
    n = check_candidates("--candidates", candidates)
    b = len(prompts)
    rows = [i for i in range(b) for _ in range(n)]  # image-major, candidate minor
    all_seeds = [[candidate_seed(s, k) for k in range(n)] for s in seeds]
    flat_seeds = [s for per in all_seeds for s in per]
    relations = [[t for t in triplets[i] if t.steerable] for i in rows]
    steps = denoiser.timesteps(settings.steps)
    verdict = loss.verdict_steps(steps)
    encoded = denoiser.encode_prompt(list(prompts))
    size = len(rows) if batch_size is None else max(1, int(batch_size))
    images, log_p = [], []
    for lo in range(0, len(rows), size):
        part = rows[lo:lo + size]
        plan = RelationPlan.build(denoiser.tokenizer, [prompts[i] for i in part],
                                  relations[lo:lo + size])
        verifier = _Verifier(denoiser, plan, loss, verdict)
        try:
            images.append(sample(denoiser, [prompts[i] for i in part], steps=settings.steps,
                                 guidance=settings.guidance,
                                 latents=seeded_latents(denoiser, flat_seeds[lo:lo + size]),
                                 callback=verifier,
                                 cond=encoded.select(torch.tensor(part, device=denoiser.device))))
            verifier.collect()  # the last step's forward, when it is a verdict step
        except torch.OutOfMemoryError as e:
            raise SteerError(f"out of GPU memory generating {len(part)} candidates in one batch: "
                             "lower --num-images (steer) or --batch-size (bench), or the "
                             "candidate count") from e
        finally:
            verifier.close()
        log_p.append(verifier.log_p)
    scores = torch.cat(log_p).reshape(b, n, -1)
    chosen = scores.mean(-1).argmax(1).tolist()  # the first candidate on a tie
    cands = torch.cat(images).reshape(b, n, *images[0].shape[1:])
    kept = cands[torch.arange(b, device=cands.device), torch.tensor(chosen, device=cands.device)]
    return SearchResult(kept, cands, all_seeds, scores, verdict, chosen,
                        [bool(relations[i * n]) for i in range(b)])
