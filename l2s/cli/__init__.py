"""The `l2s` command line: a thin typer layer over the library."""

from __future__ import annotations

import os

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from typer.core import TyperGroup

from l2s import __version__
from l2s.cli import bench, classifier, distill, doctor, invert, models, speed, steer, train
from l2s.cli.helptext import reflow_commands
from l2s.cli.options import SharedVocabulary
from l2s.cli.output import output_options


def _usage_error_line(e: ClickException) -> None:
    """A mistake in the command line itself (an unknown option, a value of the wrong type, a
    --config file refused) as one ``error:`` line naming where the options are listed, as
    every other refusal: typer's own rendering is a six-line box wrapped at the terminal."""
    from rich.markup import escape

    from l2s.cli.output import console

    ctx = getattr(e, "ctx", None)
    # l2s's own checks (--config, --threads) name the fix; typer's (a wrong type, an unknown
    # option) point to the help
    own = getattr(getattr(e, "param", None), "callback", None) is not None
    where = f": see `{ctx.command_path} --help`" if ctx is not None and not own else ""
    message = " ".join(e.format_message().split()).rstrip(".")
    console.print(f"[bold red]error:[/] {escape(message)}{escape(where)}", highlight=False,
                  soft_wrap=True)


class OneLineErrors(TyperGroup):
    """The `l2s` group: usage errors of any of its commands print one line, exit code 2; every
    command's description flows to the terminal's width (its docstring's line breaks joined)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        reflow_commands(self)  # typer builds the subcommands first and hands them in here

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except NoArgsIsHelpError:
            raise
        except UsageError as e:  # the options before the command: --threads ...
            _usage_error_line(e)
            raise typer.Exit(e.exit_code) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError:  # `l2s classifier`: its help, as click does
            raise
        except UsageError as e:
            _usage_error_line(e)
            raise typer.Exit(e.exit_code) from None


app = typer.Typer(
    name="l2s",
    cls=OneLineErrors,
    help="Learn-to-Steer: make text-to-image diffusion models put objects where the prompt "
    "says, by steering the latent with a classifier trained on the model's own attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"l2s {__version__}")
        raise typer.Exit()


def max_threads() -> int:
    """The most --threads l2s takes: 4 per CPU of this machine (at most 256); past the cores
    torch gains nothing, and thousands of threads hang (2000) or crash OpenBLAS (100000)."""
    return min(256, 4 * (os.cpu_count() or 1))


def _threads(value: int | None) -> int | None:
    if value is not None and value > max_threads():
        raise typer.BadParameter(f"{value} is more than {max_threads()} (4 x the "
                                 f"{os.cpu_count()} CPUs of this machine, at most 256): pass "
                                 "at most the number of cores")
    return value


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    threads: int = typer.Option(None, "--threads", min=1, callback=_threads,
                                help="CPU threads for torch (default: the CPUs this "
                                     "process may use, at most 4, less the 1-minute load "
                                     "average, at least 1; torch's choice when "
                                     "OMP_NUM_THREADS is set). 1 is often fastest for the toy "
                                     "or when other jobs share the CPU."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="Also load pickled .bin weights of a backbone or "
                                           "detector, local or from the hub (they can run "
                                           "code: only for files you trust). By default only "
                                           "safetensors load."),
) -> None:
    """Learn-to-Steer command line."""
    if allow_pickle:
        os.environ["L2S_ALLOW_PICKLE"] = "1"  # read by l2s.engine.loading.allow_pickle
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        from l2s.environment import default_threads

        threads = default_threads()  # torch's one-per-core collapses on a loaded machine
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


app.command("steer", cls=SharedVocabulary)(output_options(steer.steer))
app.command("invert", cls=SharedVocabulary)(output_options(invert.invert))
app.command("train", cls=SharedVocabulary)(output_options(train.train))
app.command("bench", cls=SharedVocabulary)(output_options(bench.bench))
app.command("speed", cls=SharedVocabulary)(output_options(speed.speed))
app.command("distill")(output_options(distill.distill))
app.command("models")(output_options(models.models))
app.command("doctor")(output_options(doctor.doctor))
app.add_typer(classifier.app, name="classifier")


def main() -> None:
    # "l2s" also under `python -m l2s` / `accelerate launch -m l2s`: usage lines, "Try 'l2s
    # steer --help'" and the docs/cli.md that `make docs` generates name the installed command
    app(prog_name="l2s")
