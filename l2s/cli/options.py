"""Options the commands share: the steering options (one flag per SteerOptions field), the
shared vocabulary (--device, --dtype, --image-size) with the old spellings of renamed flags,
and `--config FILE.yaml` with the resolved config a run writes.

A config file fills the click context's ``default_map`` before the other options are parsed,
so a flag given on the command line wins over the file, and the file over the built-in default.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import fields
from functools import wraps

import typer
from typer.core import TyperCommand

from l2s.config import CONFIG_FILE, ConfigError, load_yaml

# Old spelling -> flag of the shared vocabulary. A command that has the new flag still takes
# the old one (and a config file the old key) for one release; --help shows only the new one.
OLD_SPELLINGS = {"--images": "--num-images"}


def _key(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


class SharedVocabulary(TyperCommand):
    """A command that reads the old spellings of renamed flags as the new ones."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        known = {o for p in self.params for o in p.opts}
        renamed, rest = [], list(args)
        while rest:
            a = rest.pop(0)
            if a == "--":  # what follows is arguments, not options
                renamed += [a, *rest]
                break
            flag, eq, value = a.partition("=")
            new = OLD_SPELLINGS.get(flag)
            renamed.append(new + eq + value if new in known and flag not in known else a)
        return super().parse_args(ctx, renamed)


# Options that change what is shown, not what is computed: left out of the resolved config.
_DISPLAY_ONLY = ("config", "json_out", "quiet", "verbose")


def _load(ctx: typer.Context, param: typer.CallbackParam, value: str | None) -> str | None:
    if value is None:
        return value
    if not value.strip():  # was: taken as no --config
        raise typer.BadParameter("give a YAML file of option values (an empty name names none)",
                                 ctx=ctx, param=param)
    try:
        data = load_yaml(value)
    except ConfigError as e:
        raise typer.BadParameter(str(e), ctx=ctx, param=param) from None
    params = {p.name: p for p in ctx.command.params if p.name not in _DISPLAY_ONLY}
    for old, new in OLD_SPELLINGS.items():  # `images: 4` in a file written before the rename
        if _key(old) in data and _key(new) in params and _key(old) not in params:
            data[_key(new)] = data.pop(_key(old))
    unknown = sorted(set(data) - set(params))
    if unknown:
        raise typer.BadParameter(f"{value} has unknown key(s) {', '.join(unknown)}: valid keys "
                                 f"are {', '.join(sorted(params))}", ctx=ctx, param=param)
    for name, v in data.items():
        problem = _value_problem(name, v, params[name])
        if problem:
            raise typer.BadParameter(f"{value}: {problem}", ctx=ctx, param=param)
        if getattr(params[name], "multiple", False) and not isinstance(v, list | tuple):
            data[name] = [v]  # `data: shapes` for a repeatable option
    ctx.default_map = {**(ctx.default_map or {}), **data}
    return value


def _value_problem(key: str, v, option) -> str | None:
    """What is wrong with a config file's value ``v`` for ``option``, or None. The values the
    command line could not have given are refused here, where typer would turn them into
    something else: a list for a one-value option (was: taken), ``seed: true`` (was: seed 1),
    ``compile: off`` (YAML 1.1 reads it as false: was "got 'False'"), dates and binary."""
    import datetime

    kind = getattr(getattr(option, "type_descriptor", None), "annotation", None)
    multiple = getattr(option, "multiple", False)
    for item in (v if multiple and isinstance(v, list | tuple) else [v]):
        if item is None and not multiple:
            return None
        if isinstance(item, list | tuple | dict | set):
            return (f"{key} takes one value, got {item!r}: write one value"
                    + (" or a list of them" if multiple else f" ({key}: VALUE)"))
        if isinstance(item, bytes | datetime.date):
            return (f"{key} is a YAML {'binary' if isinstance(item, bytes) else 'date'} "
                    f"({item!r}): quote the text, e.g. {key}: '...'")
        if isinstance(item, bool) and kind is not bool:
            word = "a whole number" if kind is int else "a number" if kind is float else "text"
            return (f"{key} must be {word}, got the YAML boolean {str(item).lower()} (YAML "
                    f"reads yes/no/on/off/true/false unquoted as booleans): "
                    + (f"quote the text, e.g. {key}: '{'on' if item else 'off'}'"
                       if word == "text" else f"give {word}"))
        if kind is bool and not isinstance(item, bool):
            return f"{key} must be true or false, got {item!r}"
    return None


def _option_help(f) -> str:
    """--help of a SteerOptions field: its text, and for a model default what None means and
    the value a model without a preset gets."""
    words = f.metadata["help"]
    if not f.metadata["model_default"]:
        return words + "."
    from l2s.engine.registry import SteerDefaults

    value = getattr(SteerDefaults(), f.name)
    fallback = "1e-5 rising to 7e-5" if f.name == "loss_threshold" and value is None else value
    return (f"{words} (default: the model's, listed by `l2s models --json`; {fallback} "
            "without a preset).")


def _option_type(hint):
    """``int | None`` -> int: the type click converts the flag's text to."""
    import types

    args = [a for a in getattr(hint, "__args__", ()) if a is not type(None)]
    return args[0] if isinstance(hint, types.UnionType) and len(args) == 1 else hint


def steer_options(command: Callable) -> Callable:
    """Give ``command`` one option per SteerOptions field (flag, type and help from the field)
    in place of its ``options`` parameter, and call it with their values gathered into one
    SteerOptions: every steering command takes the same flags, declared once."""
    from l2s.steering.options import SteerOptions

    hints = typing.get_type_hints(SteerOptions)
    generated = [inspect.Parameter(
        f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=_option_type(hints[f.name]),
        default=typer.Option(f.default, "--" + f.name.replace("_", "-"), help=_option_help(f)))
        for f in fields(SteerOptions)]
    names = [f.name for f in fields(SteerOptions)]
    sig = inspect.signature(command)
    params = list(sig.parameters.values())
    at = [p.name for p in params].index("options")
    params[at:at + 1] = generated

    @wraps(command)
    def wrapper(*args, **kwargs):
        values = {n: kwargs.pop(n) for n in names}
        options = SteerOptions(**values)  # a bad value: ConfigError, for user_errors
        return command(*args, options=options, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper


def device_option():
    """``--device``: where the backbone runs."""
    return typer.Option(None, "--device",
                        help="cuda, cuda:N, cpu, mps (default: $L2S_DEVICE, else CUDA if any).")


def dtype_option():
    """``--dtype``: the backbone's floating-point type."""
    return typer.Option(None, "--dtype", help="float16, bfloat16 or float32 (default: float16 "
                                              "on CUDA, float32 on CPU; Flux and SD3 run fp16 "
                                              "as bfloat16).")


def image_size_option():
    """``--image-size``: pixels a side of the generated images."""
    return typer.Option(None, "--image-size", help="Pixels (default: the model's).")


def config_option(example: str):
    """``--config FILE.yaml``: option values from a file; command-line flags override them.
    ``example`` is a key of the command's own (``"num_images: 4"``), shown in the help."""
    return typer.Option(None, "--config", is_eager=True, callback=_load,
                        help="YAML file of option values, keys named like the options "
                             f"({example}); flags on the command line win. Each run writes "
                             f"its resolved {CONFIG_FILE} beside its outputs.")
