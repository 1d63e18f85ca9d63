"""Training batches for the toy trainer: scenes, captions, noise and supervision targets.

The UNet toy draws its batches from one running random stream (``training_batch``), as it
always has. The toy-mmdit's batches are a pure function of (seed, step) (``flow_batch``): the
scenes, dropped captions, timesteps, noise and attention targets of step k never depend on
earlier steps, so worker processes can build them ahead of a fast GPU (``BatchStream``) and a
resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields

import numpy as np
import torch


class CaptionIds:
    """Token ids for captions, cached (captions repeat a lot and tokenizing is slow)."""

    def __init__(self, tokenizer):
        self.tokenizer, self._cache = tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            tok = self.tokenizer
            ids = tok(missing, padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
            self._cache.update(zip(missing, ids, strict=True))
        return torch.stack([self._cache[c] for c in captions])  # (B, T)


def training_batch(rng: np.random.Generator, gen: torch.Generator, cfg, size: int):
    """(images (B, 3, size, size) in [-1, 1], captions with ~cond_drop of them emptied,
    scenes), for a ToyTrainConfig."""
    from l2s.toy.scenes import scene_batch

    images, captions, scenes = scene_batch(rng, cfg.batch, size, cfg.relation_rate)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    drop = torch.rand(cfg.batch, generator=gen) < cfg.cond_drop
    captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
    return x.contiguous(), captions, scenes


@dataclass
class FlowBatch:
    """One toy-mmdit step's inputs; the last three only with attention supervision."""

    images: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    ids: torch.Tensor  # (B, T) caption token ids
    s: torch.Tensor  # (B,) timesteps in (0, 1)
    noise: torch.Tensor  # (B, 3, H, W)
    weights: torch.Tensor | None = None  # (B, T, G) token -> object-group averaging
    targets: torch.Tensor | None = None  # (B, G, S, S) object masks, each summing to 1
    valid: torch.Tensor | None = None  # (B, G) which groups are real objects

    def to(self, device) -> FlowBatch:
        return FlowBatch(**{f.name: None if getattr(self, f.name) is None
                            else getattr(self, f.name).to(device) for f in fields(self)})


@functools.lru_cache(maxsize=4)
def _caption_ids(max_tokens: int) -> CaptionIds:
    from l2s.toy.model import ToyModelConfig, build_toy_tokenizer

    return CaptionIds(build_toy_tokenizer(ToyModelConfig(max_tokens=max_tokens)))


def flow_batch(cfg, step: int) -> FlowBatch:
    """The toy-mmdit batch of `step`: a pure function of (cfg, step)."""
    from l2s.engine.hooks import token_weights
    from l2s.toy.losses import sample_timesteps
    from l2s.toy.mmdit import PATCH
    from l2s.toy.supervision import object_targets

    rng = np.random.default_rng([cfg.seed, step])
    gen = torch.Generator().manual_seed(cfg.seed * 2**32 + step)
    size = cfg.mmdit.image_size
    images, captions, scenes = training_batch(rng, gen, cfg, size)
    s = sample_timesteps(cfg.mmdit, cfg.batch, gen)
    noise = torch.randn(images.shape, generator=gen)
    ids = _caption_ids(cfg.mmdit.max_tokens)
    batch = FlowBatch(images, ids(captions), s, noise)
    if cfg.attention_weight > 0:
        groups, batch.targets, batch.valid = object_targets(
            ids.tokenizer, captions, scenes, map_size=size // PATCH)
        batch.weights = token_weights(groups, batch.ids.shape[1])
    return batch


def _worker_init() -> None:
    torch.set_num_threads(1)


def _numpy_batch(cfg, step: int) -> dict:
    # Plain arrays cross the process boundary (torch would pass one shared-memory file each).
    b = flow_batch(cfg, step)
    return {f.name: None if getattr(b, f.name) is None else getattr(b, f.name).numpy()
            for f in fields(b)}


class BatchStream:
    """``flow_batch`` for steps start, start+1, ...: inline, or built ahead by worker processes."""

    def __init__(self, cfg, start: int, workers: int = 0, ahead: int | None = None) -> None:
        self.cfg, self.next = cfg, start
        self.ahead = ahead or 2 * workers
        self.pending: deque = deque()
        self.pool = None
        if workers > 0:
            import multiprocessing

            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(
                "spawn"), initializer=_worker_init)

    def get(self, step: int) -> FlowBatch:
        if self.pool is None:
            return flow_batch(self.cfg, step)
        if self.pending and self.pending[0][0] != step:  # out of order: start over
            self.pending.clear()
        if not self.pending:
            self.next = step
        while len(self.pending) < self.ahead:
            self.pending.append((self.next, self.pool.submit(_numpy_batch, self.cfg, self.next)))
            self.next += 1
        arrays = self.pending.popleft()[1].result()
        return FlowBatch(**{k: None if v is None else torch.from_numpy(v)
                            for k, v in arrays.items()})

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
