"""What each toy brings to training: one strategy per toy backbone, chosen by ``--backbone``.

The trainer (``l2s.toy.train``) owns what both toys share: the loop, optimizer, EMA,
checkpoints, evaluation and export. A strategy owns what differs: its networks (build, save,
load), its training batches and loss, and the engine adapter (``Denoiser``) that samples it.

* ``UNetToy`` ("unet"): DDPM with x0 prediction (``l2s.toy.losses.diffusion_loss``); its
  batches come from one running random stream, as they always have.
* ``MMDiTToy`` ("mmdit"): rectified flow (``l2s.toy.losses.flow_loss``) through the toy-mmdit's
  engine adapter, ``ToyMMDiTDenoiser``, which also samples and records it for steering; its
  batches are a pure function of (seed, step) (``l2s.toy.batches``), so worker processes can
  build them ahead of a GPU.

Both supervise attention (``--attention-weight``) with the engine's ``AttentionRecorder``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch

from l2s.engine.backbone import Denoiser
from l2s.engine.hooks import AttentionRecorder

Components = tuple  # (net, text_encoder, tokenizer, scheduler), as the model modules build them


class Toy(ABC):
    """One toy's part of a training run (``cfg``: the run's ``ToyTrainConfig``)."""

    backbone: str  # the --backbone name
    net_name: str  # the denoising network's folder in checkpoints and exports

    def __init__(self, cfg) -> None:
        self.cfg = cfg

    @abstractmethod
    def image_size(self) -> int:
        """The side of the square training images, in pixels."""

    @abstractmethod
    def build(self) -> Components:
        """Fresh components, their weights seeded by ``cfg.seed``."""

    @staticmethod
    @abstractmethod
    def load(directory: str | Path) -> Components:
        """Components saved by ``save``, in eval mode."""

    @staticmethod
    @abstractmethod
    def save(directory: str | Path, net, text_encoder, tokenizer, scheduler) -> Path:
        """Write the components as ``net_name``/, text_encoder/, tokenizer/, scheduler/."""

    @abstractmethod
    def denoiser(self, net, text_encoder, tokenizer, scheduler) -> Denoiser:
        """The engine adapter that samples these networks (frozen: evaluation)."""

    @abstractmethod
    def start(self, trainer) -> None:
        """Get ready to train the trainer's live networks (on its device, from its random
        streams)."""

    @abstractmethod
    def loss(self, step: int) -> torch.Tensor:
        """The training loss of step ``step`` on a fresh batch, with attention supervision
        when ``cfg.attention_weight`` > 0."""

    def prefetch(self, step: int, workers: int) -> None:
        """Build the batches from ``step`` on in ``workers`` processes ahead of the training;
        a toy whose batches come from a running stream builds them inline."""
        return None

    def close(self) -> None:
        """Stop what ``prefetch`` started."""
        return None


class UNetToy(Toy):
    """The UNet toy (``l2s.toy.model``): DDPM, x0 prediction, cross-attention supervision."""

    backbone, net_name = "unet", "unet"

    def image_size(self) -> int:
        return self.cfg.model.image_size

    def build(self) -> Components:
        from l2s.toy.model import build_toy_components

        return build_toy_components(self.cfg.model, self.cfg.seed)

    @staticmethod
    def load(directory):
        from l2s.toy.model import load_toy_components

        return load_toy_components(directory)

    @staticmethod
    def save(directory, net, text_encoder, tokenizer, scheduler) -> Path:
        from l2s.toy.model import save_toy

        return save_toy(directory, net, text_encoder, tokenizer, scheduler)

    def denoiser(self, net, text_encoder, tokenizer, scheduler) -> Denoiser:
        from l2s.families.unet import UNetDenoiser

        return UNetDenoiser(net, text_encoder, tokenizer, scheduler, name="toy")

    def start(self, trainer) -> None:
        from l2s.toy.batches import CaptionIds

        self.trainer, self.ids = trainer, CaptionIds(trainer.tokenizer)

    def loss(self, step: int) -> torch.Tensor:
        from l2s.toy.batches import training_batch
        from l2s.toy.losses import diffusion_loss

        cfg, tr = self.cfg, self.trainer
        dev, unet, scheduler = tr.device, tr.net, tr.scheduler
        images, captions, scenes = training_batch(tr.rng, tr.gen, cfg, self.image_size())
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,),
                          generator=tr.gen)
        noise = torch.randn(images.shape, generator=tr.gen)
        images, t, noise = images.to(dev), t.to(dev), noise.to(dev)
        text_emb = tr.text_encoder(self.ids(captions).to(dev))[0]  # (B, T, D)
        if cfg.attention_weight <= 0:
            return diffusion_loss(unet, text_emb, images, t, noise, scheduler, cfg.weighting,
                                  cfg.snr_gamma)
        from l2s.families.unet import UNetAttention, unet_cross_attention_layers
        from l2s.toy.supervision import attention_loss, object_targets

        groups, targets, valid = object_targets(tr.tokenizer, captions, scenes)
        layers = unet_cross_attention_layers(unet, images.shape[-2:])
        with AttentionRecorder(UNetAttention(unet), layers, groups, keep_grad=True) as rec:
            loss = diffusion_loss(unet, text_emb, images, t, noise, scheduler, cfg.weighting,
                                  cfg.snr_gamma)
            return loss + cfg.attention_weight * attention_loss(rec.stacked(), targets.to(dev),
                                                                valid.to(dev))


class MMDiTToy(Toy):
    """The toy-mmdit (``l2s.toy.mmdit``): rectified flow through ``ToyMMDiTDenoiser``,
    joint-attention supervision through the Flux family's capture."""

    backbone, net_name = "mmdit", "transformer"

    def image_size(self) -> int:
        return self.cfg.mmdit.image_size

    def build(self) -> Components:
        from l2s.toy.mmdit import build_mmdit_components

        return build_mmdit_components(self.cfg.mmdit, self.cfg.seed)

    @staticmethod
    def load(directory):
        from l2s.toy.mmdit import load_mmdit_components

        return load_mmdit_components(directory)

    @staticmethod
    def save(directory, net, text_encoder, tokenizer, scheduler) -> Path:
        from l2s.toy.mmdit import save_mmdit

        return save_mmdit(directory, net, text_encoder, tokenizer, scheduler)

    def denoiser(self, net, text_encoder, tokenizer, scheduler, *, trainable: bool = False
                 ) -> Denoiser:
        from l2s.families.toy_mmdit import ToyMMDiTDenoiser

        return ToyMMDiTDenoiser(net, text_encoder, tokenizer, dict(scheduler.config),
                                image_size=self.image_size(), trainable=trainable)

    def start(self, trainer) -> None:
        from l2s.toy.batches import BatchStream

        self.device = trainer.device
        # The adapter over the live networks: the same packing, time and capture as sampling.
        self.live = self.denoiser(trainer.net, trainer.text_encoder, trainer.tokenizer,
                                  trainer.scheduler, trainable=True)
        self.layers = self.live.cross_attention_layers()
        self.batches = BatchStream(self.cfg, 0)

    def prefetch(self, step: int, workers: int) -> None:
        from l2s.toy.batches import BatchStream

        self.batches.close()
        self.batches = BatchStream(self.cfg, step, workers)

    def close(self) -> None:
        self.batches.close()

    def loss(self, step: int) -> torch.Tensor:
        from l2s.toy.losses import flow_loss
        from l2s.toy.supervision import attention_loss

        cfg, den = self.cfg, self.live
        b = self.batches.get(step).to(self.device)
        cond = den.encode_ids(b.ids)
        if cfg.attention_weight <= 0:
            return flow_loss(den, cond, b.images, b.s, b.noise)
        rec = AttentionRecorder(den, self.layers, (), map_size=den.grid[0], keep_grad=True)
        rec.set_weights(b.weights)  # (B, T, G), built with the batch
        with rec:
            loss = flow_loss(den, cond, b.images, b.s, b.noise)
            return loss + cfg.attention_weight * attention_loss(rec.stacked(), b.targets,
                                                                b.valid)


TOYS: dict[str, type[Toy]] = {t.backbone: t for t in (UNetToy, MMDiTToy)}
