"""The `l2s` command line: a thin typer layer over the library."""

from __future__ import annotations

import typer

from l2s import __version__
from l2s.cli import bench, classifier, doctor, invert, models, speed, steer, train
from l2s.cli.options import SharedVocabulary

app = typer.Typer(
    name="l2s",
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


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    threads: int = typer.Option(None, "--threads", min=1,
                                help="CPU threads for torch (default: torch's choice). 1 is "
                                     "often fastest for the toy or when other jobs share the "
                                     "CPU."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="Also load pickled .bin model weights from local "
                                           "folders (they can run code: only for files you "
                                           "trust). By default only safetensors load."),
) -> None:
    """Learn-to-Steer command line."""
    if allow_pickle:
        import os

        os.environ["L2S_ALLOW_PICKLE"] = "1"  # read by l2s.engine.loading.allow_pickle
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


app.command("steer", cls=SharedVocabulary)(steer.steer)
app.command("invert", cls=SharedVocabulary)(invert.invert)
app.command("train", cls=SharedVocabulary)(train.train)
app.command("bench", cls=SharedVocabulary)(bench.bench)
app.command("speed", cls=SharedVocabulary)(speed.speed)
app.command("models")(models.models)
app.command("doctor")(doctor.doctor)
app.add_typer(classifier.app, name="classifier")


def main() -> None:
    # "l2s" also under `python -m l2s` / `accelerate launch -m l2s`: usage lines, "Try 'l2s
    # steer --help'" and the docs/cli.md that `make docs` generates name the installed command
    app(prog_name="l2s")
