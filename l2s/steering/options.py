"""The steering options steer, bench and speed share: declared once, checked once, resolved
against the model's defaults once.

Each field carries its command-line help (``l2s.cli.options.steer_options`` makes one typer
option per field from it), so a flag added here exists on every steering command with the
same name, type and help text. None means "the model's default"
(``l2s.engine.registry.SteerDefaults``, listed by `l2s models --json`), except where the help
says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from l2s.config import ConfigError, check_choice, check_integer, check_number
from l2s.engine.compiled import COMPILE_MODES
from l2s.engine.registry import steer_defaults
from l2s.steering.loop import RELATION_SCHEDULES, SteerSettings
from l2s.steering.optimizers import optimizers


def _option(help: str, default=None, *, model_default: bool = True):
    """A field of SteerOptions: its default and its --help text (``model_default``: None
    stands for the model's value, which --help then names)."""
    return field(default=default, metadata={"help": help, "model_default": model_default})


@dataclass(frozen=True)
class SteerOptions:
    """How to sample and how hard and how long to steer; every field optional."""

    steps: int | None = _option("Sampling steps")
    guidance: float | None = _option("Guidance scale (CFG above 1, as diffusers; at 1 or "
                                     "below the prompt alone; Flux-dev: the embedded scale)")
    steer_until: float | None = _option(
        "Steer before this fraction of the steps (< 1) or this step count (>= 1)")
    steer_from: int | None = _option("First steered step")
    iterations: int | None = _option("Max gradient iterations per steered step")
    step_size: float | None = _option("Latent step size")
    optimizer: str | None = _option("Latent update rule: sgd, adam, normalized (steps of a "
                                    "fixed size) or a registered one")
    loss_threshold: float | None = _option("Stop iterating below this loss")
    budget: int | None = _option("Max gradient iterations per image over the whole generation "
                                 "(default: no cap)", model_default=False)
    relation_schedule: str | None = _option(
        "Prompts with several relations: round-robin (iteration i steers relation i mod n, stop "
        "when it holds), worst (steer the relation with the highest loss, stop when all hold) "
        "or sum (the losses over the threshold summed, stop when all hold)")
    compile: str = _option(
        f"torch.compile the steering forward: {', '.join(COMPILE_MODES)} (reduce-overhead adds "
        "CUDA graphs on a GPU). The first steered step of each batch shape pays the "
        "compilation (minutes on a CPU); results match eager to float rounding", "off",
        model_default=False)

    def __post_init__(self) -> None:
        check_integer("--steps", self.steps, 1)
        check_number("--guidance", self.guidance, 0)
        check_number("--steer-until", self.steer_until, 0, strict=True)
        check_integer("--steer-from", self.steer_from, 0)
        check_integer("--iterations", self.iterations, 0)
        check_number("--step-size", self.step_size, 0, strict=True)
        if self.optimizer is not None:
            check_choice("--optimizer", self.optimizer, tuple(optimizers()))
        check_number("--loss-threshold", self.loss_threshold, 0)
        check_integer("--budget", self.budget, 0)
        if self.relation_schedule is not None:
            check_choice("--relation-schedule", self.relation_schedule, RELATION_SCHEDULES)
        check_choice("--compile", self.compile, COMPILE_MODES)

    def to_json(self) -> dict:
        """The options as flat {name: value}: the keys reports and config files use."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def with_model_defaults(self, model: str, *names: str) -> SteerOptions:
        """These options with the fields ``names`` left None filled in from ``model``'s
        defaults (what a config file records to pin a run's settings)."""
        d = steer_defaults(model)
        return replace(self, **{n: getattr(d, n) for n in names if getattr(self, n) is None})

    def with_all_model_defaults(self, model: str) -> SteerOptions:
        """These options with every "model default" (None) filled in from ``model``'s
        defaults: what a written config.yaml holds, so it repeats the run whatever the
        defaults become (a loss_threshold left None stays None: the paper's schedule)."""
        return self.with_model_defaults(model, *(f.name for f in fields(self)
                                                 if f.metadata["model_default"]))

    def resolve(self, model: str) -> SteerSettings:
        """The concrete settings for ``model``: each option left None is the model's default
        (``l2s.engine.registry.steer_defaults``: its preset's or look-alike preset's, else
        SD's). Refuses a --steer-from/--steer-until that leaves no step to steer."""
        defaults = steer_defaults(model)
        v = {f.name: getattr(self, f.name) for f in fields(self)}
        for f in fields(self):
            if f.metadata["model_default"] and v[f.name] is None:
                v[f.name] = getattr(defaults, f.name)
        threshold = v.pop("loss_threshold")
        if threshold is not None:  # a fixed early exit; None: SteerSettings' schedule
            v.update(threshold_start=threshold, threshold_end=threshold)
        settings = SteerSettings(**v)
        last = settings.steered_steps()
        # refused only for a range the user chose: the model's own values spelled out (as a
        # written config.yaml holds them) steer what the defaults steer, possibly nothing
        # (`--steps 1` on the toy, which skips step 0)
        chosen = [n for n in ("steer_from", "steer_until")
                  if getattr(self, n) not in (None, getattr(defaults, n))]
        if chosen and not settings.steered_count():
            default = " (the model's default)" if "steer_from" not in chosen else ""
            raise ConfigError(f"--steer-from {settings.steer_from}{default} leaves no step to "
                              f"steer: steering ends before step {last} (--steer-until "
                              f"{settings.steer_until:g} of {settings.steps} steps); pass a "
                              f"--steer-from below {last} or a larger --steer-until")
        return settings

