"""The `l2s distill` job (``l2s.distill``): fine-tune a LoRA so that plain generation obeys
relations, by self-distillation of l2s steering or with the classifier's loss as a reward.

Recipe "self": (1) generate with l2s steering on relation prompts whose object
pairs avoid the held-out objects, keep the images the relation classifier accepts
(``l2s.distill.data``); (2) fine-tune a LoRA on the backbone's network with its ordinary
denoising loss on them (``l2s.distill.train``); (3) write the LoRA folder in diffusers'
format with its card (base model fingerprint, recipe, data, settings) and, where the model
draws a world with a judge (the toys), the judge's verdict on plain vs plain+LoRA over fresh
prompts, held-out pairs apart. The classifier only selects data: every number on the card
comes from the judge. Each phase resumes: chunks of data already written are kept, training
continues from its last checkpoint. Recipe "reward" (``l2s.distill.reward``) generates no
data: it trains the LoRA on the classifier's loss at the latents of its own first sampling
steps, read by the frozen base model, then does (3).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from l2s.config import (
    CONFIG_FILE,
    check_config,
    check_integer,
    check_number,
    check_seeds,
    check_text,
    dump_yaml,
    expand_home,
    load_yaml,
)
from l2s.distill.lora import DEFAULT_TARGETS, LoRAError, LoRASpec
from l2s.engine.backbone import Denoiser

# "self": self-distillation of l2s steering (steered images, the denoising loss); "reward":
# the relation classifier's loss through the first sampling steps (l2s.distill.reward)
RECIPES = ("self", "reward")
LOCK_NAME = ".lock"  # held in the output folder while a run writes it


@dataclass(frozen=True)
class DistillConfig:
    """Settings of one `l2s distill` run; written as the run's config.yaml."""

    model: str = "toy"  # backbone preset, hub id or folder
    out: str | None = None  # the LoRA folder (None: runs/distill-MODEL)
    recipe: str = "self"  # RECIPES
    classifier: str | None = None  # classifier card steering and selection use (None: default)
    images: int = 3000  # steered images generated (those the classifier accepts are kept)
    chunk: int = 50  # images generated per batch (and per resumable data file)
    # objects whose pairs are never distilled on (None: the model's last object: the toy's
    # ring); "" holds out nothing
    hold_out: tuple[str, ...] | None = None
    rank: int = 8  # LoRA rank
    alpha: float = 8.0  # LoRA scale numerator (update scaled by alpha / rank)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # module names the LoRA adapts
    steps: int = 2000  # training steps
    batch_size: int = 32  # images per step
    lr: float = 1e-3  # AdamW learning rate of the LoRA
    drop_text: float = 0.1  # fraction of images trained with the empty prompt
    # train at the noisiest part of the sampling grid, where layout is decided: its first
    # fraction of steps (1: every step)
    noisy_fraction: float = 0.25
    # fraction of each batch noised with the noise its image was generated from (the rest:
    # fresh noise)
    paired_noise: float = 1.0
    # recipe self: plain images per object of every object alone (held-out ones too), trained
    # beside the steered ones so the LoRA keeps drawing objects no distilled prompt names
    # (without them the toy LoRA drew the ring in 0.30 of held-out prompts); 0: none
    preserve: int = 100
    # recipe "reward": weight of the keep-close term (the LoRA's raw outputs against the
    # base's over the whole sampling grid)
    keep: float = 1.0
    checkpoint_every: int = 100  # steps between checkpoints
    eval_prompts: int = 100  # judged prompts per split for the card (0: no evaluation)
    eval_seed: int = 9  # seed of the card's evaluation prompts and noise
    seed: int = 0  # prompts, noise and batches of distillation
    device: str | None = None  # cuda, cpu, ... (None: $L2S_DEVICE, else CUDA if any)

    def __post_init__(self) -> None:
        from l2s.config import check_choice

        check_text("--model", self.model)
        check_text("--out", self.out, optional=True, path=True)
        check_text("--classifier", self.classifier, optional=True, path=True)
        check_choice("--recipe", self.recipe, RECIPES, LoRAError)
        for name, low in (("images", 1), ("chunk", 1), ("preserve", 0), ("rank", 1),
                          ("steps", 1),
                          ("batch_size", 1), ("checkpoint_every", 1), ("eval_prompts", 0),
                          ("eval_seed", 0), ("seed", 0)):
            check_integer(f"--{name.replace('_', '-')}", getattr(self, name), low,
                          optional=False)
        for name in ("seed", "eval_seed"):  # was: past 2^63 an overflow traceback
            check_seeds(f"--{name.replace('_', '-')}", getattr(self, name))
        expand_home(self, "out")
        check_number("--alpha", self.alpha, 0, strict=True)
        check_number("--lr", self.lr, 0, strict=True)
        check_number("--drop-text", self.drop_text, 0)
        check_number("--noisy-fraction", self.noisy_fraction, 0, strict=True)
        check_number("--paired-noise", self.paired_noise, 0)
        check_number("--keep", self.keep, 0)
        if self.paired_noise > 1:
            raise LoRAError(f"--paired-noise {self.paired_noise}: give a fraction in [0, 1]")
        if self.noisy_fraction > 1:
            raise LoRAError(f"--noisy-fraction {self.noisy_fraction}: give a fraction in (0, 1]")
        if self.drop_text >= 1:
            raise LoRAError(f"--drop-text {self.drop_text}: give a fraction below 1")
        check_text("--device", self.device, optional=True)
        for name in ("hold_out", "targets"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str | tuple | list)
                                  or not all(isinstance(x, str) for x in v)):
                # was: TypeError ('int' object is not iterable), or [5] taken as a name
                raise LoRAError(f"--{name.replace('_', '-')} takes names, comma-separated "
                                f"(from Python a tuple of str), got {v!r}")
            if isinstance(v, str):
                object.__setattr__(self, name, tuple(x.strip() for x in v.split(",")
                                                     if x.strip()))
            elif v is not None:
                object.__setattr__(self, name, tuple(v))
        if not self.targets:
            raise LoRAError("--targets: name at least one module (e.g. to_q,to_k,to_v,to_out.0)")
        if self.out is None:
            object.__setattr__(self, "out", f"runs/distill-{self.model.replace('/', '_')}")

    def options(self) -> dict:
        """This run in `l2s distill`'s option names: what config.yaml holds."""
        values = asdict(self)
        for name in ("hold_out", "targets"):
            if values[name] is not None:
                values[name] = ",".join(values[name])
        return values

    @classmethod
    def from_options(cls, values: Mapping) -> DistillConfig:
        if not isinstance(values, Mapping):
            raise LoRAError(f"distill options must be a mapping of option: value, got "
                            f"{type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LoRAError(f"unknown distill option(s) {', '.join(unknown)}: valid ones are "
                            f"{', '.join(sorted(known))}")
        return cls(**{k: v for k, v in values.items() if v is not None})

    @classmethod
    def from_yaml(cls, path: str | Path) -> DistillConfig:
        return cls.from_options(load_yaml(path))

    def spec(self) -> LoRASpec:
        return LoRASpec(self.rank, float(self.alpha), self.targets)

    def identity(self) -> dict:
        """What a resumed training must share with the run it continues (steps may grow)."""
        # (preserve 0 is left out: what a checkpoint of an l2s without it holds)
        return {k: v for k, v in self.options().items()
                if k not in ("out", "steps", "checkpoint_every", "eval_prompts", "eval_seed",
                             "device") and (k != "preserve" or v)}


@dataclass
class DistillResult:
    """The LoRA folder, its card and how long each phase took."""

    out: Path
    card: dict
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"out": str(self.out), "card": self.card, "seconds": self.seconds}


def held_out(cfg: DistillConfig, objects: tuple[str, ...]) -> tuple[str, ...]:
    hold = cfg.hold_out if cfg.hold_out is not None else objects[-1:]
    unknown = [h for h in hold if h not in objects]
    if unknown:
        raise LoRAError(f"--hold-out {','.join(unknown)}: not an object of this model's "
                        f"prompts ({', '.join(objects)})")
    if len(objects) - len(hold) < 2:
        raise LoRAError("--hold-out: at least two objects must stay for distillation")
    return tuple(hold)


def _portable(path: str | None) -> str | None:
    """A classifier card's path as the card records it: relative to the package for a shipped
    one (l2s/classifiers/...), so a shipped LoRA's card names no machine's folders."""
    if path is None:
        return None
    package = Path(__file__).resolve().parent.parent
    try:
        return str(Path("l2s") / Path(path).resolve().relative_to(package))
    except ValueError:
        return str(path)


def prompt_objects(denoiser: Denoiser) -> tuple[str, ...]:
    """The objects of the distillation prompts: the model's closed vocabulary (the toys'
    shapes), else GenEval's 80 names."""
    if denoiser.known_objects:
        return tuple(denoiser.known_objects)
    from l2s.bench.suites import geneval_names

    return geneval_names()


def evaluate(denoiser: Denoiser, lora_denoiser: Denoiser, settings, objects, hold, n: int,
             seed: int) -> dict:
    """The judge's position accuracy of plain and plain+LoRA generation on n fresh prompts of
    distilled pairs and n of held-out pairs (pairs containing a held-out object)."""
    from l2s.distill.data import pair_prompt
    from l2s.engine.sampling import sample, seeded_latents, to_uint8

    world = denoiser.world
    out = {"judge": world.judged_by, "prompts_per_split": n, "seed": seed}
    splits = {"distilled_pairs": lambda r: pair_prompt([o for o in objects if o not in hold],
                                                       r)}
    if hold:
        def held(r):
            while True:
                p = pair_prompt(objects, r)
                if p.triplet.subject in hold or p.triplet.object in hold:
                    return p
        splits["held_out_pairs"] = held
    for name, draw in splits.items():
        rng = random.Random(seed * 1_000_003 + 17)
        ps = [draw(rng) for _ in range(n)]
        texts, trips = [p.prompt for p in ps], [[p.triplet] for p in ps]
        seeds = [seed * 10_000_000 + 500_000 + i for i in range(n)]
        res = {}
        for label, d in (("plain", denoiser), ("plain+lora", lora_denoiser)):
            with torch.no_grad():
                imgs = sample(d, texts, steps=settings.steps, guidance=settings.guidance,
                              latents=seeded_latents(d, seeds))
            res[label] = sum(world.judge(to_uint8(imgs), trips)) / n
        out[name] = res
    return out


def distill(cfg: DistillConfig, denoiser: Denoiser, callback: Callable[[dict], None] | None
            = None, fresh: bool = False) -> DistillResult:
    """Run `l2s distill`: (recipe "self": data,) training, the LoRA folder and its card."""
    check_config("distillation", cfg, DistillConfig)
    from l2s import locks
    from l2s.config import check_writable_dir
    from l2s.distill.lora import check_spec

    check_writable_dir(cfg.out)  # was: FileExistsError for a file; before any work
    check_spec(denoiser.attention_model, cfg.spec())
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # one run per folder: a second would write the same data chunks and checkpoint twice
    with locks.exclusive(out / LOCK_NAME, "l2s distill", out):
        return _distill(cfg, denoiser, callback, fresh, out)


def _distill(cfg: DistillConfig, denoiser: Denoiser, callback, fresh: bool, out: Path
             ) -> DistillResult:
    import copy

    from l2s.distill.lora import network_attribute, save_lora, with_lora
    from l2s.distill.train import CHECKPOINT
    from l2s.steering.job import build_loss
    from l2s.steering.options import SteerOptions

    objects = prompt_objects(denoiser)
    hold = held_out(cfg, objects)
    # this run in `l2s distill`'s option names, the held-out objects written as used (the
    # model's default, null, was its last object): `--config OUT/config.yaml` repeats it
    used = replace(cfg, hold_out=hold)
    dump_yaml(used.options(), out / CONFIG_FILE)
    checkpoint = out / CHECKPOINT
    if fresh and checkpoint.exists():
        checkpoint.unlink()
    identity = _training_identity(checkpoint, used.identity(), hold == objects[-1:])
    settings = SteerOptions().resolve(cfg.model)
    loss, loss_source = build_loss("l2s", denoiser, cfg.model, cfg.classifier)
    seconds: dict[str, float] = {}
    # train a copy: the denoiser passed in stays the base model
    net = copy.deepcopy(denoiser.attention_model)
    trained = copy.copy(denoiser)
    setattr(trained, network_attribute(denoiser), net)
    if cfg.recipe == "self":
        train_card, data_card = _train_self(cfg, denoiser, trained, net, loss, settings,
                                            objects, hold, identity, seconds, callback)
    else:
        train_card, data_card = _train_reward(cfg, denoiser, trained, net, loss, settings,
                                              objects, hold, identity, seconds, callback)
    card = {
        "format": "l2s-lora/1",
        "base_model": cfg.model,
        "base_fingerprint": denoiser.fingerprint,
        "recipe": {"name": cfg.recipe, "what": RECIPE_TEXT[cfg.recipe],
                   "classifier": _portable(loss_source), "steering": asdict(settings)},
        "lora": {"rank": cfg.rank, "alpha": cfg.alpha, "targets": list(cfg.targets),
                 "parameters": sum(p.numel() for p in net.parameters() if p.requires_grad)},
        "data": {"objects": list(objects), "held_out_objects": list(hold), "seed": cfg.seed,
                 **data_card},
        "training": train_card,
        "measured": None,
    }
    save_lora(out, net, cfg.spec(), card)
    if cfg.eval_prompts and denoiser.world is not None:
        if callback:
            callback({"phase": "evaluate", "prompts": cfg.eval_prompts})
        t0 = time.perf_counter()
        card["measured"] = evaluate(denoiser, with_lora(denoiser, out), settings, objects,
                                    hold, cfg.eval_prompts, cfg.eval_seed)
        seconds["evaluate"] = time.perf_counter() - t0
        save_lora(out, net, cfg.spec(), card)
    return DistillResult(out, card, seconds)


def _training_identity(checkpoint: Path, identity: dict, default_hold: bool) -> dict:
    """The identity this run's training checkpoints carry: ``identity`` (the held-out
    objects as used), or, where the checkpoint in the folder was written by an older l2s with
    hold_out null ("the model's default") and this run holds out that default, that form:
    the run resumes from its own command and from `--config` of the config.yaml written now."""
    if not default_hold or not checkpoint.is_file():
        return identity
    from safetensors import SafetensorError, safe_open

    older = {**identity, "hold_out": None}
    try:
        with safe_open(str(checkpoint), framework="pt") as f:
            saved = json.loads((f.metadata() or {}).get("identity", "{}"))
    except (OSError, SafetensorError, ValueError):
        return identity  # unreadable: training refuses it, naming --fresh
    return older if saved == json.loads(json.dumps(older, sort_keys=True)) else identity


RECIPE_TEXT = {
    "self": "self-distillation: l2s-steered images the relation classifier accepts, the "
            "model's own denoising loss",
    "reward": "the relation classifier's loss, read by the frozen base model on the latents "
              "of the first sampling steps run with the LoRA, backpropagated into the LoRA, "
              "plus a keep-close term",
}


def _train_self(cfg, denoiser, trained, net, loss, settings, objects, hold, identity,
                seconds, callback) -> tuple[dict, dict]:
    """Recipe "self": steered data the classifier accepts, then the denoising loss."""
    from l2s.classifier.model import card_sha256
    from l2s.distill import data as ddata
    from l2s.distill.lora import attach
    from l2s.distill.train import CHECKPOINT, train_lora
    from l2s.engine.sampling import seeded_latents

    out = Path(cfg.out)
    t0 = time.perf_counter()
    counts = ddata.generate_chunks(denoiser, loss, settings, out / "data", objects=objects,
                                   hold_out=hold, images=cfg.images, chunk=cfg.chunk,
                                   seed=cfg.seed, callback=callback,
                                   made_by={"classifier_sha256": card_sha256(loss.source),
                                            "steering": asdict(settings)})
    seconds["data"] = time.perf_counter() - t0
    images, prompts, seeds = ddata.load_accepted(out / "data", -(-cfg.images // cfg.chunk))
    if not prompts:
        raise LoRAError(f"distill: the classifier accepted none of {counts['generated']} "
                        "steered images: check the classifier (--classifier) or steer harder")
    if cfg.preserve:
        t0 = time.perf_counter()
        kept, kept_prompts, kept_seeds = ddata.preserved_images(
            denoiser, settings, out / "data", objects=objects, per_object=cfg.preserve,
            seed=cfg.seed, made_by={"steps": settings.steps, "guidance": settings.guidance},
            callback=callback)
        seconds["preserve"] = time.perf_counter() - t0
        images = torch.cat([images, kept])
        prompts, seeds = prompts + kept_prompts, seeds + kept_seeds
        counts["preserved"] = len(kept_prompts)
    latents = denoiser.encode_image(images.float().div(255))
    paired = seeded_latents(denoiser, seeds) if cfg.paired_noise else None
    params = attach(net, cfg.spec(), seed=cfg.seed)
    t0 = time.perf_counter()
    grid = denoiser.timesteps(settings.steps)
    grid = grid[:max(1, round(cfg.noisy_fraction * len(grid)))]
    with torch.enable_grad():
        history = train_lora(trained, net, params, latents, prompts, steps=cfg.steps,
                             batch=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, grid=grid,
                             drop_text=cfg.drop_text, checkpoint=out / CHECKPOINT,
                             checkpoint_every=cfg.checkpoint_every,
                             identity=identity, paired=paired,
                             paired_fraction=cfg.paired_noise, callback=callback)
    seconds["train"] = time.perf_counter() - t0
    train_card = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                  "drop_text": cfg.drop_text, "noisy_fraction": cfg.noisy_fraction,
                  "paired_noise": cfg.paired_noise,
                  "timesteps": [float(t) for t in grid], "loss_history": history}
    return train_card, {"generated": counts["generated"], "accepted": counts["accepted"],
                        "preserved": counts.get("preserved", 0)}


def _train_reward(cfg, denoiser, trained, net, loss, settings, objects, hold, identity,
                  seconds, callback) -> tuple[dict, dict]:
    """Recipe "reward": the classifier's loss through the first sampling steps."""
    from l2s.distill.lora import attach
    from l2s.distill.reward import read_steps, train_reward
    from l2s.distill.train import CHECKPOINT

    params = attach(net, cfg.spec(), seed=cfg.seed)
    t0 = time.perf_counter()
    with torch.enable_grad():
        history = train_reward(denoiser, trained, net, params, loss, settings,
                               objects=objects, hold_out=hold, steps=cfg.steps,
                               batch=cfg.batch_size, lr=cfg.lr, keep=cfg.keep, seed=cfg.seed,
                               checkpoint=Path(cfg.out) / CHECKPOINT,
                               checkpoint_every=cfg.checkpoint_every,
                               identity=identity, callback=callback)
    seconds["train"] = time.perf_counter() - t0
    grid = denoiser.timesteps(settings.steps)
    reads = read_steps(settings)
    train_card = {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
                  "keep": cfg.keep, "read_steps": reads,
                  "read_timesteps": [float(grid[k]) for k in reads],
                  "loss_history": history}
    return train_card, {"prompts": cfg.steps * cfg.batch_size}
