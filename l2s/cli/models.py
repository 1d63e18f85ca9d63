"""`l2s models`: the known backbones and whether each can be used offline."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from l2s.classifier.model import describe_models
from l2s.cli.output import console, emit_json
from l2s.engine.loading import hf_cache_dir


def models(
    json_out: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
) -> None:
    """List the backbone presets, whether each is available locally, and its classifier.

    Any hub id (org/name) or local diffusers folder also works as --model.
    """
    rows = describe_models()
    if json_out:
        emit_json(rows)
        return
    from l2s.classifier.model import card_origin

    table = Table(title="l2s backbones")
    for col in ("name", "source", "available", "classifier", "description"):
        table.add_column(col, overflow="fold")  # fold, never "...": ids are copied from here
    for r in rows:
        table.add_row(r["name"], r["repo_id"] or "shipped with l2s",
                      "[green]yes[/]" if r["available"] else "[yellow]no[/]",
                      card_origin(r["classifier"]) if r["classifier"] else "-",
                      r["description"])
    console.print(table)
    for r in rows:  # whole paths on their own lines, to copy
        if r["classifier"]:
            console.print(f"{r['name']}: steer uses {escape(r['classifier'])}", soft_wrap=True,
                          highlight=False)
    console.print(f"HF cache: {hf_cache_dir()}  (models not available: `hf download REPO` "
                  "while online; presets also run with --random-weights for speed work)")
    from l2s.classifier.layout import published_presets

    console.print("Published L2S classifiers: `l2s classifier import FILE --model M` with M = "
                  + published_presets(notes=True))
