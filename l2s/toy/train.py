"""Training the toy text-to-image model on synthetic shape scenes, and scoring it.

Recipe (chosen by short CPU experiments; every knob is in ``ToyTrainConfig``): x0 ("sample")
prediction with a uniform x0 loss, on the cosine schedule (1000 steps, its last step pure
noise) sampled with trailing DDIM steps, so flat colours on black come out clean and no colour
cast survives; 10% of captions dropped to "" for classifier-free guidance; AdamW lr 1e-3
(300 warmup steps, weight decay 0.01, gradient clip 1.0), batch 48; EMA 0.999 with warmup; the
text encoder trains jointly with the UNet; one CPU thread. Against v-prediction with Min-SNR-5
at equal compute, x0 prediction had both shapes in 0.28 vs 0.19 of images (0.28 vs 0.09 clean).

Attention supervision (``--attention-weight``, ``l2s.toy.supervision``) gives the toy the
object-localised cross-attention that large models learn on their own and that steering reads;
without it the maps are near uniform (attention centroids agreed with the layout in 0% of
noised two-object scenes at step 1000, 92-100% after 100 supervised steps).

The shipped weights: 900 steps of the recipe above (``--out runs/toy --steps 900``), then
``--resume --steps 1600 --attention-weight 0.02`` (EMA at step 1600; about 1 h of CPU on a
shared 2-core machine). ``l2s bench --suite shapes --method plain`` (200 prompts, 20 DDIM
steps, CFG 3): both shapes detected in 0.905 of the images, GenEval position accuracy 0.305
(a relation-blind layout scores ~0.31 of the images with both shapes). Without supervision the
same recipe reached 0.94 / 0.29 at step 2000 but its maps do not localise objects. Captions
rarely state relations (``l2s.toy.scenes``), so the model learns the objects well and their
placement barely, which is the weakness Learn-to-Steer fixes.

The toy-mmdit (``--backbone mmdit``, ``l2s.toy.mmdit``) trains in the same loop with rectified
flow (velocity target, logit-normal timesteps), the same EMA, optimizer, caption dropout and
evaluation, and attention supervision on the image-query x text-key softmax of its joint
attention, all through its engine adapter; its batches are a pure function of (seed, step)
(``l2s.toy.batches``), so worker processes build them ahead of a GPU (``--workers``,
``--device cuda --bf16``). Its recipe is ``make toy-mmdit``. What differs between the two toys
is one strategy object each (``l2s.toy.backbones``); this module never asks which toy it trains.

``--init-from MODEL_DIR`` starts from an export instead of random weights (a fine-tune; the
optimizer and the EMA's warmup start afresh) and ``--relation-rate`` sets the share of captions
that state a true relation: fine-tunes of the shipped toy at rate 0.9 were the candidate for a
toy whose maps leak the relation word (docs/classifier.md, "Relation leakage on the toy").

``train_toy(config, callback)`` is the library entry point; ``python -m l2s.toy.train`` is a thin
CLI over it. Training is seeded and resumable: a checkpoint holds the weights, the EMA weights,
the optimizer, the step and every random state, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from l2s.errors import L2SError
from l2s.toy.backbones import TOYS, UNetToy
from l2s.toy.checkpoint import load_checkpoint, save_checkpoint, write_dir
from l2s.toy.evaluate import ToyEval, evaluate
from l2s.toy.losses import WEIGHTINGS
from l2s.toy.mmdit import ToyMMDiTConfig
from l2s.toy.model import ToyModelConfig

# A progress callback sees {"event": "step" | "eval" | "checkpoint" | "export", ...}.
TrainCallback = Callable[[dict], None]

BACKBONES = tuple(TOYS)  # "unet": the toy UNet (l2s.toy.model); "mmdit": the toy Flux


@dataclass(frozen=True)
class ToyTrainConfig:
    """Everything a toy training run depends on; written to OUT/config.json."""

    out: str  # run folder: checkpoint/, eval/, best/ (best EMA model), model/ (final export)
    backbone: str = "unet"  # one of BACKBONES; "mmdit" trains with rectified flow
    steps: int = 20000  # optimizer steps to reach (a resumed run continues up to this)
    batch: int = 48  # scenes per step
    seed: int = 0  # seeds the weights, the scenes and the noise
    lr: float = 1e-3  # peak AdamW learning rate
    warmup: int = 300  # steps of linear learning-rate warmup
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    weighting: str = "uniform"  # loss weighting over noise levels: one of WEIGHTINGS
    snr_gamma: float = 5.0  # SNR cap for the min_snr / clamped_snr weightings
    ema_decay: float = 0.999  # EMA decay once warmed up; warmup uses min(decay, (1+n)/(10+n))
    cond_drop: float = 0.1  # share of captions replaced by "" (the unconditional branch of CFG)
    # Weight of the attention supervision loss (l2s.toy.supervision): each object word's
    # cross-attention map -> its mask. 0 = plain diffusion training. The shipped model used
    # 0.02 after step 900 (see the module docstring).
    attention_weight: float = 0.0
    relation_rate: float = 0.15  # share of captions that state a relation (scenes.scene_batch)
    # Start from these trained weights (an export such as l2s/toy/weights) instead of random
    # ones: fine-tuning a shipped toy into a variant. The optimizer and EMA start afresh.
    init_from: str | None = None
    checkpoint_every: int = 100  # steps between checkpoints (~5 min on a busy 2-core CPU)
    eval_every: int = 500  # steps between evaluations of the EMA model (0: never)
    eval_prompts: int = 64  # two-object prompts per evaluation
    eval_steps: int = 20  # DDIM steps when evaluating
    eval_guidance: float = 3.0  # classifier-free guidance scale when evaluating
    export: str | None = None  # also copy the best EMA model here (e.g. l2s/toy/weights)
    # torch CPU threads: 1, as on a CPU shared with other jobs two threads spin in OpenMP
    # barriers and measured 4x slower per step than one.
    threads: int = 1
    device: str = "cpu"  # "cuda" trains on the GPU
    bf16: bool = False  # bfloat16 autocast for the forward passes (fp32 weights, EMA, optimizer)
    workers: int = 0  # processes building mmdit batches ahead (0: inline)
    max_seconds: float = 0.0  # stop (checkpoint and export) after this much training; 0: never
    model: ToyModelConfig = field(default_factory=ToyModelConfig)  # the UNet toy's architecture
    mmdit: ToyMMDiTConfig = field(default_factory=ToyMMDiTConfig)  # the toy-mmdit's


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced."""

    step: int  # last step trained
    model_dir: str  # final EMA export
    best_dir: str | None  # best-evaluated EMA export, if any evaluation ran
    best: ToyEval | None  # its scores


# --- training --------------------------------------------------------------------------------


def _ema_decay(cfg: ToyTrainConfig, step: int) -> float:
    # Warmup: early EMA tracks the fast-moving weights, later it averages over ~1/(1-decay) steps.
    return min(cfg.ema_decay, (1 + step) / (10 + step))


def _lr(cfg: ToyTrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


def _check(cfg: ToyTrainConfig) -> None:
    if cfg.weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {cfg.weighting!r}: expected one of "
                         f"{', '.join(WEIGHTINGS)}")
    if cfg.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {cfg.backbone!r}: expected one of "
                         f"{', '.join(BACKBONES)}")


class ToyTrainer:
    """One training run's state: model, EMA copy, optimizer, random streams and step count.

    ``toy`` is the chosen backbone's strategy (``l2s.toy.backbones``); ``net`` its denoising
    network (the UNet or the Flux transformer); the text encoder trains jointly with it in both.
    """

    def __init__(self, cfg: ToyTrainConfig):
        import copy

        _check(cfg)
        self.cfg, self.device = cfg, torch.device(cfg.device)
        self.toy = TOYS[cfg.backbone](cfg)
        self.net, self.text_encoder, self.tokenizer, self.scheduler = self.toy.build()
        self.net.to(self.device)
        self.text_encoder.to(self.device)
        self.ema_net = copy.deepcopy(self.net).requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.params = [p for m in (self.net, self.text_encoder) for p in m.parameters()]
        self.ema_params = [p for m in (self.ema_net, self.ema_text) for p in m.parameters()]
        if cfg.init_from:
            self._init_from(Path(cfg.init_from))
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.rng = np.random.default_rng(cfg.seed)  # scenes (UNet; mmdit: per step, batches.py)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)  # noise, timesteps, dropout
        self.toy.start(self)
        self.step = 0

    def _init_from(self, directory: Path) -> None:
        """Copy an export's weights into the live and EMA networks (same architecture)."""
        try:
            net, text_encoder, _, _ = self.toy.load(directory)
        except OSError as e:
            raise L2SError(f"--init-from {directory}: {e}") from e
        for live, ema, saved in ((self.net, self.ema_net, net),
                                 (self.text_encoder, self.ema_text, text_encoder)):
            try:
                live.load_state_dict(saved.state_dict())
            except RuntimeError as e:
                raise L2SError(f"--init-from {directory}: its weights do not fit this run's "
                               f"architecture (--backbone, --channels): {e}") from e
            ema.load_state_dict(saved.state_dict())

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.cfg.out) / "checkpoint"

    def _modules(self) -> tuple[dict, dict]:
        name = self.toy.net_name
        return ({name: self.net, "text_encoder": self.text_encoder},
                {name: self.ema_net, "text_encoder": self.ema_text})

    def save(self) -> None:
        save_checkpoint(self.checkpoint_dir, self.step, *self._modules(), self.optimizer,
                        self.rng, self.gen, self.cfg, self.spelling())

    def spelling(self) -> dict[str, list[int]]:
        """The token ids of every vocabulary word: what a checkpoint's text encoder learnt."""
        from l2s.toy.scenes import VOCABULARY

        return {w: self.tokenizer(w, add_special_tokens=False).input_ids for w in VOCABULARY}

    def resume(self) -> bool:
        """Load the run's checkpoint if there is one; whether it did."""
        if not (self.checkpoint_dir / "state.json").is_file():
            return False
        self.step = load_checkpoint(self.checkpoint_dir, *self._modules(), self.optimizer,
                                    self.rng, self.gen, self.spelling())
        return True

    def train_step(self) -> float:
        """One optimizer step on a fresh batch; returns the loss."""
        cfg = self.cfg
        self.net.train()
        self.text_encoder.train()
        for g in self.optimizer.param_groups:
            g["lr"] = _lr(cfg, self.step)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=cfg.bf16):
            loss = self.toy.loss(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_params, [p.detach() for p in self.params],
                                 1 - _ema_decay(cfg, self.step))
        self.step += 1
        return loss.item()

    def evaluate(self, prompts: int | None = None, grid: Path | None = None) -> ToyEval:
        cfg = self.cfg
        denoiser = self.toy.denoiser(self.ema_net, self.ema_text, self.tokenizer, self.scheduler)
        return evaluate(denoiser, prompts=prompts or cfg.eval_prompts, steps=cfg.eval_steps,
                        guidance=cfg.eval_guidance, seed=cfg.seed, grid=grid)

    def export(self, directory: Path) -> None:
        # A fresh folder swapped in: a reader never sees half a model.
        write_dir(directory, lambda tmp: self.toy.save(tmp, self.ema_net, self.ema_text,
                                                       self.tokenizer, self.scheduler))


def _write_json(path: Path, data: dict) -> None:
    """A resumed run reads these back: never half-written
    (``l2s.inversion.cache.atomic_write_text``)."""
    from l2s.inversion.cache import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1))


def _eval_score(e: ToyEval) -> float:
    # Both objects present is what the shipped model must get right; clean layouts break ties.
    return e.both_present + 0.1 * e.clean


def train_toy(cfg: ToyTrainConfig, resume: bool = False, callback: TrainCallback | None = None
              ) -> TrainResult:
    """Train (or continue) a toy model as `cfg` says; returns where the weights went."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    report = callback or (lambda event: None)
    trainer = ToyTrainer(cfg)
    if resume and trainer.resume():
        report({"event": "resume", "step": trainer.step})
    _write_json(out / "config.json", dataclasses.asdict(cfg))
    best_file = out / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else None
    best_eval = ToyEval(**best["eval"]) if best else None
    if cfg.workers:
        trainer.toy.prefetch(trainer.step, cfg.workers)
    try:
        return _train_loop(cfg, trainer, out, best_eval, report)
    finally:
        trainer.toy.close()


def _train_loop(cfg: ToyTrainConfig, trainer: ToyTrainer, out: Path, best_eval: ToyEval | None,
                report: TrainCallback) -> TrainResult:
    best_file = out / "best.json"
    losses, tick = [], time.perf_counter()
    trained, last = 0.0, tick  # seconds of training (not evaluating) in this process
    while trainer.step < cfg.steps:
        losses.append(trainer.train_step())
        step = trainer.step
        trained += time.perf_counter() - last
        out_of_time = bool(cfg.max_seconds) and trained >= cfg.max_seconds
        if step % 50 == 0 or step == cfg.steps or out_of_time:
            now = time.perf_counter()
            report({"event": "step", "step": step, "loss": float(np.mean(losses)),
                    "lr": _lr(cfg, step - 1), "sec_per_step": (now - tick) / len(losses)})
            losses, tick = [], now
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time:
            trainer.save()
            report({"event": "checkpoint", "step": step, "path": str(trainer.checkpoint_dir)})
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps
                               or out_of_time):
            result = trainer.evaluate(grid=out / "eval" / f"step{step:06d}.png")
            improved = best_eval is None or _eval_score(result) > _eval_score(best_eval)
            report({"event": "eval", "step": step, "improved": improved,
                     **dataclasses.asdict(result)})
            if improved:
                best_eval = result
                trainer.export(out / "best")
                if cfg.export:
                    trainer.export(Path(cfg.export))
                _write_json(best_file, {"step": step, "eval": dataclasses.asdict(result)})
                report({"event": "export", "step": step, "path": cfg.export or str(out / "best")})
            tick = time.perf_counter()  # evaluation time is not training time
        last = time.perf_counter()
        if out_of_time:
            report({"event": "time_limit", "step": step, "seconds": trained})
            break
    trainer.export(out / "model")
    return TrainResult(trainer.step, str(out / "model"),
                       str(out / "best") if best_eval else None, best_eval)


# --- command line ----------------------------------------------------------------------------


# Options that may change when a run resumes: they steer when to stop, score and save,
# not what is learned. (The CLI flag is --guidance for eval_guidance.)
_RUN_OPTIONS = ("steps", "eval_every", "eval_prompts", "eval_steps", "eval_guidance",
                "checkpoint_every", "export", "attention_weight", "device", "bf16", "workers",
                "max_seconds")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    d = ToyTrainConfig(out="")
    p = argparse.ArgumentParser(prog="python -m l2s.toy.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", help="run folder (checkpoints, evaluation grids, exports)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint with OUT/config.json's recipe")
    p.add_argument("--backbone", choices=BACKBONES, default=d.backbone,
                   help="unet: the DDIM toy UNet; mmdit: the rectified-flow toy Flux transformer")
    p.add_argument("--steps", type=int, help=f"train up to this step (default {d.steps})")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--weighting", choices=WEIGHTINGS, default=d.weighting)
    p.add_argument("--prediction", choices=("sample", "v_prediction", "epsilon"),
                   default=d.model.prediction_type, help="what the UNet predicts")
    p.add_argument("--channels", default=",".join(map(str, d.model.unet_channels)),
                   help="UNet widths per level, comma separated")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--relation-rate", type=float, default=d.relation_rate,
                   help=f"share of captions that state a true relation (default {d.relation_rate})")
    p.add_argument("--init-from", metavar="MODEL_DIR",
                   help="start from these weights (an export, e.g. l2s/toy/weights): fine-tune")
    p.add_argument("--attention-weight", type=float,
                   help=f"attention supervision weight (default {d.attention_weight}; the shipped "
                        "model: 0.02 from step 900, given with --resume)")
    p.add_argument("--eval-every", type=int, help=f"default {d.eval_every}; 0 = never")
    p.add_argument("--eval-prompts", type=int,
                   help=f"default {d.eval_prompts} when training, 200 with --evaluate")
    p.add_argument("--eval-steps", type=int, help=f"DDIM steps (default {d.eval_steps})")
    p.add_argument("--guidance", dest="eval_guidance", type=float,
                   help=f"CFG scale when evaluating (default {d.eval_guidance})")
    p.add_argument("--checkpoint-every", type=int, help=f"default {d.checkpoint_every}")
    p.add_argument("--export", help="also write the best EMA model here, e.g. l2s/toy/weights")
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--bf16", action="store_true", default=None,
                   help="bfloat16 autocast (on a GPU)")
    p.add_argument("--workers", type=int, help="processes building mmdit batches ahead (0)")
    p.add_argument("--max-seconds", type=float,
                   help="stop after this many seconds of training (checkpoint and export first)")
    p.add_argument("--evaluate", metavar="MODEL_DIR",
                   help="only score a saved model (e.g. l2s/toy/weights) and exit")
    p.add_argument("--grid", help="with --evaluate: save the generated images as this PNG")
    args = p.parse_args(argv)
    if args.evaluate is None and not args.out:
        p.error("--out is required unless --evaluate is given")
    return args


def config_from_dict(d: dict) -> ToyTrainConfig:
    """A ToyTrainConfig from its asdict() form (as in OUT/config.json)."""
    model = dict(d.get("model", {}))
    if "unet_channels" in model:
        model["unet_channels"] = tuple(model["unet_channels"])
    mmdit = dict(d.get("mmdit", {}))
    if "rope_axes" in mmdit:
        mmdit["rope_axes"] = tuple(mmdit["rope_axes"])
    return ToyTrainConfig(**{**d, "model": ToyModelConfig(**model),
                             "mmdit": ToyMMDiTConfig(**mmdit)})


def _config_from_args(args: argparse.Namespace) -> ToyTrainConfig:
    model = dataclasses.replace(
        ToyModelConfig(), prediction_type=args.prediction,
        unet_channels=tuple(int(c) for c in args.channels.split(",")))
    return ToyTrainConfig(out=args.out, backbone=args.backbone, batch=args.batch,
                          seed=args.seed, lr=args.lr, warmup=args.warmup,
                          weighting=args.weighting, ema_decay=args.ema_decay,
                          relation_rate=args.relation_rate, init_from=args.init_from,
                          model=model)


def _print_progress(event: dict) -> None:
    event = dict(event)
    kind = event.pop("event")
    body = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in event.items())
    print(f"[{time.strftime('%H:%M:%S')}] {kind} {body}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    overrides = {k: getattr(args, k) for k in _RUN_OPTIONS if getattr(args, k) is not None}
    if args.evaluate is not None:
        d = ToyTrainConfig(out="")
        torch.set_num_threads(d.threads)
        # The toy whose network folder the export has (the UNet toy's load names what is
        # missing when neither is there).
        kind = next((t for t in TOYS.values() if (Path(args.evaluate) / t.net_name).is_dir()),
                    UNetToy)
        toy = kind(d)
        device = overrides.get("device", "cpu")
        components = [c.to(device) if isinstance(c, torch.nn.Module) else c
                      for c in toy.load(args.evaluate)]
        result = evaluate(toy.denoiser(*components),
                          prompts=overrides.get("eval_prompts", 200),
                          steps=overrides.get("eval_steps", d.eval_steps),
                          guidance=overrides.get("eval_guidance", d.eval_guidance),
                          seed=args.seed, grid=args.grid)
        print(json.dumps(dataclasses.asdict(result)))
        return
    saved = Path(args.out) / "config.json"
    if args.resume and saved.is_file():
        cfg = config_from_dict(json.loads(saved.read_text()))
    else:
        cfg = _config_from_args(args)
    cfg = dataclasses.replace(cfg, **overrides)
    try:
        result = train_toy(cfg, resume=args.resume, callback=_print_progress)
    except L2SError as err:
        sys.exit(f"error: {err}")
    print(json.dumps(dataclasses.asdict(result)))


if __name__ == "__main__":
    main()
