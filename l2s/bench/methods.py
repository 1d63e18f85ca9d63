"""The generation methods a benchmark compares, by name: a registry others add to.

A method factory gets a MethodContext once per run and returns the batch generator
(prompts, seeds) -> images (B, H, W, 3) in [0, 1]. The context carries the suite's own checker
(the detector + scorer deciding each image), so a method may verify its images, e.g.
"generate plainly, keep what passes, steer the rest from the same seeds":

    from l2s.bench.methods import register_method

    @register_method("my-method")
    def my_method(ctx):
        plain = METHODS["plain"](ctx)
        def run(prompts, seeds):
            images = plain(prompts, seeds)
            ok = ctx.check(images, prompts)  # list[bool], one per image
            ...
        return run

A method may take an argument after a colon, ``NAME:ARG`` (``l2s:CARD`` steers with the
classifier card or folder CARD): register it with ``argument="what ARG is"`` (and
``check=``, a function refusing a bad ARG before the run starts); the factory reads it as
``ctx.argument`` (None when the name is given bare).

A generator may return a :class:`Generated` instead of bare images: fields to join each
image's record, and the candidates a search chose among, which the run judges with the
suite's checker after the method's time is taken (``best-of`` does: its records say how
often the verifier agreed with the judge).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import torch

from l2s.engine.backbone import Denoiser
from l2s.engine.sampling import seeded_latents

if TYPE_CHECKING:
    from l2s.bench.suites import BenchPrompt
    from l2s.steering.options import SteerOptions



@dataclass
class Generated:
    """A method's images with what the run should record beside them."""

    images: torch.Tensor  # (B, H, W, 3) in [0, 1]: one per (prompt, seed), as a bare return
    records: list[dict]  # (B,) fields joined to each image's result record
    # (B, N, H, W, 3) in [0, 1]: the images a search chose among; each is judged by the
    # suite's checker outside the method's seconds, its verdicts joining the image's record
    # as "candidates_correct" (None: nothing to judge)
    candidates: torch.Tensor | None = None


Generate = Callable[[Sequence["BenchPrompt"], Sequence[int]], "torch.Tensor | Generated"]


class MethodSettings(Protocol):
    """What a method reads of the run's settings (``l2s.bench.run.BenchConfig`` has these)."""

    model: str  # backbone preset, hub id or folder
    classifier: str | None  # classifier card (None: the model's default)
    lora: str | None  # the +lora methods' LoRA folder (None: the model's shipped one)
    options: SteerOptions  # steering options, resolved against the model by each method
    batch_size: int  # images generated in one batch (best-of's candidates included)


@dataclass(frozen=True)
class MethodContext:
    """What a method may use: the backbone, the run's settings and the suite's checker."""

    denoiser: Denoiser
    config: MethodSettings
    # images (B, H, W, 3) in [0, 1] and their prompts -> whether each image is correct under
    # the suite's detector and scorer (the verdict the benchmark itself will record)
    check: Callable[[torch.Tensor, Sequence[BenchPrompt]], list[bool]]
    argument: str | None = None  # ARG of a method named NAME:ARG


MethodFactory = Callable[[MethodContext], Generate]
METHODS: dict[str, MethodFactory] = {}
# name -> what its argument is (NAME:ARG), for the methods that take one
METHOD_ARGUMENTS: dict[str, str] = {}
# name -> (option, ARG) -> None, raising an L2SError for an ARG the method cannot take
ARGUMENT_CHECKS: dict[str, Callable[[str, str], object]] = {}


def register_method(name: str, argument: str | None = None,
                    check: Callable[[str, str], object] | None = None
                    ) -> Callable[[MethodFactory], MethodFactory]:
    """Decorator adding a factory to METHODS under `name` (`l2s bench --method NAME`);
    `argument` says what ARG is when the method may be named NAME:ARG, `check(option, ARG)`
    refuses a bad one with a one-line error."""
    def add(factory: MethodFactory) -> MethodFactory:
        METHODS[name] = factory
        if argument is not None:
            METHOD_ARGUMENTS[name] = argument
        if check is not None:
            ARGUMENT_CHECKS[name] = check
        return factory

    return add


def split_method(name: str) -> tuple[str, str | None]:
    """"l2s:cards/mine" -> ("l2s", "cards/mine"); "plain" -> ("plain", None)."""
    base, sep, arg = name.partition(":")
    return (base, arg) if sep else (name, None)


def check_method(name: str, error: type[Exception]) -> None:
    """Raise `error` naming the fix unless `name` is a method, or NAME:ARG of one taking ARG."""
    from l2s.config import check_choice

    base, arg = split_method(name)
    check_choice("--method", base, tuple(methods()), error)
    if arg is not None and base not in METHOD_ARGUMENTS:
        takes = ", ".join(f"{n}:ARG ({what})" for n, what in METHOD_ARGUMENTS.items())
        raise error(f"--method {name}: {base} takes no argument after ':'; "
                    f"methods that do: {takes}")
    if arg is not None and not arg.strip():
        raise error(f"--method {name}: nothing after ':'; give {base}:ARG with ARG "
                    f"{METHOD_ARGUMENTS[base]}, or {base} alone")
    if arg is not None and base in ARGUMENT_CHECKS:
        ARGUMENT_CHECKS[base](f"--method {name}", arg)


def method_factory(name: str) -> MethodFactory:
    """The factory of a method name, NAME:ARG passing ARG as the context's argument."""
    base, arg = split_method(name)
    factory = methods()[base]
    if arg is None:
        return factory
    return lambda ctx: factory(replace(ctx, argument=arg))


def _steer_method(name: str) -> MethodFactory:
    """plain / l2s / centroid through `l2s steer`'s `generate`, with the run's settings (l2s:CARD
    and l2s-verify:CARD steer with the classifier card or folder CARD instead of the run's), and
    l2s-verify: plain first, the images the suite's checker fails (its detector and scorer:
    the verdict the benchmark records) regenerated with l2s from the same seeds
    (``l2s.steering.verify``)."""
    def factory(ctx: MethodContext) -> Generate:
        from l2s.steering.job import build_loss, generate
        from l2s.steering.verify import generate_verified

        cfg = ctx.config
        verify = name == "l2s-verify"
        loss, card = build_loss("l2s" if verify else name, ctx.denoiser, cfg.model,
                                ctx.argument or cfg.classifier)
        settings = cfg.options.resolve(cfg.model)

        def run(prompts: Sequence[BenchPrompt], seeds: Sequence[int]) -> torch.Tensor:
            triplets = [[t for t in p.triplets if t.steerable] for p in prompts]
            texts, latents = [p.prompt for p in prompts], seeded_latents(ctx.denoiser, list(seeds))
            if verify:  # judged as the benchmark will judge it: the suite's checker
                return generate_verified(ctx.denoiser, texts, triplets, latents, settings, loss,
                                         check=lambda images: ctx.check(images, prompts)
                                         ).images
            images, _ = generate(ctx.denoiser, texts, triplets, latents, settings, loss)
            return images

        run.classifier = card  # the card it steers with: a resume must keep it
        return run

    return factory


CARD = "a classifier card or folder to steer with instead of the run's --classifier"
for _name in ("plain", "l2s", "centroid", "l2s-verify"):
    register_method(_name, CARD if _name in ("l2s", "l2s-verify") else None)(
        _steer_method(_name))


def _check_candidates(option: str, arg: str) -> int:
    from l2s.steering.search import check_candidates

    return check_candidates(option, arg)


@register_method("best-of", argument="the number of plain candidates per image (default 4)",
                 check=_check_candidates)
def best_of_method(ctx: MethodContext) -> Generate:
    """best-of:N: N plain candidates per image from distinct seeds (candidate 0: the image's
    own), generated --batch-size at a time; the run's classifier reading the maps of the plain
    pass keeps the most probable one (``l2s.steering.search``); the suite's checker is never
    the verifier. Each record gets
    the search ("best_of": seeds, verifier p, the kept candidate) and, judged after the
    method's time is taken, every candidate's verdict ("candidates_correct")."""
    from l2s.steering.job import build_loss
    from l2s.steering.search import DEFAULT_CANDIDATES, best_of

    cfg = ctx.config
    n = DEFAULT_CANDIDATES if ctx.argument is None else \
        _check_candidates(f"--method best-of:{ctx.argument}", ctx.argument)
    loss, card = build_loss("l2s", ctx.denoiser, cfg.model, cfg.classifier)
    settings = cfg.options.resolve(cfg.model)

    def run(prompts: Sequence[BenchPrompt], seeds: Sequence[int]) -> Generated:
        triplets = [[t for t in p.triplets if t.steerable] for p in prompts]
        found = best_of(ctx.denoiser, [p.prompt for p in prompts], triplets, seeds, n,
                        settings, loss, batch_size=cfg.batch_size)
        return Generated(found.images, [{"best_of": found.image_json(i)}
                                        for i in range(len(prompts))], found.candidates)

    run.classifier = card  # the card it verifies with: a resume must keep it
    return run


def _lora_method(base: str) -> MethodFactory:
    """plain+lora / l2s+lora: ``base`` on the backbone with a LoRA merged into a copy of its
    network (``l2s.distill.lora.with_lora``; the run's --lora, by default the model's shipped
    one; NAME:DIR names another folder): the other methods keep the base model, and merged
    weights cost what the base costs."""
    def factory(ctx: MethodContext) -> Generate:
        from l2s.distill.lora import resolve_lora, with_lora

        cfg = ctx.config
        folder = resolve_lora(ctx.argument or getattr(cfg, "lora", None), cfg.model)
        adapted = with_lora(ctx.denoiser, folder)
        run = _steer_method(base)(replace(ctx, denoiser=adapted, argument=None))
        run.lora = str(folder)  # the LoRA it generates with: a resume must keep it
        return run

    return factory


LORA = "a LoRA folder (written by `l2s distill`) instead of the run's --lora"
for _name in ("plain", "l2s"):
    register_method(f"{_name}+lora", LORA)(_lora_method(_name))


def methods() -> dict[str, MethodFactory]:
    """Every method by name: the registered ones, then one per registered loss that no method
    is named after (``l2s.steering.losses``: a plugin's loss is scored as l2s and centroid
    are)."""
    from l2s.steering.losses import losses

    return {**METHODS, **{n: _steer_method(n) for n in losses() if n not in METHODS}}
