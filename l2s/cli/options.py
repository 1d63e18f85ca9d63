"""Options the job commands share: `--config FILE.yaml` and the resolved config they write.

A config file fills the click context's ``default_map`` before the other options are parsed,
so a flag given on the command line wins over the file, and the file over the built-in default.
"""

from __future__ import annotations

from pathlib import Path

import typer

from l2s.config import CONFIG_FILE, ConfigError, dump_yaml, load_yaml

# Options that change what is shown, not what is computed: left out of the resolved config.
_DISPLAY_ONLY = ("config", "json_out")


def _load(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    if not value:
        return value
    try:
        data = load_yaml(value)
    except ConfigError as e:
        raise typer.BadParameter(str(e), ctx=ctx, param=param) from None
    params = {p.name: p for p in ctx.command.params if p.name not in _DISPLAY_ONLY}
    unknown = sorted(set(data) - set(params))
    if unknown:
        raise typer.BadParameter(f"{value} has unknown key(s) {', '.join(unknown)}: valid keys "
                                 f"are {', '.join(sorted(params))}", ctx=ctx, param=param)
    for name, v in data.items():
        if getattr(params[name], "multiple", False) and not isinstance(v, list | tuple):
            data[name] = [v]  # `data: shapes` for a repeatable option
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


# Options whose default is the model's (``l2s.engine.registry.SteerDefaults``): one flag and
# help text each, for every command that takes them (steer, bench, speed).
_MODEL_DEFAULTS = {
    "steps": ("--steps", "Sampling steps"),
    "guidance": ("--guidance", "Guidance scale (CFG; Flux-dev: the embedded scale)"),
    "steer_until": ("--steer-until", "Steer before this fraction of the steps (< 1) or this "
                                     "step count (>= 1)"),
    "steer_from": ("--steer-from", "First steered step"),
    "iterations": ("--iterations", "Max gradient iterations per steered step"),
    "step_size": ("--step-size", "Latent step size"),
    "optimizer": ("--optimizer", "sgd, adam or normalized (fixed-size steps)"),
    "loss_threshold": ("--loss-threshold", "Stop iterating below this loss"),
    "relation_schedule": ("--relation-schedule",
                          "Prompts with several relations: round-robin (iteration i steers "
                          "relation i mod n, stop when it holds), worst (steer the relation "
                          "with the highest loss, stop when all hold) or sum (the losses over "
                          "the threshold summed, stop when all hold)"),
}


def model_default_option(name: str, text: str | None = None):
    """The option for SteerDefaults field ``name``: None means the model's default, and
    --help says so with the value a model without a preset gets (``text``: other words)."""
    from l2s.engine.registry import SteerDefaults

    flag, words = _MODEL_DEFAULTS[name]
    value = getattr(SteerDefaults(), name)
    fallback = "1e-5 rising to 7e-5" if name == "loss_threshold" and value is None else value
    return typer.Option(None, flag, help=f"{text or words} (default: the model's, listed by "
                                         f"`l2s models --json`; {fallback} without a preset).")


def compile_option():
    """``--compile MODE``: torch.compile the steering forward (``l2s.engine.compiled``)."""
    from l2s.engine.compiled import COMPILE_MODES

    return typer.Option("off", "--compile",
                        help=f"torch.compile the steering forward: {', '.join(COMPILE_MODES)} "
                             "(reduce-overhead adds CUDA graphs on a GPU). The first steered "
                             "step of each batch shape pays the compilation (minutes on a "
                             "CPU); results match eager to float rounding.")


def config_option():
    """``--config FILE.yaml``: option values from a file; command-line flags override them."""
    return typer.Option(None, "--config", is_eager=True, callback=_load,
                        help="YAML file of option values, keys named like the options "
                             "(num_images: 4); flags on the command line win. Each run writes "
                             f"its resolved {CONFIG_FILE} beside its outputs.")


def resolved(ctx: typer.Context) -> dict:
    """Every option value of this run (file, flags and defaults merged), display-only ones
    left out: what `--config` needs to repeat it."""
    return {k: v for k, v in ctx.params.items() if k not in _DISPLAY_ONLY}


def write_resolved(ctx: typer.Context, folder: str | Path, values: dict | None = None) -> Path:
    """Write the run's resolved config as ``folder/config.yaml`` and return its path."""
    return dump_yaml(values if values is not None else resolved(ctx), Path(folder) / CONFIG_FILE)
